//! The nginx side, rendered from the one [`Config`] so the two sides cannot drift.
//!
//! [`render_nginx_config`] gives the `http {}`-level include (upstreams, the
//! bypass maps, the log format and the server block); [`render_nginx_full`]
//! wraps it into a complete `nginx.conf` that keeps every file under one
//! directory (tests, local runs).
//!
//! What the rendered server does (reference/nginx-memcached.md §3, §4, §8):
//!
//! - `location /` looks the page up in memcached under
//!   `set $memcached_key "<prefix>$uri";` (or `$host$uri`, `?$args` variants).
//! - Requests the layer would never cache go straight to the app, before
//!   memcached is asked (`$mcpage_bypass`, see below): any method but GET/HEAD
//!   (nginx would answer them 405), a session cookie, an `Authorization`
//!   header, a query string (query mode `bypass`), a host that is not one of
//!   `cache.allowed_hosts` (every mode), an escaped key longer than memcached's 250 bytes (the layer
//!   never stores one; asking for it would make memcached answer
//!   `CLIENT_ERROR` and nginx take that server out of the ring for
//!   `fail_timeout`). They are sent with `return 418` to `error_page 418 =
//!   @mcpage_app`, which keeps the method and the request body.
//! - A miss (404), memcached down or an invalid answer (502), and a memcached
//!   timeout (504) fall back to `@mcpage_app`.
//! - Hits carry `X-Cache: HIT`, `default_type` (the first cached content type)
//!   with `charset`; responses from the app pass through unchanged (including
//!   their own `X-Cache`).
//! - `/_mcpage/` (the proxy's admin paths) is never cached and only reachable
//!   from loopback.
//! - Request headers outside the key cannot shape a cached page: nginx sends
//!   the app a `Host` it chose (the first allowed name for cacheable requests
//!   without `keys.host`, `$host` with it; the port only when it is not 80 or
//!   443), the same as `X-Forwarded-Host`, `X-Forwarded-For` and `X-Real-IP`
//!   from the connection, `X-Forwarded-Proto` from `$scheme`, and clears every
//!   header of [`UNKEYED_HEADERS`](crate::UNKEYED_HEADERS) (`X-Original-URL`,
//!   `Forwarded`, `X-HTTP-Method-Override`, ...).
//!
//! The access log format `mcpage` (not switched on by the include: add
//! `access_log /var/log/nginx/mcpage.log mcpage;` to the server or http level;
//! [`render_nginx_full`] does) writes one line per request:
//!
//! ```text
//! 127.0.0.1 [26/Nov/2026:14:30:00 +0000] "GET /about HTTP/1.1" 200 5123 cache=HIT bypass=- upstream=127.0.0.1:11211 upstream_status=200 rt=0.000 urt=0.000 "curl/8.0"
//! ```
//!
//! `cache=` is one of
//! - `HIT`: served from memcached;
//! - `MISS`: memcached said "not found", the app answered;
//! - `BYPASS`: sent to the app without asking memcached; `bypass=` names why
//!   (`method`, `cookie`, `authorization`, `query`, `host`, `long_key`);
//! - `ERROR`: memcached failed (refused, timeout, invalid answer), the app
//!   answered;
//! - `ADMIN`: a `/_mcpage/` request (`bypass=` then shows the rule that would
//!   have applied, e.g. `method` for a POST);
//! - `-`: anything else (a 400 before any location, say).
//!
//! `grep ' cache=MISS '` finds the misses; `upstream_status` shows both hops
//! (`404 : 200` is a miss answered by the app).

use std::fmt::Write as _;
use std::path::Path;

use crate::config::Config;
use crate::hit::{HIT_TYPES, HitTypes};
use crate::key::{MAX_KEY_LEN, QueryMode};
use crate::ring::Hashing;

/// Name of the memcached upstream in the rendered config.
const MEMCACHED_UPSTREAM: &str = "mcpage_memcached";
/// Name of the application upstream in the rendered config.
const APP_UPSTREAM: &str = "mcpage_app";

/// The `http {}`-level include: upstreams `mcpage_memcached` and `mcpage_app`,
/// the `$mcpage_bypass` and `$mcpage_cache` maps, `log_format mcpage` and the
/// server block. See the module documentation for what it does.
///
/// `config` should have passed [`Config::validate`]; the key prefix may
/// contain `$`, which is rendered through a `geo $mcpage_dollar` literal (nginx
/// has no escape for `$` in a string).
pub fn render_nginx_config(config: &Config) -> String {
    let mut out = String::new();
    out.push_str(
        "# Rendered by mcpage from its configuration: do not edit, re-render it\n\
         # (`mcpage nginx`) so nginx and the application compute the same keys.\n\n",
    );
    render_upstreams(&mut out, config);
    render_bypass_maps(&mut out, config);
    render_log_format(&mut out);
    render_server(&mut out, config);
    out
}

/// A complete `nginx.conf` around [`render_nginx_config`] that runs without
/// root and touches nothing outside `prefix_dir`: pid, lock file, error and
/// access logs and every temp path live there; `worker_processes 1`,
/// `worker_connections 4096`; a small inline `types` table (no `include
/// mime.types`, whose path differs per machine). `daemon`/`master_process`
/// are left to the command line:
///
/// ```text
/// nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'
/// ```
///
/// Started as root, nginx runs its workers as its built-in user (`nobody`)
/// and creates the temp directories itself, owned by that user; `prefix_dir`
/// then only needs to be traversable by it.
pub fn render_nginx_full(config: &Config, prefix_dir: &Path) -> String {
    let path = |name: &str| quote(&prefix_dir.join(name).to_string_lossy());
    let mut out = String::new();
    out.push_str("# Rendered by mcpage: a self-contained nginx.conf (see `render_nginx_full`).\n");
    out.push_str("worker_processes 1;\n");
    // The regexes left in the maps (method, query, key length), JIT-compiled:
    // 3 % fewer nginx instructions per hit (callgrind, nginx 1.22).
    out.push_str("pcre_jit on;\n");
    let _ = writeln!(out, "pid {};", path("nginx.pid"));
    let _ = writeln!(out, "lock_file {};", path("nginx.lock"));
    let _ = writeln!(out, "error_log {} warn;", path("error.log"));
    out.push_str("\nevents {\n    worker_connections 4096;\n}\n\nhttp {\n");
    render_types(&mut out, "    ");
    out.push_str("    default_type application/octet-stream;\n");
    for (directive, dir) in [
        ("client_body_temp_path", "client_body_temp"),
        ("proxy_temp_path", "proxy_temp"),
        ("fastcgi_temp_path", "fastcgi_temp"),
        ("uwsgi_temp_path", "uwsgi_temp"),
        ("scgi_temp_path", "scgi_temp"),
    ] {
        let _ = writeln!(out, "    {directive} {};", path(dir));
    }
    out.push_str("    sendfile on;\n    tcp_nodelay on;\n    keepalive_timeout 65s;\n    server_tokens off;\n\n");
    for line in render_nginx_config(config).lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "    {line}");
        }
    }
    // After the include: `log_format mcpage` must be defined before it is used.
    let _ = writeln!(out, "\n    access_log {} mcpage;", path("access.log"));
    out.push_str("}\n");
    out
}

/// A `types { ... }` block at `indent`.
fn render_types(out: &mut String, indent: &str) {
    let _ = writeln!(out, "{indent}types {{");
    for (media_type, extensions) in HIT_TYPES {
        let _ = writeln!(out, "{indent}    {media_type} {};", extensions.join(" "));
    }
    let _ = writeln!(out, "{indent}}}");
}

fn render_upstreams(out: &mut String, config: &Config) {
    let _ = writeln!(out, "upstream {MEMCACHED_UPSTREAM} {{");
    match config.memcached.hashing {
        Hashing::Consistent => out.push_str("    hash $memcached_key consistent;\n"),
        Hashing::Modulo => out.push_str("    hash $memcached_key;\n"),
    }
    for server in &config.memcached.servers {
        // The text after `server` is what nginx hashes: exactly the configured address.
        if server.weight == 1 {
            let _ = writeln!(out, "    server {};", server.address);
        } else {
            let _ = writeln!(
                out,
                "    server {} weight={};",
                server.address, server.weight
            );
        }
    }
    // After the balancing method, as nginx requires.
    let _ = writeln!(out, "    keepalive {};", config.nginx.keepalive);
    // nginx closes a pooled connection after 1000 requests by default: at tens
    // of thousands of hits per second that is a new memcached connection every
    // few milliseconds (seen in scripts/bench). memcached has no such limit.
    out.push_str("    keepalive_requests 1000000;\n");
    out.push_str("}\n\n");
    let _ = writeln!(out, "upstream {APP_UPSTREAM} {{");
    let _ = writeln!(out, "    server {};", config.nginx.app);
    out.push_str("    keepalive 64;\n}\n\n");
}

/// One `0`/`1` map per rule, combined into `$mcpage_bypass`: empty when the
/// request may be answered from memcached, else the first reason.
fn render_bypass_maps(out: &mut String, config: &Config) {
    let mut rules: Vec<(&str, &str)> = Vec::new();

    out.push_str(
        "# Requests the application never caches go to it without asking memcached.\n\
         # Methods are case-sensitive (a string key in a map would not be).\n\
         map $request_method $mcpage_bypass_method {\n    default 1;\n    \"~^(?:GET|HEAD)$\" 0;\n}\n\n",
    );
    rules.push(("$mcpage_bypass_method", "method"));

    let names: Vec<String> = config
        .cache
        .session_cookies
        .iter()
        .filter(|name| !name.is_empty())
        .map(|name| regex_escape(name))
        .collect();
    if !names.is_empty() {
        // A cookie NAME, exactly: after the start or a `;`, before `=`, `;` or the end
        // (the layer also treats a bare `sessionid` as a session cookie).
        let regex = format!("~(?:^|;)\\s*(?:{})\\s*(?:=|;|$)", names.join("|"));
        // Not `quote`: nginx keeps `\s`, `\xHH` as they are, so the regex stays readable.
        // No Cookie header at all (most anonymous requests): an exact key, no regex run.
        let _ = writeln!(
            out,
            "map $http_cookie $mcpage_bypass_cookie {{\n    default 0;\n    \"\" 0;\n    \"{regex}\" 1;\n}}\n"
        );
        rules.push(("$mcpage_bypass_cookie", "cookie"));
    }

    out.push_str("map $http_authorization $mcpage_bypass_authorization {\n    default 1;\n    \"\" 0;\n}\n\n");
    rules.push(("$mcpage_bypass_authorization", "authorization"));

    if config.keys.query == QueryMode::Bypass {
        // `$args` is empty for `/a?`, which the layer does not cache either: look for the raw `?`.
        out.push_str(
            "map $request_uri $mcpage_bypass_query {\n    default 0;\n    \"~\\?\" 1;\n}\n\n",
        );
        rules.push(("$mcpage_bypass_query", "query"));
    }

    // Only the site's own names are cached (`$host`: lowercase, no port).
    out.push_str("map $host $mcpage_bypass_host {\n    default 1;\n");
    for host in &config.cache.allowed_hosts {
        let _ = writeln!(out, "    {} 0;", quote(&host.to_ascii_lowercase()));
    }
    out.push_str("}\n\n");
    rules.push(("$mcpage_bypass_host", "host"));

    // A key memcached refuses (`CLIENT_ERROR`, 502) would also make nginx count
    // a failure against that server and skip it for `fail_timeout` (10 s): one
    // long URL from any client would move a whole server's pages. The layer
    // never stores such keys, so nginx does not ask for them.
    let _ = writeln!(
        out,
        "# The escaped key would exceed memcached's {MAX_KEY_LEN} bytes: never cached, never asked.\n\
         map $memcached_key $mcpage_bypass_long_key {{\n    default 0;\n    \"~{}\" 1;\n}}\n",
        long_key_regex()
    );
    rules.push(("$mcpage_bypass_long_key", "long_key"));

    let source: String = rules.iter().map(|(var, _)| *var).collect();
    // A cacheable request (all zeros) is an exact key: nginx runs no regex for it.
    let _ = writeln!(
        out,
        "map \"{source}\" $mcpage_bypass {{\n    default \"\";\n    \"{}\" \"\";",
        "0".repeat(rules.len())
    );
    for (i, (_, reason)) in rules.iter().enumerate() {
        let _ = writeln!(out, "    \"~^{}1\" {reason};", ".".repeat(i));
    }
    out.push_str("}\n\n");
    out.push_str(
        "map $mcpage_bypass $mcpage_bypass_log {\n    \"\" -;\n    default $mcpage_bypass;\n}\n\n",
    );

    // The Host the app sees. A cacheable request gets one nginx chose, never
    // the client's: the key has no port and (without `keys.host`) no host, so
    // a page rendered for `Host: example.com:6666` or another allowed name
    // would be served to everyone. Bypassed requests keep theirs.
    let canonical = if config.keys.host {
        "$host".to_owned()
    } else {
        config
            .cache
            .allowed_hosts
            .first()
            .map_or_else(|| "$host".to_owned(), |h| h.to_ascii_lowercase())
    };
    let _ = writeln!(
        out,
        "map $server_port $mcpage_port {{\n    default \":$server_port\";\n    80 \"\";\n    443 \"\";\n}}\n\n\
         map $mcpage_bypass $mcpage_upstream_host {{\n    default $http_host;\n    \"\" {};\n}}\n",
        quote(&format!("{canonical}$mcpage_port"))
    );

    // For the log: what happened to the request (see the module docs). Exact
    // keys, so that a hit costs no regex: the route, then whether it bypassed
    // memcached, then what memcached answered ("404 : 200" when the app
    // rendered the miss).
    out.push_str(
        "map $mcpage_route $mcpage_cache {\n    \
         default -;\n    \
         admin ADMIN;\n    \
         cache $mcpage_cache_asked;\n}\n\n\
         map $mcpage_bypass $mcpage_cache_asked {\n    \
         default BYPASS;\n    \
         \"\" $mcpage_cache_answer;\n}\n\n\
         map $upstream_status $mcpage_cache_answer {\n    \
         default ERROR;\n    \
         200 HIT;\n    \
         206 HIT;\n    \
         304 HIT;\n    \
         \"~^404\" MISS;\n}\n\n",
    );
}

fn render_log_format(out: &mut String) {
    out.push_str(
        "log_format mcpage '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent '\n    \
         'cache=$mcpage_cache bypass=$mcpage_bypass_log upstream=$upstream_addr '\n    \
         'upstream_status=$upstream_status rt=$request_time urt=$upstream_response_time '\n    \
         '\"$http_user_agent\"';\n\n",
    );
}

fn render_server(out: &mut String, config: &Config) {
    let timeout = config.memcached.timeout_ms.max(1000);
    let timeout = if timeout % 1000 == 0 {
        format!("{}s", timeout / 1000)
    } else {
        format!("{timeout}ms")
    };
    let (key, needs_dollar) = memcached_key(config);
    if needs_dollar {
        // nginx has no escape for `$` in a string with variables: use a literal from geo.
        out.push_str("geo $mcpage_dollar {\n    default \"$\";\n}\n\n");
    }

    let hit_types = HitTypes::new(&config.cache.content_types, &config.nginx.charset);
    let charset_types: Vec<String> = hit_types
        .rendered_charset_types()
        .iter()
        .map(|t| quote(t))
        .collect();

    out.push_str("server {\n");
    let _ = writeln!(out, "    listen {};", config.nginx.listen);
    let names: Vec<String> = config
        .cache
        .allowed_hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    let _ = writeln!(out, "    server_name {};", names.join(" "));
    let _ = writeln!(
        out,
        "    merge_slashes {};",
        if config.keys.merge_slashes {
            "on"
        } else {
            "off"
        }
    );
    // Defaults for every request, so the log never reads an unset variable.
    out.push_str("    set $mcpage_route \"\";\n    set $memcached_key \"\";\n\n");

    out.push_str("    location / {\n");
    out.push_str("        set $mcpage_route cache;\n");
    // Before the bypass check: `$mcpage_bypass_long_key` reads it.
    let _ = writeln!(out, "        set $memcached_key {key};");
    out.push_str("        error_page 418 = @mcpage_app;\n");
    out.push_str("        if ($mcpage_bypass) {\n            return 418;\n        }\n");
    let _ = writeln!(out, "        memcached_pass {MEMCACHED_UPSTREAM};");
    let _ = writeln!(
        out,
        "        memcached_buffer_size {};",
        config.nginx.buffer_size
    );
    for which in ["connect", "send", "read"] {
        let _ = writeln!(out, "        memcached_{which}_timeout {timeout};");
    }
    // Not `not_found`: on a ring that would ask a second server on every miss.
    out.push_str("        memcached_next_upstream error timeout;\n");
    if config.cache.gzip {
        let _ = writeln!(
            out,
            "        memcached_gzip_flag {};",
            config.cache.gzip_flag
        );
        out.push_str("        gunzip on;\n        gzip_vary on;\n");
    }
    // The hit's Content-Type comes from these alone (see `HitTypes`).
    render_types(out, "        ");
    let _ = writeln!(
        out,
        "        default_type {};",
        quote(hit_types.default_type())
    );
    let _ = writeln!(out, "        charset {};", quote(&config.nginx.charset));
    if !charset_types.is_empty() {
        let _ = writeln!(out, "        charset_types {};", charset_types.join(" "));
    }
    out.push_str("        add_header X-Cache HIT;\n");
    // RFC 9211: the layer answers misses and bypasses with its own.
    out.push_str("        add_header Cache-Status \"mcpage; hit\";\n");
    // The layer stores only responses that carry exactly these (policy.rs).
    for (name, value) in &config.nginx.add_headers {
        let _ = writeln!(out, "        add_header {name} {} always;", quote(value));
    }
    out.push_str("        error_page 404 502 504 = @mcpage_app;\n");
    out.push_str("    }\n\n");

    out.push_str("    location @mcpage_app {\n");
    render_proxy(out);
    out.push_str("    }\n\n");

    out.push_str("    # The proxy's admin paths: never cached, loopback only.\n");
    out.push_str("    location /_mcpage/ {\n");
    out.push_str("        set $mcpage_route admin;\n");
    out.push_str("        allow 127.0.0.1;\n        allow ::1;\n        deny all;\n");
    render_proxy(out);
    out.push_str("    }\n}\n");
}

/// No URI part on `proxy_pass`: the app sees the raw request target (the
/// layer stores only canonical ones). Every header outside the key that apps
/// read to shape a page is set by nginx or cleared (see the module docs).
fn render_proxy(out: &mut String) {
    let _ = writeln!(out, "        proxy_pass http://{APP_UPSTREAM};");
    out.push_str(
        "        proxy_http_version 1.1;\n        \
         proxy_set_header Connection \"\";\n        \
         proxy_set_header Host $mcpage_upstream_host;\n        \
         proxy_set_header X-Forwarded-Host $mcpage_upstream_host;\n        \
         proxy_set_header X-Forwarded-For $remote_addr;\n        \
         proxy_set_header X-Forwarded-Proto $scheme;\n        \
         proxy_set_header X-Forwarded-Port $server_port;\n        \
         proxy_set_header X-Real-IP $remote_addr;\n",
    );
    for name in crate::policy::UNKEYED_HEADERS {
        let _ = writeln!(out, "        proxy_set_header {} \"\";", header_case(name));
    }
}

/// `x-original-url` as `X-Original-URL` (nginx does not care; readers do).
fn header_case(name: &str) -> String {
    name.split('-')
        .map(|word| match word {
            "url" | "uri" | "http" | "ssl" => word.to_ascii_uppercase(),
            _ => {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The quoted value of `set $memcached_key`, and whether it uses `$mcpage_dollar`.
fn memcached_key(config: &Config) -> (String, bool) {
    let mut key = String::from("\"");
    let mut needs_dollar = false;
    for c in config.keys.prefix.chars() {
        match c {
            '$' => {
                key.push_str("${mcpage_dollar}");
                needs_dollar = true;
            }
            '"' | '\\' => {
                key.push('\\');
                key.push(c);
            }
            _ => key.push(c),
        }
    }
    if config.keys.host {
        key.push_str("$host");
    }
    key.push_str("$uri");
    if config.keys.query == QueryMode::Include {
        key.push_str("?$args");
    }
    key.push('"');
    (key, needs_dollar)
}

/// A PCRE (byte mode, as nginx compiles it) matching exactly the values `V`
/// whose escaped key `K` is longer than [`MAX_KEY_LEN`]: `len(K) = n + 2e`
/// for `n` bytes of which `e` are escaped by nginx (0x00-0x20 and `%`).
///
/// Nested: "at least `j` escapes, and `n >= 251 - 2j`, or at least `j + 1`
/// escapes and ...", down to 84 escapes (which with `n >= 84` always exceed
/// the limit). `(?1)` skips to the next escaped byte; values shorter than 84
/// bytes (at most 249 escaped) fail at the first check. The pattern has to
/// stay under nginx's 4096-byte limit for one configuration token.
fn long_key_regex() -> String {
    let limit = MAX_KEY_LEN + 1;
    // Escapes needed for a value of the shortest possible length to exceed the limit.
    let max_escapes = limit.div_ceil(3);
    let mut regex = format!("(?s)^(?=.{{{max_escapes}}})");
    for j in 0..max_escapes {
        let _ = write!(regex, "(?:(?=.{{{}}})|(?=(?1){{{}}})", limit - 2 * j, j + 1);
    }
    regex.push_str(&")".repeat(max_escapes));
    regex.push_str("(?(DEFINE)([^\\x00-\\x20%]*+[\\x00-\\x20%]))");
    regex
}

/// A double-quoted nginx string (no variables are expected in it).
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A PCRE pattern matching `text` literally: letters, digits, `_` and `-` as
/// they are, every other byte as `\xHH`, which also survives nginx's own
/// string unescaping.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::config::ServerSpec;

    fn default_config() -> Config {
        Config::default()
    }

    fn modulo_config() -> Config {
        let mut config = Config::default();
        config.memcached.servers = vec![
            ServerSpec::new("127.0.0.1:11211"),
            ServerSpec::new("127.0.0.1:11212").weight(2),
            ServerSpec::new("127.0.0.3:11213").weight(3),
        ];
        config.memcached.hashing = Hashing::Modulo;
        config
    }

    fn query_config() -> Config {
        let mut config = Config::default();
        config.keys.query = QueryMode::Include;
        config.keys.prefix = "page:".into();
        config
    }

    fn host_config() -> Config {
        let mut config = Config::default();
        config.keys.host = true;
        config.cache.allowed_hosts = vec!["example.com".into(), "www.example.com".into()];
        config
    }

    fn gzip_config() -> Config {
        let mut config = Config::default();
        config.cache.gzip = true;
        config.cache.gzip_flag = 4;
        config.cache.content_types = vec!["text/html".into(), "application/json".into()];
        config.cache.session_cookies = vec!["sessionid".into(), "remember.me".into(), "a$b".into()];
        config.keys.prefix = "p$x\\:".into();
        config.memcached.timeout_ms = 2500;
        config.nginx.buffer_size = "128k".into();
        config.nginx.keepalive = 64;
        config.keys.merge_slashes = false;
        config.nginx.add_headers = vec![
            ("X-Frame-Options".into(), "DENY".into()),
            (
                "Content-Security-Policy".into(),
                "default-src 'self'; img-src \"data:\"".into(),
            ),
        ];
        config
    }

    fn all_configs() -> Vec<(&'static str, Config)> {
        vec![
            ("default", default_config()),
            ("modulo", modulo_config()),
            ("query", query_config()),
            ("host", host_config()),
            ("gzip", gzip_config()),
        ]
    }

    #[track_caller]
    fn assert_has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l.trim() == line),
            "missing line `{line}` in:\n{text}"
        );
    }

    #[track_caller]
    fn assert_lacks(text: &str, needle: &str) {
        assert!(!text.contains(needle), "unexpected `{needle}` in:\n{text}");
    }

    #[test]
    fn the_configs_are_valid() {
        for (name, config) in all_configs() {
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn renders_default_config() {
        let text = render_nginx_config(&default_config());
        for line in [
            "upstream mcpage_memcached {",
            "hash $memcached_key consistent;",
            "server 127.0.0.1:11211;",
            "keepalive 512;",
            "keepalive_requests 1000000;",
            "upstream mcpage_app {",
            "server 127.0.0.1:8081;",
            "keepalive 64;",
            "listen 127.0.0.1:8080;",
            "merge_slashes on;",
            "set $memcached_key \"$uri\";",
            "memcached_pass mcpage_memcached;",
            "memcached_buffer_size 64k;",
            "memcached_connect_timeout 1s;",
            "memcached_read_timeout 1s;",
            "memcached_send_timeout 1s;",
            "memcached_next_upstream error timeout;",
            "default_type \"text/html\";",
            "charset \"utf-8\";",
            "add_header X-Cache HIT;",
            "add_header Cache-Status \"mcpage; hit\";",
            "error_page 404 502 504 = @mcpage_app;",
            "error_page 418 = @mcpage_app;",
            "if ($mcpage_bypass) {",
            "return 418;",
            "location @mcpage_app {",
            "proxy_pass http://mcpage_app;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "proxy_set_header Host $mcpage_upstream_host;",
            "proxy_set_header X-Forwarded-Host $mcpage_upstream_host;",
            "proxy_set_header X-Forwarded-For $remote_addr;",
            "proxy_set_header X-Forwarded-Proto $scheme;",
            "proxy_set_header X-Real-IP $remote_addr;",
            "proxy_set_header X-Original-URL \"\";",
            "proxy_set_header X-HTTP-Method-Override \"\";",
            "proxy_set_header Forwarded \"\";",
            "server_name localhost 127.0.0.1;",
            "map $host $mcpage_bypass_host {",
            "\"localhost\" 0;",
            "\"\" \"localhost$mcpage_port\";",
            "location /_mcpage/ {",
            "allow 127.0.0.1;",
            "allow ::1;",
            "deny all;",
            "\"~^(?:GET|HEAD)$\" 0;",
            "\"~(?:^|;)\\s*(?:sessionid)\\s*(?:=|;|$)\" 1;",
            "map $http_authorization $mcpage_bypass_authorization {",
            "map $request_uri $mcpage_bypass_query {",
            "map \"$mcpage_bypass_method$mcpage_bypass_cookie$mcpage_bypass_authorization$mcpage_bypass_query$mcpage_bypass_host$mcpage_bypass_long_key\" $mcpage_bypass {",
            "\"~^1\" method;",
            "\"~^.1\" cookie;",
            "\"~^..1\" authorization;",
            "\"~^...1\" query;",
            "\"~^....1\" host;",
            "\"~^.....1\" long_key;",
            "map $memcached_key $mcpage_bypass_long_key {",
            "log_format mcpage '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent '",
        ] {
            assert_has(&text, line);
        }
        for needle in [
            "memcached_gzip_flag",
            "gunzip",
            "not_found",
            "weight=",
            "$mcpage_dollar",
            "$proxy_add_x_forwarded_for",
            "Host $http_host;",
            "charset_types",
        ] {
            assert_lacks(&text, needle);
        }
        // The key is set before the bypass check (the long-key map reads it).
        let bypass = text.find("return 418;").expect("bypass");
        let key = text.find("set $memcached_key").expect("key");
        assert!(key < bypass);
    }

    /// nginx reaches the app (or the proxy) and listens over unix sockets.
    #[test]
    fn unix_sockets() {
        let mut config = default_config();
        config.nginx.app = "unix:/run/mcpage/proxy.sock".into();
        config.nginx.listen = "unix:/run/mcpage/nginx.sock".into();
        config.validate().expect("valid");
        let text = render_nginx_config(&config);
        assert_has(&text, "server unix:/run/mcpage/proxy.sock;");
        assert_has(&text, "listen unix:/run/mcpage/nginx.sock;");
    }

    #[test]
    fn three_servers_weights_and_modulo() {
        let text = render_nginx_config(&modulo_config());
        for line in [
            "hash $memcached_key;",
            "server 127.0.0.1:11211;",
            "server 127.0.0.1:11212 weight=2;",
            "server 127.0.0.3:11213 weight=3;",
        ] {
            assert_has(&text, line);
        }
        assert_lacks(&text, "consistent");
        // Servers in config order (the ring and the modulo walk depend on it).
        let a = text.find("11211").expect("a");
        let b = text.find("11212").expect("b");
        let c = text.find("11213").expect("c");
        assert!(a < b && b < c);
        // keepalive after the balancing method
        assert!(
            text.find("hash $memcached_key").expect("hash")
                < text.find("keepalive 512").expect("ka")
        );
    }

    #[test]
    fn query_include() {
        let text = render_nginx_config(&query_config());
        assert_has(&text, "set $memcached_key \"page:$uri?$args\";");
        assert_lacks(&text, "$mcpage_bypass_query");
        assert_has(
            &text,
            "map \"$mcpage_bypass_method$mcpage_bypass_cookie$mcpage_bypass_authorization$mcpage_bypass_host$mcpage_bypass_long_key\" $mcpage_bypass {",
        );
    }

    #[test]
    fn host_mode() {
        let text = render_nginx_config(&host_config());
        assert_has(&text, "set $memcached_key \"$host$uri\";");
        assert_has(&text, "map $host $mcpage_bypass_host {");
        assert_has(&text, "\"example.com\" 0;");
        assert_has(&text, "\"www.example.com\" 0;");
        assert_has(&text, "\"~^....1\" host;");

        let mut config = host_config();
        config.keys.query = QueryMode::Include;
        let text = render_nginx_config(&config);
        assert_has(&text, "set $memcached_key \"$host$uri?$args\";");
        assert_has(&text, "\"~^...1\" host;");
    }

    #[test]
    fn gzip_and_escapes() {
        let text = render_nginx_config(&gzip_config());
        for line in [
            "memcached_gzip_flag 4;",
            "gunzip on;",
            "gzip_vary on;",
            "default_type \"text/html\";",
            "charset_types \"application/json\";",
            "memcached_buffer_size 128k;",
            "memcached_read_timeout 2500ms;",
            "keepalive 64;",
            "merge_slashes off;",
            // `$` comes from geo, `\` is escaped for nginx's string syntax.
            "set $memcached_key \"p${mcpage_dollar}x\\\\:$uri\";",
            "default \"$\";",
            "\"~(?:^|;)\\s*(?:sessionid|remember\\x2Eme|a\\x24b)\\s*(?:=|;|$)\" 1;",
            "add_header X-Frame-Options \"DENY\" always;",
            "add_header Content-Security-Policy \"default-src 'self'; img-src \\\"data:\\\"\" always;",
            "application/json json;",
        ] {
            assert_has(&text, line);
        }
    }

    #[test]
    fn long_key_regex_shape() {
        let regex = long_key_regex();
        // nginx refuses configuration tokens of 4096 bytes and more.
        assert!(regex.len() < 4000, "{} bytes", regex.len());
        assert!(
            regex.starts_with("(?s)^(?=.{84})(?:(?=.{251})|(?=(?1){1})(?:(?=.{249})|"),
            "{regex}"
        );
        assert!(regex.contains("(?:(?=.{85})|(?=(?1){84})))"), "{regex}");
        assert!(
            regex.ends_with(")(?(DEFINE)([^\\x00-\\x20%]*+[\\x00-\\x20%]))"),
            "{regex}"
        );
        assert_eq!(regex.matches('(').count(), regex.matches(')').count());
    }

    #[test]
    fn no_session_cookies_no_cookie_map() {
        let mut config = Config::default();
        config.cache.session_cookies = vec![String::new()];
        let text = render_nginx_config(&config);
        assert_lacks(&text, "$mcpage_bypass_cookie");
        assert_has(&text, "\"~^..1\" query;");
    }

    #[test]
    fn full_config_keeps_everything_under_the_prefix() {
        let dir = Path::new("/tmp/mcpage-x");
        let text = render_nginx_full(&default_config(), dir);
        for line in [
            "worker_processes 1;",
            "pcre_jit on;",
            "pid \"/tmp/mcpage-x/nginx.pid\";",
            "error_log \"/tmp/mcpage-x/error.log\" warn;",
            "worker_connections 4096;",
            "access_log \"/tmp/mcpage-x/access.log\" mcpage;",
            "client_body_temp_path \"/tmp/mcpage-x/client_body_temp\";",
            "proxy_temp_path \"/tmp/mcpage-x/proxy_temp\";",
            "fastcgi_temp_path \"/tmp/mcpage-x/fastcgi_temp\";",
            "uwsgi_temp_path \"/tmp/mcpage-x/uwsgi_temp\";",
            "scgi_temp_path \"/tmp/mcpage-x/scgi_temp\";",
            "text/html html htm shtml;",
            "text/css css;",
            "application/javascript js mjs;",
            "text/xml xml;",
            "application/json json;",
            "text/plain txt;",
            "upstream mcpage_memcached {",
        ] {
            assert_has(&text, line);
        }
        assert_lacks(&text, "include");
        assert_lacks(&text, "daemon");
        assert_lacks(&text, "user ");
    }

    /// A scratch directory under the system temp dir, removed on drop.
    /// The real `nginx -t` accepts every rendered config, without warnings.
    #[test]
    fn real_nginx_accepts_the_rendered_configs() {
        for (name, config) in all_configs() {
            let dir = tempfile::Builder::new()
                .prefix(&format!("mcpage-nginx-t-{name}-"))
                .tempdir()
                .expect("create temp dir");
            let file = dir.path().join("nginx.conf");
            let text = render_nginx_full(&config, dir.path());
            std::fs::write(&file, &text).expect("write nginx.conf");
            let output = Command::new("nginx")
                .arg("-t")
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&file)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run `nginx` ({e}): install it with `apt-get install -y nginx` \
                         (Debian's nginx includes the memcached and gunzip modules)"
                    )
                });
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success(),
                "{name}: nginx -t failed:\n{stderr}\n--- config:\n{text}"
            );
            assert!(
                !stderr.contains("[warn]")
                    && !stderr.contains("[emerg]")
                    && !stderr.contains("[alert]"),
                "{name}: nginx -t complained:\n{stderr}\n--- config:\n{text}"
            );
        }
    }
}
