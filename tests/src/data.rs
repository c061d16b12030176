//! Test data: gzip, seeded random text, load sizes from the environment.

use std::io::Write;

/// Gzip `data` (for values stored with the gzip flag).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
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
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(b'!'..=b'~')).collect()
}
