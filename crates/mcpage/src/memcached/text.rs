//! Lines of memcached's text protocol that the meta client does not parse:
//! `stats` (`STAT <name> <value>`) and `lru_crawler metadump`
//! (`key=<uri-encoded key> exp=... la=... cas=... fetch=... cls=... size=...`),
//! as documented in memcached's `doc/protocol.txt`.

use std::collections::BTreeMap;

use percent_encoding::percent_decode;

/// `STAT <name> <value>` lines as a map; other lines are ignored.
pub(crate) fn stats(lines: &[Vec<u8>]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter_map(|line| {
            let line = String::from_utf8_lossy(line);
            let (name, value) = line.strip_prefix("STAT ")?.split_once(' ')?;
            Some((name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// One numeric `stats` value.
pub(crate) fn stat_u64(stats: &BTreeMap<String, String>, name: &str) -> Option<u64> {
    stats.get(name)?.parse().ok()
}

/// The raw key of a `lru_crawler metadump` line (memcached URI-encodes it).
pub(crate) fn metadump_key(line: &[u8]) -> Option<Vec<u8>> {
    let encoded = line.strip_prefix(b"key=")?.split(|b| *b == b' ').next()?;
    Some(percent_decode(encoded).collect())
}

/// The `size=` field of a `lru_crawler metadump` line (bytes as memcached counts the item).
pub(crate) fn metadump_size(line: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(line)
        .split(' ')
        .find_map(|field| field.strip_prefix("size=")?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadump_lines() {
        let line = b"key=%2Fcaf%C3%A9 exp=-1 la=1 cas=2 fetch=no cls=1 size=70";
        assert_eq!(metadump_key(line), Some(b"/caf\xc3\xa9".to_vec()));
        assert_eq!(metadump_size(line), Some(70));
        assert_eq!(
            metadump_key(b"key=%2Fx%2520y exp=1"),
            Some(b"/x%20y".to_vec())
        );
        assert_eq!(metadump_key(b"END"), None);
        assert_eq!(metadump_size(b"key=a exp=1"), None);
    }

    #[test]
    fn stats_lines() {
        let lines = [
            b"STAT pid 42".to_vec(),
            b"STAT version 1.6.18".to_vec(),
            b"junk".to_vec(),
        ];
        let map = stats(&lines);
        assert_eq!(map.len(), 2);
        assert_eq!(stat_u64(&map, "pid"), Some(42));
        assert_eq!(stat_u64(&map, "version"), None);
        assert_eq!(stat_u64(&map, "uptime"), None);
    }
}
