//! The `mcpage` binary end to end: each test runs the real executable against
//! real memcached and nginx processes (started by `mcpage-tests`), with a
//! config file written for it, and checks its output and exit code.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use mcpage::Config;
use mcpage::ServerSpec;
use mcpage::ring::Hashing;
use mcpage_tests::{INSTALL_HINT, Memcached, Nginx, Stack, free_addr, temp_dir};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// The workspace root (this crate is `crates/mcpage-cli`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    raw_stdout: Vec<u8>,
}

impl Run {
    /// stdout and stderr, for failure messages.
    fn both(&self) -> String {
        format!(
            "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// The stdout line that starts with `prefix`, with runs of spaces collapsed.
    fn line(&self, prefix: &str) -> String {
        self.stdout
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}:\n{}", self.both()))
    }
}

/// Run `mcpage --config CONFIG ARGS...` (with `stdin` when given), in an empty
/// working directory and without `MCPAGE_*` variables from the environment.
fn mcpage(config: &Path, args: &[&str], stdin: Option<&[u8]>) -> Run {
    let cwd = temp_dir("cwd");
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcpage"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(cwd.path())
        .env("RUST_LOG", "off")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MCPAGE_") {
            command.env_remove(name);
        }
    }
    let mut child = command.spawn().expect("run the mcpage binary");
    // Write stdin from a thread: the child may fill its stdout pipe first.
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_vec();
        std::thread::spawn(move || pipe.write_all(&input))
    });
    let output = child.wait_with_output().expect("wait for mcpage");
    if let Some(writer) = writer {
        writer
            .join()
            .expect("stdin writer")
            .expect("write targets to stdin");
    }
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        raw_stdout: output.stdout,
    }
}

/// `config` as a TOML file in `dir`.
fn write_config(dir: &TempDir, name: &str, config: &Config) -> PathBuf {
    config.validate().expect("valid test config");
    let path = dir.path().join(name);
    let text = toml::to_string(config).expect("config as TOML");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn config_for(servers: &[&Memcached]) -> Config {
    let mut config = Config::default();
    config.memcached.servers = servers
        .iter()
        .map(|m| ServerSpec::new(m.address()))
        .collect();
    patient(&mut config);
    config
}

/// Timeouts generous for a loaded CI machine; still far below any test deadline.
fn patient(config: &mut Config) {
    config.memcached.timeout_ms = 2000;
}

/// The first key in memcached that contains `needle`.
fn key_containing(memcached: &Memcached, needle: &str) -> Option<Vec<u8>> {
    memcached
        .keys()
        .into_iter()
        .find(|k| String::from_utf8_lossy(k).contains(needle))
}

// ---------------------------------------------------------------------------
// mcpage nginx
// ---------------------------------------------------------------------------

const EXAMPLES: [&str; 4] = ["single", "shards", "gzip", "unix"];

#[test]
fn nginx_examples_are_current() {
    let root = workspace_root();
    for name in EXAMPLES {
        let toml = root.join(format!("nginx/{name}.toml"));
        let conf = root.join(format!("nginx/{name}.conf"));
        let run = mcpage(&toml, &["nginx"], None);
        assert_eq!(run.code, Some(0), "{}", run.both());
        let checked_in = std::fs::read(&conf)
            .unwrap_or_else(|e| panic!("read {}: {e}; run scripts/render-nginx", conf.display()));
        assert!(
            run.raw_stdout == checked_in,
            "nginx/{name}.conf is not what `mcpage --config nginx/{name}.toml nginx` prints: \
             run scripts/render-nginx and commit the result\n--- rendered now:\n{}",
            run.stdout
        );
    }
}

#[test]
fn nginx_examples_pass_nginx_t() {
    let root = workspace_root();
    for name in EXAMPLES {
        let dir = temp_dir("nginx-t");
        let toml = root.join(format!("nginx/{name}.toml"));
        let prefix_dir = dir.path().to_str().expect("utf-8 temp dir");
        let run = mcpage(
            &toml,
            &["nginx", "--full", "--prefix-dir", prefix_dir],
            None,
        );
        assert_eq!(run.code, Some(0), "{}", run.both());
        assert!(run.stdout.contains("events {"), "{}", run.both());
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, &run.raw_stdout).expect("write nginx.conf");
        let output = Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(format!("{prefix_dir}/"))
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .output()
            .unwrap_or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!("`nginx` is not installed: {INSTALL_HINT}");
                }
                panic!("cannot run nginx -t: {e}");
            });
        assert!(
            output.status.success(),
            "nginx -t rejects the full config of nginx/{name}.toml:\n{}\n--- nginx.conf:\n{}",
            String::from_utf8_lossy(&output.stderr),
            run.stdout
        );
    }
}

#[test]
fn nginx_full_needs_a_prefix_dir() {
    let dir = temp_dir("config");
    let config = write_config(&dir, "mcpage.toml", &Config::default());
    let run = mcpage(&config, &["nginx", "--full"], None);
    assert_eq!(run.code, Some(2), "{}", run.both());
    assert!(run.stderr.contains("--prefix-dir"), "{}", run.both());

    let run = mcpage(&dir.path().join("missing.toml"), &["nginx"], None);
    assert_eq!(run.code, Some(2), "{}", run.both());
    assert!(run.stderr.contains("does not exist"), "{}", run.both());
}

// ---------------------------------------------------------------------------
// mcpage explain
// ---------------------------------------------------------------------------

/// Computes what nginx does per target with the reference model; one JSON
/// object per input line (hex-encoded targets on stdin).
const MODEL_DRIVER: &str = r#"
import json, re, sys
sys.path.insert(0, sys.argv[1])
import nginx_reference as m
cfg = json.loads(sys.argv[2])
prefix = cfg["prefix"].encode()
ring = m.chash_ring([(s.encode(), w) for s, w in cfg["servers"]])
exclude = [re.compile(p.encode()) for p in cfg["exclude"]]
UNRESERVED = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/"
def canonical(t, uri):
    # The raw path spells the $uri exactly: decoding gives it, and no %2F or
    # encoded unreserved character (an independent model of key::is_canonical_path).
    raw = t.split(b"?", 1)[0]
    out = bytearray(); i = 0
    while i < len(raw):
        if raw[i] == 0x25:
            try:
                b = int(raw[i+1:i+3], 16)
            except ValueError:
                return False
            if len(raw[i+1:i+3]) != 2 or b in UNRESERVED:
                return False
            out.append(b); i += 3
        else:
            out.append(raw[i]); i += 1
    return bytes(out) == uri
def wire_len(k):
    return 4 * ((len(k) + 2) // 3) if (any(b <= 0x20 or b == 0x7f for b in k)) else len(k)
out = []
for line in sys.stdin:
    t = bytes.fromhex(line.strip())
    r = {"uri": None, "key": None, "server": None, "cacheable": False, "reason": None}
    try:
        if any(b <= 0x20 or b == 0x7f for b in t):
            raise ValueError("400")
        uri, args = m.nginx_uri_simple(t)
    except ValueError:
        r["reason"] = "bad_request"
        out.append(json.dumps(r)); continue
    try:
        uri2, args2 = m.parse_complex_uri(t)
        assert (uri2, args2) == (uri, args), "the model's two parsers disagree"
    except m.BadRequest:
        raise AssertionError("parse_complex_uri says 400, nginx_uri_simple does not: %r" % t)
    v = prefix + uri
    k = m.memcached_escape(v)
    r["uri"] = uri.hex(); r["key"] = k.hex()
    if args is not None:
        r["reason"] = "query_string"
    elif wire_len(k) > 250:
        r["reason"] = "key_too_long"
    elif not canonical(t, uri):
        r["reason"] = "non_canonical_path"
    elif any(x.search(uri) for x in exclude):
        r["reason"] = "excluded"
    else:
        r["cacheable"] = True
        r["server"] = m.chash_pick(ring, v)[0].decode()
    out.append(json.dumps(r))
sys.stdout.write("\n".join(out) + "\n")
"#;

/// A request target biased towards what normalization and escaping care
/// about. Never a raw CR or LF (one target per line); raw bytes 0x80-0xFF and
/// UTF-8 are included (stdin is read as bytes).
fn generate_target(rng: &mut fastrand::Rng) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"/",
        b"/",
        b"/",
        b"//",
        b".",
        b".",
        b"..",
        b"/..",
        b"/./",
        b"%",
        b"%2e",
        b"%2E",
        b"%2e%2e",
        b"%2F",
        b"%2f",
        b"%25",
        b"%20",
        b"%7F",
        b"%0A",
        b"%00",
        b"%3F",
        b"%23",
        b"%C3%A9",
        b"%c3%a9",
        b"%FF",
        b"%e6%97%a5",
        b"?",
        b"#",
        b"+",
        b"a",
        b"b",
        b"x",
        b"0",
        b"9",
        b"c",
        b"F",
        b"e",
        b"-",
        b"_",
        b"~",
        b"=",
        b"&",
        b"\xc3\xa9",
        b"\xe6\x97\xa5",
        b"private",
    ];
    let mut target = Vec::new();
    if rng.usize(..20) == 0 {
        target.extend_from_slice(b"/private/");
    } else {
        target.push(b'/');
    }
    // Some long ones, around the 250-byte key limit, from tokens that keep
    // nginx from answering 400 and add no query string.
    const LONG: &[&[u8]] = &[
        b"/",
        b"a",
        b"b",
        b"x",
        b"9",
        b".",
        b"%20",
        b"%25",
        b"%2F",
        b"%7F",
        b"%C3%A9",
        b"\xc3\xa9",
        b"\xff",
        b"%0A",
        b"+",
        b"-",
    ];
    if rng.usize(..10) == 0 {
        for _ in 0..60 + rng.usize(..140) {
            target.extend_from_slice(LONG[rng.usize(..LONG.len())]);
        }
        return target;
    }
    for _ in 0..rng.usize(..14) {
        match rng.usize(..24) {
            0 => target.push(rng.u8(0x80..)),
            1 => target.push(b"0123456789abcdefABCDEF"[rng.usize(..22)]),
            2 => {
                let byte = rng.u8(..);
                target.extend_from_slice(format!("%{byte:02X}").as_bytes());
            }
            _ => target.extend_from_slice(TOKENS[rng.usize(..TOKENS.len())]),
        }
    }
    target
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn explain_agrees_with_the_reference_model() {
    let reference = workspace_root().join("reference");
    assert!(
        reference.join("nginx_reference.py").is_file(),
        "the reference model {}/nginx_reference.py is missing (reference/ at the workspace root)",
        reference.display()
    );

    let servers = [
        ("127.0.0.1:11211", 1),
        ("127.0.0.1:11212", 2),
        ("127.0.0.3:11213", 1),
    ];
    let mut config = Config::default();
    config.memcached.servers = servers
        .iter()
        .map(|(address, weight)| ServerSpec::new(*address).weight(*weight))
        .collect();
    config.keys.prefix = "pg:".into();
    config.cache.exclude = vec!["^/private/".into()];
    let dir = temp_dir("explain");
    let config_path = write_config(&dir, "mcpage.toml", &config);

    let mut rng = fastrand::Rng::with_seed(0x6d63_7061_6765);
    let targets: Vec<Vec<u8>> = (0..10_000).map(|_| generate_target(&mut rng)).collect();
    let mut stdin = Vec::new();
    for target in &targets {
        stdin.extend_from_slice(target);
        stdin.push(b'\n');
    }

    // No memcached is running on those ports: explain must not need one.
    let started = Instant::now();
    let run = mcpage(&config_path, &["explain", "--json"], Some(&stdin));
    assert_eq!(run.code, Some(0), "{}", run.both());
    let explain_time = started.elapsed();
    let got: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(got.len(), targets.len(), "one JSON line per target");

    let model_config = serde_json::json!({
        "prefix": config.keys.prefix,
        "servers": servers,
        "exclude": config.cache.exclude,
    });
    let mut python = Command::new("python3")
        .arg("-c")
        .arg(MODEL_DRIVER)
        .arg(&reference)
        .arg(model_config.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 runs the reference model: {e}"));
    let input: String = targets.iter().map(|t| hex(t) + "\n").collect();
    let mut pipe = python.stdin.take().expect("python stdin");
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let output = python.wait_with_output().expect("python3");
    writer.join().expect("writer").expect("write to python3");
    assert!(
        output.status.success(),
        "the reference model failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("model JSON"))
        .collect();
    assert_eq!(expected.len(), targets.len());

    let lossy = |hex_text: &serde_json::Value| -> serde_json::Value {
        match hex_text.as_str() {
            None => serde_json::Value::Null,
            Some(h) => {
                let bytes: Vec<u8> = (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned().into()
            }
        }
    };
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    let mut servers_seen = HashSet::new();
    for ((target, got), want) in targets.iter().zip(&got).zip(&expected) {
        let context = || {
            format!(
                "target {:?} (hex {})\n  mcpage: {got}\n  model:  {want}",
                target.escape_ascii().to_string(),
                hex(target)
            )
        };
        assert_eq!(got["uri"], lossy(&want["uri"]), "uri of {}", context());
        assert_eq!(got["key_hex"], want["key"], "key of {}", context());
        assert_eq!(
            got["key"],
            lossy(&want["key"]),
            "lossy key of {}",
            context()
        );
        assert_eq!(got["server"], want["server"], "server of {}", context());
        assert_eq!(
            got["cacheable"],
            want["cacheable"],
            "cacheable {}",
            context()
        );
        assert_eq!(got["reason"], want["reason"], "reason of {}", context());
        assert_eq!(
            got["target"],
            serde_json::Value::from(String::from_utf8_lossy(target).into_owned()),
            "{}",
            context()
        );
        let reason = want["reason"].as_str().unwrap_or("cacheable").to_owned();
        *reasons.entry(reason).or_default() += 1;
        if let Some(server) = want["server"].as_str() {
            servers_seen.insert(server.to_owned());
        }
    }
    // The generator reaches every outcome and every server.
    for reason in [
        "cacheable",
        "non_canonical_path",
        "bad_request",
        "query_string",
        "key_too_long",
        "excluded",
    ] {
        assert!(
            reasons.get(reason).copied().unwrap_or(0) >= 50,
            "too few `{reason}` targets: {reasons:?}"
        );
    }
    assert_eq!(servers_seen.len(), 3, "{servers_seen:?}");
    eprintln!("10,000 targets explained in {explain_time:?}: {reasons:?}");
}

#[test]
fn explain_prints_aligned_fields_without_memcached() {
    let mut config = Config::default();
    config.keys.prefix = "page:".into();
    config.memcached.servers = vec![ServerSpec::new("127.0.0.1:1")];
    let dir = temp_dir("explain");
    let config_path = write_config(&dir, "mcpage.toml", &config);
    let run = mcpage(
        &config_path,
        &[
            "explain",
            "/a/caf%C3%A9",
            "/a?x=1",
            "/../x",
            "/a//b/../caf%C3%A9",
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.both());
    let blocks: Vec<&str> = run.stdout.split("\n\n").collect();
    assert_eq!(blocks.len(), 4, "{}", run.both());
    // nginx keys the non-canonical spelling the same, but its answer is not stored.
    assert!(
        blocks[3].contains("uri        /a/café")
            && blocks[3].contains("cacheable  no: non_canonical_path"),
        "{}",
        run.both()
    );
    assert_eq!(
        blocks[0],
        "target     /a/caf%C3%A9\n\
         uri        /a/café\n\
         value      page:/a/café\n\
         key        page:/a/café  (13 bytes)\n\
         server     127.0.0.1:1\n\
         cacheable  yes"
    );
    assert!(
        blocks[1].contains("key        page:/a  (7 bytes)")
            && blocks[1].contains("server     -")
            && blocks[1].contains("cacheable  no: query_string"),
        "{}",
        run.both()
    );
    assert!(
        blocks[2].contains("uri        -") && blocks[2].contains("cacheable  no: bad_request"),
        "{}",
        run.both()
    );

    // Targets from stdin, JSON out: nulls where nginx answers 400.
    let run = mcpage(
        &config_path,
        &["explain", "--json"],
        Some(b"/../x\r\n\n/x%20y\n"),
    );
    assert_eq!(run.code, Some(0), "{}", run.both());
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({"target": "/../x", "uri": null, "key": null, "key_hex": null,
                "server": null, "cacheable": false, "reason": "bad_request"}),
            serde_json::json!({"target": "/x%20y", "uri": "/x y", "key": "page:/x%20y",
                "key_hex": hex(b"page:/x%20y"), "server": "127.0.0.1:1", "cacheable": true,
                "reason": null}),
        ]
    );
}

// ---------------------------------------------------------------------------
// mcpage invalidate
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_reports_what_it_removed() {
    let stack = Stack::builder().config(patient).start().await;
    let (memcached, cache) = (&stack.memcached()[0], stack.cache());
    let dir = temp_dir("invalidate");
    let config_path = write_config(&dir, "mcpage.toml", stack.config());
    for (target, tags) in [
        ("/a", &["t1"][..]),
        ("/b", &["t1", "t2"][..]),
        ("/c/1", &[][..]),
        ("/c/2", &[][..]),
        ("/d", &["t3"][..]),
    ] {
        cache
            .store_page(target, format!("page {target}"), tags.iter().copied())
            .await
            .expect("store");
    }

    let run = mcpage(
        &config_path,
        &[
            "invalidate",
            "--tag",
            "t1",
            "--tag",
            "t2",
            "--url",
            "/c//1",
            "--url",
            "/nope",
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.both());
    assert_eq!(run.line("tag t1"), "tag t1 2 pages", "{}", run.both());
    assert_eq!(run.line("tag t2"), "tag t2 1 page", "{}", run.both());
    assert_eq!(run.line("url /c//1"), "url /c//1 1 page", "{}", run.both());
    assert_eq!(run.line("url /nope"), "url /nope 0 pages", "{}", run.both());
    assert_eq!(run.line("removed"), "removed 3 pages", "{}", run.both());
    for key in ["/a", "/b", "/c/1"] {
        assert_eq!(memcached.get_raw(key.as_bytes()), None, "{key} is gone");
    }
    assert!(memcached.get_raw(b"/c/2").is_some(), "/c/2 stays");

    let run = mcpage(&config_path, &["invalidate", "--prefix", "/c/"], None);
    assert_eq!(run.code, Some(0), "{}", run.both());
    assert_eq!(
        run.line("prefix /c/"),
        "prefix /c/ 1 page",
        "{}",
        run.both()
    );
    assert_eq!(run.line("removed"), "removed 1 page", "{}", run.both());
    assert_eq!(memcached.get_raw(b"/c/2"), None);
    assert!(memcached.get_raw(b"/d").is_some(), "/d stays");

    // Usage errors: nothing to do, or a URL that never has a page.
    let run = mcpage(&config_path, &["invalidate"], None);
    assert_eq!(run.code, Some(2), "{}", run.both());
    assert!(
        run.stderr.contains("nothing to invalidate"),
        "{}",
        run.both()
    );
    let run = mcpage(&config_path, &["invalidate", "--url", "/a?x=1"], None);
    assert_eq!(run.code, Some(2), "{}", run.both());
    assert!(run.stderr.contains("query_string"), "{}", run.both());

    // memcached down: not confirmed, exit 1, the error named.
    memcached.stop();
    let run = mcpage(
        &config_path,
        &["invalidate", "--tag", "t3", "--wait", "0"],
        None,
    );
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert_eq!(run.line("tag t3"), "tag t3 not confirmed", "{}", run.both());
    assert!(
        run.stderr.contains("not confirmed") && run.stderr.contains(&memcached.address()),
        "{}",
        run.both()
    );
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "one line per failure: {}",
        run.both()
    );
}

// ---------------------------------------------------------------------------
// mcpage stats
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reports_servers_index_evictions_and_outages() {
    let stack = Stack::builder()
        // A tiny index server that has to evict.
        .index_server(&["-m", "2"])
        .config(patient)
        .start()
        .await;
    let (pages, index, cache) = (&stack.memcached()[0], stack.index(), stack.cache());
    let dir = temp_dir("stats");
    let config_path = write_config(&dir, "mcpage.toml", stack.config());
    for n in 0..3 {
        cache
            .store_page(&format!("/p/{n}"), "<p>page</p>", ["all", "p"])
            .await
            .expect("store");
    }
    pages.get_raw(b"/p/0").expect("stored");
    pages.get_raw(b"/nothing");

    let run = mcpage(&config_path, &["stats"], None);
    assert_eq!(run.code, Some(0), "{}", run.both());
    let page_row = run.line(&pages.address());
    assert!(
        page_row.starts_with(&format!("{} pages 3 ", pages.address())),
        "{}",
        run.both()
    );
    assert!(page_row.contains("50.0%"), "1 hit, 1 miss: {}", run.both());
    assert!(run.stdout.contains("tag index"), "{}", run.both());
    // Two tags, one shard each for these pages at most per page.
    let json = mcpage(&config_path, &["stats", "--json"], None);
    assert_eq!(json.code, Some(0), "{}", json.both());
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(report["servers"][0]["items"], 3, "{report}");
    assert_eq!(report["servers"][0]["hit_ratio"], 0.5, "{report}");
    assert_eq!(report["servers"][1]["role"], "index", "{report}");
    assert!(
        report["index"][0]["items"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");

    // Fill the index server until it evicts: invalidation can no longer be complete.
    let filler = vec![b'x'; 100_000];
    for n in 0..60 {
        index.set_raw(format!("filler{n}").as_bytes(), 0, &filler);
    }
    let run = mcpage(&config_path, &["stats"], None);
    assert_eq!(run.code, Some(3), "{}", run.both());
    assert!(
        run.stderr
            .contains("invalidation can no longer be complete: run the index pool with -M and purge_prefix('/')"),
        "{}",
        run.both()
    );

    // A server that is down is reported, not a crash.
    index.stop();
    let run = mcpage(&config_path, &["stats"], None);
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert!(
        run.line(&index.address()).contains("DOWN"),
        "{}",
        run.both()
    );
    assert!(
        run.line(&pages.address()).contains("pages 3"),
        "{}",
        run.both()
    );
    assert!(run.stderr.contains("is down"), "{}", run.both());
}

// ---------------------------------------------------------------------------
// mcpage check
// ---------------------------------------------------------------------------

/// Two memcached servers and a config for them; nginx's listen/app on free ports.
fn check_setup() -> (Memcached, Memcached, Config) {
    let a = Memcached::start();
    let b = Memcached::start();
    let mut config = config_for(&[&a, &b]);
    config.nginx.listen = free_addr();
    // Nothing listens there: a miss becomes a 502 from nginx, which is fine.
    config.nginx.app = free_addr();
    (a, b, config)
}

fn check(config: &Config, nginx_address: &str) -> Run {
    let dir = temp_dir("check");
    let path = write_config(&dir, "mcpage.toml", config);
    let url = format!("http://{nginx_address}");
    mcpage(&path, &["check", "--url", &url], None)
}

/// No probe is left behind on any server.
#[track_caller]
fn assert_no_probes(servers: &[&Memcached]) {
    for server in servers {
        assert_eq!(
            key_containing(server, "mcpage-probe"),
            None,
            "{}",
            server.address()
        );
    }
}

#[test]
fn check_says_hit_for_a_correct_setup() {
    let (a, b, config) = check_setup();
    let nginx = Nginx::start(&config);
    let run = check(&config, nginx.address());
    assert_eq!(run.code, Some(0), "{}", run.both());
    assert!(
        run.stdout
            .starts_with("HIT: nginx serves pages from memcached; key `/mcpage-probe-"),
        "{}",
        run.both()
    );
    assert!(!run.stderr.contains("WARNING"), "{}", run.both());
    assert_no_probes(&[&a, &b]);
}

/// memcached on unix sockets: `check` writes each probe over the socket
/// nginx reads it from.
#[test]
fn check_says_hit_over_unix_sockets() {
    let a = Memcached::start_unix(&[]);
    let b = Memcached::start_unix(&[]);
    let mut config = config_for(&[&a, &b]);
    config.nginx.listen = free_addr();
    config.nginx.app = free_addr();
    assert!(config.memcached.servers[0].address.starts_with("unix:/"));
    let nginx = Nginx::start(&config);
    let run = check(&config, nginx.address());
    assert_eq!(run.code, Some(0), "{}", run.both());
    assert!(run.stdout.starts_with("HIT: "), "{}", run.both());
    assert_no_probes(&[&a, &b]);
}

#[test]
fn check_finds_a_prefix_mismatch() {
    let (a, b, config) = check_setup();
    let mut nginx_side = config.clone();
    nginx_side.keys.prefix = "old:".into();
    let nginx = Nginx::start(&nginx_side);
    let run = check(&config, nginx.address());
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert!(
        run.stdout
            .contains("nginx asked for another key: prefix mismatch"),
        "{}",
        run.both()
    );
    assert_no_probes(&[&a, &b]);
}

#[test]
fn check_finds_a_different_ring() {
    let (a, b, mut config) = check_setup();
    // Plain `hash`: the position on the server list decides, so the reversed
    // list makes nginx ask the other server for every key.
    config.memcached.hashing = Hashing::Modulo;
    let mut nginx_side = config.clone();
    nginx_side.memcached.servers.reverse();
    let nginx = Nginx::start(&nginx_side);
    let run = check(&config, nginx.address());
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert!(
        run.stdout
            .contains("wrong server on the ring: nginx asked ")
            && run
                .stdout
                .contains("(servers, weights or hashing differ between nginx and mcpage.toml"),
        "{}",
        run.both()
    );
    assert_no_probes(&[&a, &b]);
}

#[test]
fn check_sees_nginx_not_asking_memcached() {
    let (a, b, config) = check_setup();
    let listen = config.nginx.listen.clone();
    let nginx = Nginx::start_with(&listen, |dir| {
        let d = dir.display();
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen {listen};\n    location / {{ return 200 \"the app\\n\"; }}\n  }}\n}}\n"
        )
    });
    let run = check(&config, &listen);
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert!(
        run.stdout.contains(
            "nginx did not ask memcached (is the mcpage location/config included? bypass rules?)"
        ),
        "{}",
        run.both()
    );
    assert_no_probes(&[&a, &b]);
    drop(nginx);
}

#[test]
fn check_warns_without_a_keepalive_pool() {
    let (a, b, mut config) = check_setup();
    config.nginx.keepalive = 77;
    let listen = config.nginx.listen.clone();
    let rendered = config.clone();
    let _nginx = Nginx::start_with(&listen, |dir| {
        let text = mcpage::nginx::render_nginx_full(&rendered, dir);
        assert!(text.contains("    keepalive 77;\n"), "{text}");
        text.replace("    keepalive 77;\n", "")
    });
    let run = check(&config, &listen);
    assert_eq!(run.code, Some(0), "still a hit: {}", run.both());
    assert!(run.stdout.starts_with("HIT: "), "{}", run.both());
    assert!(
        run.stderr.contains(
            "no keepalive pool to memcached: every hit opens a TCP connection (4x fewer requests, p99 70-200 ms)"
        ),
        "{}",
        run.both()
    );
    assert_no_probes(&[&a, &b]);
}

#[test]
fn check_fails_clearly_when_nginx_or_memcached_is_not_there() {
    let (a, b, config) = check_setup();
    let run = check(&config, &free_addr());
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert!(run.stderr.contains("cannot connect to"), "{}", run.both());
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.both());
    assert_no_probes(&[&a, &b]);

    // A page server that is down: named, in one line, and nothing left behind.
    b.stop();
    let run = check(&config, &free_addr());
    assert_eq!(run.code, Some(1), "{}", run.both());
    assert!(run.stderr.contains(&b.address()), "{}", run.both());
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.both());
    assert_no_probes(&[&a]);
}
