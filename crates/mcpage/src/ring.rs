//! Server choice identical to nginx's `hash $memcached_key [consistent];`.
//!
//! nginx hashes the *unescaped* value `V` (not the memcached key `K`) with
//! CRC-32 and picks a server from the upstream's `server` lines. [`Ring`]
//! reproduces both methods of `ngx_http_upstream_hash_module.c`, including the
//! walk nginx does when the first choice is down, so a writer stores each page
//! exactly where nginx will look for it (`reference/nginx-memcached.md` §6).

use serde::{Deserialize, Serialize};

/// The hashing method of the nginx upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hashing {
    /// `hash $memcached_key consistent;` (ketama, 160 points per weight unit).
    #[default]
    Consistent,
    /// `hash $memcached_key;` (Cache::Memcached-compatible modulo).
    Modulo,
}

/// How many further candidates nginx tries before it falls back to
/// round-robin (`hp->tries > 20`): 21 in all.
const MAX_TRIES: usize = 21;

/// Ring points per unit of weight (`ngx_http_upstream_update_chash`).
const POINTS_PER_WEIGHT: usize = 160;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    hash: u32,
    /// Index of the first server with this point's name.
    server: usize,
}

/// The servers of one nginx upstream and the choice nginx makes among them.
///
/// All tables are computed in [`Ring::new`]; [`Ring::pick`] and
/// [`Ring::pick_usable`] do not allocate.
#[derive(Debug, Clone)]
pub struct Ring {
    hashing: Hashing,
    len: usize,
    /// Consistent: the sorted, deduplicated ring.
    points: Vec<Point>,
    /// Consistent: next server with the same name (nginx picks among peers of
    /// one name, e.g. a host name resolving to several addresses).
    same_name_next: Vec<Option<usize>>,
    /// Modulo: cumulative weights; server `p` owns `[ends[p-1], ends[p])`.
    ends: Vec<u64>,
}

impl Ring {
    /// Builds the ring for `servers`, in nginx config order.
    ///
    /// Each entry is `(name, weight)`: `name` is the server text exactly as
    /// written after `server` in nginx.conf (`127.0.0.1:11211`; it is hashed, so
    /// `localhost:11211` gives a different ring), `weight` nginx's `weight=`.
    /// nginx rejects `weight=0`; here it is treated as 1. Weights are expected to
    /// be small: the consistent ring holds `160 * weight` points per server.
    ///
    /// Servers should be non-empty; with none, [`Ring::pick`] returns 0 and
    /// [`Ring::pick_usable`] returns `None`.
    pub fn new(servers: &[(String, u32)], hashing: Hashing) -> Ring {
        let len = servers.len();
        let weight = |w: u32| w.max(1);

        let mut same_name_next = vec![None; len];
        let mut first_of = Vec::with_capacity(len);
        for (i, (name, _)) in servers.iter().enumerate() {
            let first = servers[..i]
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or(i);
            first_of.push(first);
            if first != i {
                // Append `i` to the chain that starts at `first`.
                let mut j = first;
                while let Some(next) = same_name_next[j] {
                    j = next;
                }
                same_name_next[j] = Some(i);
            }
        }

        let mut points = Vec::new();
        let mut ends = Vec::new();
        match hashing {
            Hashing::Consistent => {
                let total: usize = servers
                    .iter()
                    .map(|(_, w)| POINTS_PER_WEIGHT * weight(*w) as usize)
                    .sum();
                points.reserve_exact(total);
                for (i, (name, w)) in servers.iter().enumerate() {
                    let (host, port) = split_server(name.as_bytes());
                    let mut base = crc32fast::Hasher::new();
                    base.update(host);
                    base.update(&[0]);
                    base.update(port);
                    let mut prev: u32 = 0;
                    for _ in 0..POINTS_PER_WEIGHT * weight(*w) as usize {
                        let mut h = base.clone();
                        h.update(&prev.to_le_bytes());
                        let hash = h.finalize();
                        points.push(Point {
                            hash,
                            server: first_of[i],
                        });
                        prev = hash;
                    }
                }
                // Among equal hashes the earliest server in config order stays.
                points.sort_unstable_by_key(|p| (p.hash, p.server));
                points.dedup_by_key(|p| p.hash);
            }
            Hashing::Modulo => {
                let mut acc = 0u64;
                ends.reserve_exact(len);
                for (_, w) in servers {
                    acc += u64::from(weight(*w));
                    ends.push(acc);
                }
            }
        }
        Ring {
            hashing,
            len,
            points,
            same_name_next,
            ends,
        }
    }

    /// The hashing method.
    pub fn hashing(&self) -> Hashing {
        self.hashing
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no servers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The server nginx picks for `value` (`V`, unescaped) when all servers
    /// are up: an index into the `servers` given to [`Ring::new`].
    ///
    /// With a single server or an empty `value` nginx uses round-robin; this
    /// returns 0 then.
    pub fn pick(&self, value: &[u8]) -> usize {
        if self.len <= 1 || value.is_empty() {
            return 0;
        }
        match self.hashing {
            Hashing::Consistent => self.points[self.find_point(value)].server,
            Hashing::Modulo => self.modulo_server(modulo_hash(0, value)),
        }
    }

    /// The server nginx picks for `value` when only the servers for which
    /// `usable(index)` is true may be used (nginx: not down, not failed within
    /// `fail_timeout`, not at `max_conns`).
    ///
    /// Follows nginx's walk: consistent tries the ring point and up to 20
    /// further points; modulo rehashes up to 20 more times. Returns `None` where
    /// nginx would fall back to round-robin (no predictable server: the walk
    /// failed, or `value` is empty with several servers) or where no server is
    /// usable at all. A single server is returned when usable.
    ///
    /// When several servers share one name, nginx picks among the usable ones
    /// by weighted round-robin; this returns the first usable one in config
    /// order (give servers distinct names).
    pub fn pick_usable(&self, value: &[u8], usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        if self.len == 1 {
            return usable(0).then_some(0);
        }
        if value.is_empty() {
            return None;
        }
        match self.hashing {
            Hashing::Consistent => {
                let start = self.find_point(value);
                (0..MAX_TRIES).find_map(|t| {
                    let mut peer = Some(self.points[(start + t) % self.points.len()].server);
                    while let Some(i) = peer {
                        if usable(i) {
                            return Some(i);
                        }
                        peer = self.same_name_next[i];
                    }
                    None
                })
            }
            Hashing::Modulo => {
                let mut acc = 0u32;
                (0..MAX_TRIES).find_map(|rehash| {
                    acc = acc.wrapping_add(modulo_hash(rehash, value));
                    let p = self.modulo_server(acc);
                    usable(p).then_some(p)
                })
            }
        }
    }

    /// `ngx_http_upstream_find_chash_point`: the first point with a hash
    /// `>= crc32(value)`, wrapping to 0 past the end.
    fn find_point(&self, value: &[u8]) -> usize {
        let kh = crc32fast::hash(value);
        let i = self.points.partition_point(|p| p.hash < kh);
        if i == self.points.len() { 0 } else { i }
    }

    /// The weighted server for an accumulated modulo hash.
    fn modulo_server(&self, acc: u32) -> usize {
        let total = self.ends.last().copied().unwrap_or(1);
        let w = u64::from(acc) % total;
        self.ends.partition_point(|&end| end <= w)
    }
}

/// One round of `ngx_http_upstream_get_hash_peer`:
/// `(crc32([rehash as decimal] ++ value) >> 16) & 0x7fff`, the decimal prefix
/// omitted in round 0.
fn modulo_hash(rehash: usize, value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if rehash > 0 {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        let mut n = rehash;
        while n > 0 {
            at -= 1;
            // `n % 10` is below 10.
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        h.update(&buf[at..]);
    }
    h.update(value);
    (h.finalize() >> 16) & 0x7fff
}

/// nginx's split of a server name into the host and port it hashes: `unix:`
/// (any case) → (path, ""); else the digits after the last `:` are the port
/// when only digits follow it; otherwise (name, "").
fn split_server(server: &[u8]) -> (&[u8], &[u8]) {
    if server.len() >= 5 && server[..5].eq_ignore_ascii_case(b"unix:") {
        return (&server[5..], b"");
    }
    for (j, &c) in server.iter().enumerate().rev() {
        if c == b':' {
            return (&server[..j], &server[j + 1..]);
        }
        if !c.is_ascii_digit() {
            break;
        }
    }
    (server, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|&(n, w)| (n.to_owned(), w)).collect()
    }

    const TWO: &[(&str, u32)] = &[("127.0.0.1:11211", 1), ("127.0.0.1:11212", 1)];

    #[test]
    fn split() {
        assert_eq!(
            split_server(b"127.0.0.1:11211"),
            (&b"127.0.0.1"[..], &b"11211"[..])
        );
        assert_eq!(split_server(b"127.0.0.1"), (&b"127.0.0.1"[..], &b""[..]));
        assert_eq!(split_server(b"host:"), (&b"host"[..], &b""[..]));
        assert_eq!(split_server(b"[::1]:11211"), (&b"[::1]"[..], &b"11211"[..]));
        assert_eq!(split_server(b"[::1]"), (&b"[::1]"[..], &b""[..]));
        assert_eq!(
            split_server(b"UNIX:/tmp/mc:1"),
            (&b"/tmp/mc:1"[..], &b""[..])
        );
        assert_eq!(split_server(b"h:1x"), (&b"h:1x"[..], &b""[..]));
        assert_eq!(split_server(b""), (&b""[..], &b""[..]));
    }

    #[test]
    fn first_points_and_extremes() {
        let s = servers(TWO);
        let ring = Ring::new(&s, Hashing::Consistent);
        assert_eq!(ring.points.len(), 320);
        let first = |name: &[u8]| {
            let (host, port) = split_server(name);
            let mut prev = 0u32;
            let mut out = Vec::new();
            for _ in 0..3 {
                let mut data = host.to_vec();
                data.push(0);
                data.extend_from_slice(port);
                data.extend_from_slice(&prev.to_le_bytes());
                prev = crc32fast::hash(&data);
                out.push(prev);
            }
            out
        };
        assert_eq!(
            first(b"127.0.0.1:11211"),
            [0xa9b35a33, 0x4ae4402d, 0x276a3e76]
        );
        assert_eq!(
            first(b"127.0.0.1:11212"),
            [0xee1320e3, 0x34c90638, 0xe48d14ad]
        );
        for h in first(b"127.0.0.1:11211") {
            let p = ring
                .points
                .iter()
                .find(|p| p.hash == h)
                .expect("on the ring");
            assert_eq!(p.server, 0);
        }
        for h in first(b"127.0.0.1:11212") {
            let p = ring
                .points
                .iter()
                .find(|p| p.hash == h)
                .expect("on the ring");
            assert_eq!(p.server, 1);
        }
        assert_eq!(ring.points[0].hash, 0x0031b425);
        assert_eq!(ring.points[319].hash, 0xfe927595);
        assert!(ring.points.windows(2).all(|w| w[0].hash < w[1].hash));
    }

    #[test]
    fn value_table() {
        let s = servers(TWO);
        let chash = Ring::new(&s, Hashing::Consistent);
        let modulo = Ring::new(&s, Hashing::Modulo);
        // (V, crc32, ring idx, ring point, consistent server, modulo (h, server))
        type Row = (&'static [u8], u32, usize, u32, usize, Option<(u32, usize)>);
        let rows: &[Row] = &[
            (b"/", 0x79d3d2d4, 151, 0x79e995ab, 0, Some((31187, 1))),
            (b"/about", 0x34eec3be, 63, 0x37044e38, 1, Some((13550, 0))),
            (
                b"/articles/1",
                0x6388d66b,
                126,
                0x639ab895,
                0,
                Some((25480, 0)),
            ),
            (
                b"/articles/2",
                0xfa8187d1,
                309,
                0xfaef77bb,
                0,
                Some((31361, 1)),
            ),
            (
                b"page:/about",
                0x82b656e2,
                159,
                0x83604fc5,
                0,
                Some((694, 0)),
            ),
            (b"/x y", 0x3faab4a6, 74, 0x400c2e70, 1, Some((16298, 0))),
            (b"/100%", 0x7d0dd728, 153, 0x7d59306c, 1, Some((32013, 1))),
            (b"/w/173", 0xfee5db72, 0, 0x0031b425, 0, None),
        ];
        for &(v, crc, idx, point, server, modulo_row) in rows {
            let name = String::from_utf8_lossy(v);
            assert_eq!(crc32fast::hash(v), crc, "{name}");
            assert_eq!(chash.find_point(v), idx, "{name}");
            assert_eq!(chash.points[idx].hash, point, "{name}");
            assert_eq!(chash.pick(v), server, "{name}");
            assert_eq!(chash.pick_usable(v, |_| true), Some(server), "{name}");
            if let Some((h, m)) = modulo_row {
                assert_eq!(modulo_hash(0, v), h, "{name}");
                assert_eq!(modulo.pick(v), m, "{name}");
                assert_eq!(modulo.pick_usable(v, |_| true), Some(m), "{name}");
            }
        }
        // `/w/173` wraps: crc above the ring maximum → point 0.
        assert_eq!(chash.points.partition_point(|p| p.hash < 0xfee5db72), 320);
        // Hashing K instead of V picks the wrong server.
        assert_eq!(chash.pick(b"/100%25"), 0);
        assert_eq!(chash.pick(b"/x\ny"), 0);
        assert_eq!(chash.pick(b"/x%0Ay"), 1);
    }

    #[test]
    fn weighted() {
        let s = servers(&[
            ("127.0.0.1:11211", 1),
            ("127.0.0.1:11212", 2),
            ("127.0.0.1:11213", 1),
        ]);
        let ring = Ring::new(&s, Hashing::Consistent);
        assert_eq!(ring.points.len(), 640);
        assert_eq!(ring.pick(b"/"), 0);
        assert_eq!(ring.pick(b"/about"), 2);
        assert_eq!(ring.pick(b"/articles/1"), 0);
        assert_eq!(ring.len(), 3);
        assert!(!ring.is_empty());
        assert_eq!(ring.hashing(), Hashing::Consistent);

        let m = Ring::new(&s, Hashing::Modulo);
        assert_eq!(m.ends, [1, 3, 4]);
        // w = h % 4: 0 → 11211, 1..=2 → 11212, 3 → 11213.
        for (w, p) in [(0, 0), (1, 1), (2, 1), (3, 2), (4, 0), (7, 2)] {
            assert_eq!(m.modulo_server(w), p);
        }
    }

    #[test]
    fn failover_consistent() {
        let s = servers(&[
            ("127.0.0.1:11211", 1),
            ("127.0.0.1:11219", 1),
            ("127.0.0.1:11213", 1),
        ]);
        let ring = Ring::new(&s, Hashing::Consistent);
        assert_eq!(crc32fast::hash(b"/f/2"), 0x4f84be0b);
        assert_eq!(ring.find_point(b"/f/2"), 162);
        assert_eq!(ring.pick(b"/f/2"), 1);
        assert_eq!(ring.points[163].server, 1);
        assert_eq!(ring.pick_usable(b"/f/2", |i| i != 1), Some(2));
        assert_eq!(ring.pick_usable(b"/f/2", |_| false), None);
    }

    #[test]
    fn failover_modulo() {
        let s = servers(&[
            ("127.0.0.1:11211", 1),
            ("127.0.0.1:11219", 1),
            ("127.0.0.1:11213", 1),
        ]);
        let ring = Ring::new(&s, Hashing::Modulo);
        assert_eq!(modulo_hash(0, b"/f/2"), 20356);
        assert_eq!(ring.pick(b"/f/2"), 1);
        assert_eq!(modulo_hash(1, b"/f/2"), 13475);
        assert_eq!(ring.pick_usable(b"/f/2", |i| i != 1), Some(0));
        assert_eq!(ring.pick_usable(b"/f/2", |_| false), None);
    }

    #[test]
    fn rehash_decimal_prefix() {
        let mut data = b"12".to_vec();
        data.extend_from_slice(b"/v");
        assert_eq!(
            modulo_hash(12, b"/v"),
            (crc32fast::hash(&data) >> 16) & 0x7fff
        );
        assert_eq!(
            modulo_hash(0, b"/v"),
            (crc32fast::hash(b"/v") >> 16) & 0x7fff
        );
    }

    #[test]
    fn consistent_walk_gives_up_after_21_points() {
        let s = servers(TWO);
        let ring = Ring::new(&s, Hashing::Consistent);
        let v = b"/about";
        let start = ring.find_point(v);
        let owner = ring.points[start].server;
        // Count how many of the 21 points belong to `owner`: if all do, None.
        let all_owner = (0..21).all(|t| ring.points[(start + t) % 320].server == owner);
        let got = ring.pick_usable(v, |i| i != owner);
        assert_eq!(got.is_none(), all_owner);
        if let Some(i) = got {
            assert_ne!(i, owner);
        }
    }

    #[test]
    fn single_server_and_empty() {
        for hashing in [Hashing::Consistent, Hashing::Modulo] {
            let ring = Ring::new(&servers(&[("127.0.0.1:11211", 1)]), hashing);
            assert_eq!(ring.pick(b"/anything"), 0);
            assert_eq!(ring.pick(b""), 0);
            assert_eq!(ring.pick_usable(b"/x", |_| true), Some(0));
            assert_eq!(ring.pick_usable(b"/x", |_| false), None);

            let ring = Ring::new(&servers(TWO), hashing);
            assert_eq!(ring.pick(b""), 0);
            assert_eq!(ring.pick_usable(b"", |_| true), None);

            let ring = Ring::new(&[], hashing);
            assert!(ring.is_empty());
            assert_eq!(ring.pick(b"/x"), 0);
            assert_eq!(ring.pick_usable(b"/x", |_| true), None);
        }
        assert_eq!(Hashing::default(), Hashing::Consistent);
    }

    #[test]
    fn duplicate_names_share_points() {
        let s = servers(&[("a:1", 1), ("b:2", 1), ("a:1", 1)]);
        let ring = Ring::new(&s, Hashing::Consistent);
        assert_eq!(ring.points.len(), 320);
        assert!(ring.points.iter().all(|p| p.server != 2));
        let v = (0..100u32)
            .map(|i| format!("/k{i}"))
            .find(|v| ring.pick(v.as_bytes()) == 0)
            .expect("some key on a:1");
        assert_eq!(ring.pick_usable(v.as_bytes(), |i| i != 0), Some(2));
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let a = Ring::new(&servers(&[("a:1", 0), ("b:2", 1)]), Hashing::Modulo);
        assert_eq!(a.ends, [1, 2]);
        let c = Ring::new(&servers(&[("a:1", 0), ("b:2", 1)]), Hashing::Consistent);
        assert_eq!(c.points.len(), 320);
    }
}
