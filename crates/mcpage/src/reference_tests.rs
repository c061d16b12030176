//! Differential tests against the executable Python model of nginx
//! (`shared/reference/nginx_reference.py`, itself verified against a running
//! nginx): URI normalization, escaping and server choice.
//!
//! One `python3` process evaluates every generated input; a missing python3 or
//! a missing reference directory fails the test, it is never skipped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::key::{memcached_escape, nginx_uri};
use crate::ring::{Hashing, Ring};

const TARGETS: usize = 100_000;
const RING_VALUES: usize = 20_000;
const SERVERS: [&str; 3] = ["127.0.0.1:11211", "127.0.0.1:11212", "127.0.0.1:11213"];
const WEIGHTS: [[u32; 3]; 2] = [[1, 1, 1], [1, 2, 1]];
/// Dead-server sets for the failover comparison (indices into `SERVERS`).
const DEAD: [usize; 2] = [1, 0];

/// The Python side: reads hex lines, writes one result line per input.
const SCRIPT: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import nginx_reference as m

def h(b):
    return "=" + b.hex()

targets_in, targets_out, values_in, values_out = sys.argv[2:6]
simple_disagree = 0
with open(targets_in) as f, open(targets_out, "w") as out:
    for line in f:
        t = bytes.fromhex(line.strip())
        fields = []
        for ms in (True, False):
            try:
                uri, args = m.parse_complex_uri(t, ms)
            except m.BadRequest:
                uri, args = None, None
            try:
                s = m.nginx_uri_simple(t, ms)
            except ValueError:
                s = None
            if s != (None if uri is None else (uri, args)):
                simple_disagree += 1
            if uri is None:
                fields += ["!400", "!", "!", "!"]
            else:
                fields += [
                    h(uri),
                    "!" if args is None else h(args),
                    h(m.memcached_escape(uri)),
                    h(m.memcached_escape(uri + b"?" + (args or b""))),
                ]
        out.write(" ".join(fields) + "\n")
    out.write("simple_disagree %d\n" % simple_disagree)

servers = [s.encode() for s in sys.argv[6].split(",")]
weights = [[int(w) for w in ws.split(",")] for ws in sys.argv[7].split(";")]
dead = [int(d) for d in sys.argv[8].split(",")]
configs = []
for ws in weights:
    sw = list(zip(servers, ws))
    configs.append((sw, m.chash_ring(sw)))
index = {s: i for i, s in enumerate(servers)}
def idx(name):
    return "-" if name is None else str(index[name])
def pidx(p):
    return "-" if p is None else str(p)
with open(values_in) as f, open(values_out, "w") as out:
    for line in f:
        v = bytes.fromhex(line.strip())
        fields = []
        for sw, ring in configs:
            fields.append(idx(m.chash_pick(ring, v)[0]))
            fields.append(pidx(m.hash_pick(sw, v)[1]))
            for d in dead:
                fields.append(idx(m.chash_pick(ring, v, skip={servers[d]})[0]))
                fields.append(pidx(m.hash_pick(sw, v, skip_idx={d})[1]))
        out.write(" ".join(fields) + "\n")
"#;

/// xorshift64*: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// A request target biased towards the bytes nginx's parser cares about.
fn gen_target(rng: &mut Rng) -> Vec<u8> {
    const COMMON: &[&[u8]] = &[
        b"/",
        b"/",
        b"/",
        b"/",
        b".",
        b".",
        b"/./",
        b"//",
        b"%2e",
        b"%2E",
        b"%2F",
        b"%2f",
        b"%25",
        b"%7F",
        b"%0A",
        b"%0a",
        b"%20",
        b"%3F",
        b"%3f",
        b"%23",
        b"%C3%A9",
        b"%c3%a9",
        b"%FF",
        b"?",
        b"#",
        b"+",
        b"\xC3\xA9",
        b"\xE6\x97\xA5",
        b"a",
        b"b",
        b"z",
        b"Z",
        b"0",
        b"9",
        b"e",
        b"E",
        b"f",
        b"F",
        b"g",
        b"x=1&y=2",
        b"=",
        b"&",
        b"index.html",
        b"articles",
        b"-",
        b"_",
        b"~",
    ];
    // Pieces that often lead to a 400.
    const RARE: &[&[u8]] = &[b"..", b"/../", b"%2e%2e", b"%", b"%00", b"%zz", b"%2"];
    let len = 1 + rng.below(120);
    let mut t = Vec::with_capacity(len);
    t.push(b'/');
    while t.len() < len {
        let piece: &[u8] = match rng.below(20) {
            0 | 1 => &[0x80 | rng.byte()],
            2 | 3 => &[0x21 + rng.byte() % 0x5e],
            4 => RARE[rng.below(RARE.len())],
            _ => COMMON[rng.below(COMMON.len())],
        };
        if t.len() + piece.len() <= len {
            t.extend_from_slice(piece);
        } else {
            t.push(b'a');
        }
    }
    t
}

/// A non-empty value `V` to route.
fn gen_value(rng: &mut Rng, targets: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(3) {
        0 => {
            let len = 1 + rng.below(60);
            (0..len).map(|_| rng.byte()).collect()
        }
        1 => format!("/articles/{}", rng.below(1_000_000)).into_bytes(),
        _ => {
            let t = &targets[rng.below(targets.len())];
            nginx_uri(t, true).map_or_else(|_| t.clone(), |u| u.uri)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn field(bytes: &[u8]) -> String {
    format!("={}", hex(bytes))
}

fn reference_dir() -> PathBuf {
    // Vendored from the shared reference (checked against running nginx), so a
    // clean clone anywhere can run it.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reference");
    assert!(
        dir.join("nginx_reference.py").is_file(),
        "the nginx reference model is missing: expected {}/nginx_reference.py \
         (reference/ at the workspace root); this test must not be skipped",
        dir.display()
    );
    dir
}

/// Temp files removed on drop.
struct TempFiles(Vec<PathBuf>);

impl TempFiles {
    fn new(names: &[&str]) -> TempFiles {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir();
        TempFiles(
            names
                .iter()
                .map(|n| dir.join(format!("mcpage-ref-{}-{nanos}-{n}", std::process::id())))
                .collect(),
        )
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The Rust side of one target, in the Python output format.
fn rust_target_line(t: &[u8]) -> String {
    let mut fields = Vec::with_capacity(8);
    for merge in [true, false] {
        match nginx_uri(t, merge) {
            Err(_) => fields.extend(["!400".to_owned(), "!".into(), "!".into(), "!".into()]),
            Ok(n) => {
                let mut inc = n.uri.clone();
                inc.push(b'?');
                inc.extend_from_slice(n.args.as_deref().unwrap_or_default());
                fields.push(field(&n.uri));
                fields.push(n.args.as_deref().map_or_else(|| "!".to_owned(), field));
                fields.push(field(&memcached_escape(&n.uri)));
                fields.push(field(&memcached_escape(&inc)));
            }
        }
    }
    fields.join(" ")
}

fn rust_value_line(rings: &[(Ring, Ring)], v: &[u8]) -> String {
    let opt = |p: Option<usize>| p.map_or_else(|| "-".to_owned(), |p| p.to_string());
    let mut fields = Vec::with_capacity(12);
    for (chash, modulo) in rings {
        fields.push(chash.pick(v).to_string());
        fields.push(modulo.pick(v).to_string());
        for d in DEAD {
            fields.push(opt(chash.pick_usable(v, |i| i != d)));
            fields.push(opt(modulo.pick_usable(v, |i| i != d)));
        }
    }
    fields.join(" ")
}

#[test]
fn matches_python_reference_model() {
    let started = Instant::now();
    let dir = reference_dir();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let targets: Vec<Vec<u8>> = (0..TARGETS).map(|_| gen_target(&mut rng)).collect();
    let values: Vec<Vec<u8>> = (0..RING_VALUES)
        .map(|_| gen_value(&mut rng, &targets))
        .collect();

    let files = TempFiles::new(&["targets", "targets-out", "values", "values-out"]);
    let write_hex = |path: &Path, items: &[Vec<u8>]| {
        let mut s = String::with_capacity(items.iter().map(|i| i.len() * 2 + 1).sum());
        for i in items {
            s.push_str(&hex(i));
            s.push('\n');
        }
        std::fs::write(path, s).expect("write temp file");
    };
    write_hex(&files.0[0], &targets);
    write_hex(&files.0[2], &values);

    let weights = WEIGHTS
        .iter()
        .map(|ws| ws.map(|w| w.to_string()).join(","))
        .collect::<Vec<_>>()
        .join(";");
    let dead = DEAD.map(|d| d.to_string()).join(",");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&dir)
        .args(&files.0)
        .arg(SERVERS.join(","))
        .arg(weights)
        .arg(dead)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}): the reference comparison needs python3 on PATH \
                 (e.g. `apt-get install python3`); this test must not be skipped"
            )
        });

    // The Rust side runs while python works.
    let rust_targets: Vec<String> = targets.iter().map(|t| rust_target_line(t)).collect();
    let rings: Vec<(Ring, Ring)> = WEIGHTS
        .iter()
        .map(|ws| {
            let list: Vec<(String, u32)> = SERVERS
                .iter()
                .zip(ws)
                .map(|(s, &w)| ((*s).to_owned(), w))
                .collect();
            (
                Ring::new(&list, Hashing::Consistent),
                Ring::new(&list, Hashing::Modulo),
            )
        })
        .collect();
    let rust_values: Vec<String> = values.iter().map(|v| rust_value_line(&rings, v)).collect();
    let rust_done = started.elapsed();

    let status = child.wait().expect("wait for python3");
    assert!(
        status.success(),
        "the python reference script failed: {status}"
    );
    let py_targets = std::fs::read_to_string(&files.0[1]).expect("python target output");
    let py_values = std::fs::read_to_string(&files.0[3]).expect("python value output");

    let mut py_target_lines: Vec<&str> = py_targets.lines().collect();
    let summary = py_target_lines.pop().unwrap_or_default();
    assert_eq!(
        summary, "simple_disagree 0",
        "the model's two URI parsers disagree (nginx_uri_simple vs parse_complex_uri)"
    );
    assert_eq!(
        py_target_lines.len(),
        targets.len(),
        "python output is incomplete"
    );
    let py_value_lines: Vec<&str> = py_values.lines().collect();
    assert_eq!(
        py_value_lines.len(),
        values.len(),
        "python output is incomplete"
    );

    let mut mismatches = Vec::new();
    let mut bad_requests = 0usize;
    for ((t, rust), py) in targets.iter().zip(&rust_targets).zip(&py_target_lines) {
        bad_requests += usize::from(py.starts_with("!400"));
        if rust != py {
            mismatches.push(format!(
                "target {}:\n    rust   {rust}\n    python {py}",
                t.escape_ascii()
            ));
        }
    }
    for ((v, rust), py) in values.iter().zip(&rust_values).zip(&py_value_lines) {
        if rust != py {
            mismatches.push(format!(
                "value {}:\n    rust   {rust}\n    python {py}",
                v.escape_ascii()
            ));
        }
    }
    eprintln!(
        "reference: {} targets ({} are 400), {} ring values; rust side {:?}, total {:?}",
        targets.len(),
        bad_requests,
        values.len(),
        rust_done,
        started.elapsed()
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches with the python model; first 20:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The generator must exercise both outcomes substantially.
    assert!(
        bad_requests > TARGETS / 20 && bad_requests < TARGETS / 2,
        "{bad_requests} 400s"
    );
}
