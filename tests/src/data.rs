//! Test data: gzip, seeded random text, load sizes from the environment.

use std::io::Write;

/// Gzip `data` (for values stored with the gzip flag).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// A small deterministic generator for load and race tests, so a failing run
/// can be replayed from its seed.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A count from the environment (`MCPAGE_STRESS_ROUNDS=100000`), or `default`:
/// CI runs the short version, `scripts/stress` the long one.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// `len` bytes of printable, incompressible text (it stays that size after
/// gzip), the same for the same seed.
pub fn random_text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    (0..len)
        .map(|_| b'!' + (rng.next_u64() % 94) as u8)
        .collect()
}
