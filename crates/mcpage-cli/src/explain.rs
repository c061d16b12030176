//! `mcpage explain`: what an anonymous GET of a request target gets.
//!
//! For each target: nginx's normalized `$uri`, the value V of
//! `$memcached_key`, the escaped memcached key K, the server nginx asks, and
//! whether the page is cacheable (and if not, why). Needs no running
//! memcached: the pools dial lazily and nothing is sent.
//!
//! Targets come from the command line or, when none are given, from stdin,
//! one per line. Both are read as bytes, so raw non-UTF-8 bytes work too.

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::Context;
use mcpage::key::{QueryMode, memcached_escape, nginx_host, nginx_uri, wire_key_len};
use mcpage::{Bypass, Cache, Config};
use serde::Serialize;

/// Arguments of `mcpage explain`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// One JSON object per line: target, uri, key, key_hex, server, cacheable, reason.
    #[arg(long)]
    json: bool,
    /// The Host header to assume (keys.host mode); absolute targets (http://host/path) carry their own.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Request targets as a client sends them (`/a//b?x=1`); read from stdin, one per line, when none are given.
    #[arg(value_name = "TARGET")]
    targets: Vec<OsString>,
}

pub(crate) async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let cache = Cache::connect(config)
        .await
        .context("cannot set up the memcached pools")?;
    let explainer = Explainer {
        cache: &cache,
        host: args.host.as_deref().map(str::as_bytes),
        json: args.json,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    if args.targets.is_empty() {
        let stdin = std::io::stdin();
        // Interactive: answer each line as it is typed.
        let interactive = stdin.is_terminal();
        for line in stdin.lock().split(b'\n') {
            let line = line.context("read targets from stdin")?;
            let target = line.strip_suffix(b"\r").unwrap_or(&line);
            if target.is_empty() {
                continue;
            }
            explainer.write(&mut out, target, &mut first)?;
            if interactive {
                out.flush().context("write to stdout")?;
            }
        }
    } else {
        for target in &args.targets {
            explainer.write(&mut out, target.as_bytes(), &mut first)?;
        }
    }
    out.flush().context("write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

struct Explainer<'a> {
    cache: &'a Cache,
    host: Option<&'a [u8]>,
    json: bool,
}

/// What nginx computes for a target it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NginxView {
    /// `$uri`.
    uri: Vec<u8>,
    /// V, the value of `$memcached_key`.
    value: Vec<u8>,
    /// K, the key nginx sends in `get K`.
    key: Vec<u8>,
}

/// One explained target.
struct Explained<'t> {
    target: &'t [u8],
    /// `None`: nginx answers 400 (no `$uri`, no key).
    view: Option<NginxView>,
    /// The server nginx asks, when the page is cacheable.
    server: Option<String>,
    verdict: Result<(), Bypass>,
}

/// The `--json` line.
#[derive(Serialize)]
struct JsonLine<'a> {
    target: String,
    uri: Option<String>,
    key: Option<String>,
    key_hex: Option<String>,
    server: Option<&'a str>,
    cacheable: bool,
    reason: Option<&'static str>,
}

impl Explainer<'_> {
    fn explain<'t>(&self, target: &'t [u8]) -> Explained<'t> {
        let config = self.cache.config();
        // nginx's request-line parser rejects raw control bytes, space and DEL
        // before any normalization (they can only arrive percent-encoded).
        if target.iter().any(|&b| b <= b' ' || b == 0x7f) {
            return Explained {
                target,
                view: None,
                server: None,
                verdict: Err(Bypass::BadRequest),
            };
        }
        // An absolute-form target carries its host, which wins over the Host
        // header in nginx (`classify` only looks at the header it is given).
        let host = match split_absolute(target) {
            Some((Some(line_host), _)) => Some(line_host),
            _ => self.host,
        };
        match self.cache.classify(host, target) {
            Ok(key) => {
                let server = self.cache.server_for(&key).to_owned();
                Explained {
                    target,
                    view: Some(NginxView {
                        uri: key.uri,
                        value: key.unescaped,
                        key: key.escaped,
                    }),
                    server: Some(server),
                    verdict: Ok(()),
                }
            }
            Err(reason) => Explained {
                target,
                view: if reason == Bypass::BadRequest {
                    None
                } else {
                    nginx_view(config, self.host, target)
                },
                server: None,
                verdict: Err(reason),
            },
        }
    }

    fn write(&self, out: &mut impl Write, target: &[u8], first: &mut bool) -> anyhow::Result<()> {
        let explained = self.explain(target);
        let result = if self.json {
            write_json(out, &explained)
        } else {
            if !*first {
                out.write_all(b"\n").context("write to stdout")?;
            }
            write_human(out, &explained, self.cache.config())
        };
        *first = false;
        result.context("write to stdout")
    }
}

/// What nginx computes for targets that are not cacheable (query string, key
/// too long, excluded path): the same `set $memcached_key` runs before the
/// bypass rules. `None` when nginx answers 400.
fn nginx_view(config: &Config, host_header: Option<&[u8]>, target: &[u8]) -> Option<NginxView> {
    let (line_host, path) = split_absolute(target)?;
    let parsed = nginx_uri(&path, config.keys.merge_slashes).ok()?;
    let mut value = config.keys.prefix.as_bytes().to_vec();
    if config.keys.host {
        // The request-line host wins over the Host header, as in nginx.
        let host = nginx_host(line_host.or(host_header)?)?;
        value.extend_from_slice(&host);
    }
    value.extend_from_slice(&parsed.uri);
    if config.keys.query == QueryMode::Include {
        value.push(b'?');
        value.extend_from_slice(parsed.args.as_deref().unwrap_or_default());
    }
    let key = memcached_escape(&value);
    Some(NginxView {
        uri: parsed.uri,
        value,
        key,
    })
}

/// Origin-form `/p?q` → `(None, "/p?q")`; absolute-form `http://h/p?q` →
/// `(Some("h"), "/p?q")` (an empty path is `/`). `None` for anything else.
fn split_absolute(target: &[u8]) -> Option<(Option<&[u8]>, Vec<u8>)> {
    if target.first() == Some(&b'/') {
        return Some((None, target.to_vec()));
    }
    let scheme_end = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..scheme_end];
    if scheme.is_empty() || !scheme.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let authority_end = rest
        .iter()
        .position(|&c| c == b'/' || c == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let mut path = path.to_vec();
    if path.first() != Some(&b'/') {
        path.insert(0, b'/');
    }
    Some((Some(authority), path))
}

fn write_json(out: &mut impl Write, e: &Explained<'_>) -> std::io::Result<()> {
    let line = JsonLine {
        target: String::from_utf8_lossy(e.target).into_owned(),
        uri: e
            .view
            .as_ref()
            .map(|v| String::from_utf8_lossy(&v.uri).into_owned()),
        key: e
            .view
            .as_ref()
            .map(|v| String::from_utf8_lossy(&v.key).into_owned()),
        key_hex: e.view.as_ref().map(|v| hex(&v.key)),
        server: e.server.as_deref(),
        cacheable: e.verdict.is_ok(),
        reason: e.verdict.err().map(Bypass::reason),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

fn write_human(out: &mut impl Write, e: &Explained<'_>, config: &Config) -> std::io::Result<()> {
    writeln!(out, "target     {}", show(e.target))?;
    match &e.view {
        Some(view) => {
            writeln!(out, "uri        {}", show(&view.uri))?;
            writeln!(out, "value      {}", show(&view.value))?;
            let wire = wire_key_len(&view.key);
            let note = if wire == view.key.len() {
                format!("{} bytes", view.key.len())
            } else {
                format!(
                    "{} bytes, {wire} as the memcached client sends it (base64: it contains DEL)",
                    view.key.len()
                )
            };
            writeln!(out, "key        {}  ({note})", show(&view.key))?;
        }
        None => {
            writeln!(out, "uri        -")?;
            writeln!(out, "value      -")?;
            writeln!(out, "key        -")?;
        }
    }
    writeln!(out, "server     {}", e.server.as_deref().unwrap_or("-"))?;
    match e.verdict {
        Ok(()) => writeln!(out, "cacheable  yes"),
        Err(reason) => writeln!(
            out,
            "cacheable  no: {} ({})",
            reason.reason(),
            describe(reason, config)
        ),
    }
}

/// Why a target is not cached, in words.
fn describe(reason: Bypass, config: &Config) -> String {
    match reason {
        Bypass::BadRequest => "nginx answers 400 Bad Request".to_owned(),
        Bypass::QueryString => {
            "a query string, with keys.query = \"bypass\": nginx sends it to the app".to_owned()
        }
        Bypass::KeyTooLong => format!(
            "the key exceeds memcached's {} bytes: nginx sends it to the app",
            mcpage::key::MAX_KEY_LEN
        ),
        Bypass::Excluded => "the path matches no cache.include or a cache.exclude regex: \
             never stored, so nginx always misses"
            .to_owned(),
        Bypass::Host => {
            if config.keys.host {
                "keys.host is on: the host (--host or http://host/path) is missing, \
                 invalid or not in cache.allowed_hosts"
                    .to_owned()
            } else {
                "the host is not allowed".to_owned()
            }
        }
        other => other.reason().replace('_', " "),
    }
}

/// Bytes for a terminal: valid UTF-8 as it is, control characters and
/// invalid bytes as `\xHH`.
fn show(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                for b in c.to_string().bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            } else if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_targets_split() {
        assert_eq!(split_absolute(b"/a?b"), Some((None, b"/a?b".to_vec())));
        assert_eq!(
            split_absolute(b"http://h/p?q"),
            Some((Some(&b"h"[..]), b"/p?q".to_vec()))
        );
        assert_eq!(
            split_absolute(b"http://h?q"),
            Some((Some(&b"h"[..]), b"/?q".to_vec()))
        );
        assert_eq!(split_absolute(b"x"), None);
    }

    #[test]
    fn showing_bytes() {
        assert_eq!(show(b"/caf\xc3\xa9"), "/caf\u{e9}");
        assert_eq!(show(b"/x\ny\xff\x7f"), "/x\\x0ay\\xff\\x7f");
        assert_eq!(hex(b"/\x7f"), "2f7f");
    }

    #[test]
    fn view_of_a_query_target() {
        let mut config = Config::default();
        config.keys.prefix = "p:".into();
        let view = nginx_view(&config, None, b"/a//b%20c?x=1").expect("accepted");
        assert_eq!(view.uri, b"/a/b c");
        assert_eq!(view.value, b"p:/a/b c");
        assert_eq!(view.key, b"p:/a/b%20c");
        config.keys.query = QueryMode::Include;
        let view = nginx_view(&config, None, b"/a?x=1#f").expect("accepted");
        assert_eq!(view.value, b"p:/a?x=1");
        assert_eq!(nginx_view(&config, None, b"/../x"), None);
    }
}
