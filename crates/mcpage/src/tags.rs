//! The tag index: which pages depend on a tag, and when each tag was last invalidated.
//!
//! Keys on the index pool (`ns` = `cache.index_namespace`):
//! - `<ns>clock`: the invalidation clock G, a counter that only grows. It is
//!   created at the current time in microseconds, so a restarted index server
//!   never hands out a value an earlier render already saw.
//! - `<ns>tc:<hash(tag)>`: the clock value of the tag's last invalidation.
//! - `<ns>uc:<hash(K)>`: the same for one URL (`invalidate_urls`).
//! - `<ns>pc`: the same for `purge_prefix` (any purge).
//! - `<ns>t:<hash(tag)>:<shard>`: index items, `K\n` records appended atomically
//!   (meta `ms` append mode with autovivify), never read-modify-written except by
//!   compaction, which is CAS-guarded so a concurrent append is never lost.
//!
//! A tag's pages are spread over `index_shards` items by crc32 of the page key.
//! Growth is bounded: an item's client flags hold its size after the last
//! compaction; once it doubles (or passes [`COMPACT_MIN_BYTES`]) the writer
//! removes duplicate records, so re-rendering one URL forever keeps one record.
//! A shard that would pass `index_shard_max_bytes` even without duplicates
//! refuses the registration: that page is then not cached.

use sha2::{Digest, Sha256};

/// Below this size an index item is never compacted.
pub(crate) const COMPACT_MIN_BYTES: usize = 4096;

/// Extra lifetime of index items over the page TTL, so an index item always
/// outlives the pages it lists (each registration extends it).
pub(crate) const INDEX_TTL_MARGIN_SECS: u32 = 600;

/// Most tags one page may carry; more means the page is not cached.
pub(crate) const MAX_TAGS_PER_PAGE: usize = 128;

/// Longest tag accepted (bytes); longer tags mean the page is not cached.
pub(crate) const MAX_TAG_BYTES: usize = 1024;

/// Names of the index keys under one namespace.
#[derive(Debug, Clone)]
pub(crate) struct IndexKeys {
    ns: String,
    shards: u32,
}

fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl IndexKeys {
    pub(crate) fn new(ns: &str, shards: u32) -> Self {
        IndexKeys {
            ns: ns.to_owned(),
            shards: shards.max(1),
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.ns
    }

    pub(crate) fn clock(&self) -> Vec<u8> {
        format!("{}clock", self.ns).into_bytes()
    }

    pub(crate) fn purge_clock(&self) -> Vec<u8> {
        format!("{}pc", self.ns).into_bytes()
    }

    pub(crate) fn tag_clock(&self, tag: &str) -> Vec<u8> {
        format!("{}tc:{}", self.ns, short_hash(tag.as_bytes())).into_bytes()
    }

    pub(crate) fn url_clock(&self, page_key: &[u8]) -> Vec<u8> {
        format!("{}uc:{}", self.ns, short_hash(page_key)).into_bytes()
    }

    /// The shard item of `tag` that lists `page_key`.
    pub(crate) fn shard_for(&self, tag: &str, page_key: &[u8]) -> Vec<u8> {
        self.shard(tag, crc32fast::hash(page_key) % self.shards)
    }

    pub(crate) fn shard(&self, tag: &str, shard: u32) -> Vec<u8> {
        format!("{}t:{}:{shard}", self.ns, short_hash(tag.as_bytes())).into_bytes()
    }

    pub(crate) fn all_shards(&self, tag: &str) -> impl Iterator<Item = Vec<u8>> + '_ {
        let hash = short_hash(tag.as_bytes());
        (0..self.shards).map(move |shard| format!("{}t:{hash}:{shard}", self.ns).into_bytes())
    }
}

/// One index record for a page key.
pub(crate) fn record(page_key: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(page_key.len() + 1);
    record.extend_from_slice(page_key);
    record.push(b'\n');
    record
}

/// The page keys listed in an index item (duplicates included).
pub(crate) fn entries(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b'\n')
        .filter(|entry| !entry.is_empty())
}

/// The item without duplicate records, first occurrence kept.
pub(crate) fn compact(value: &[u8]) -> Vec<u8> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(value.len());
    for entry in entries(value) {
        if seen.insert(entry) {
            out.extend_from_slice(entry);
            out.push(b'\n');
        }
    }
    out
}

/// Should a writer compact an item of `size` bytes whose last compaction left
/// `compacted` bytes (its client flags) before appending `adding` bytes?
pub(crate) fn needs_compaction(size: usize, compacted: usize, adding: usize) -> bool {
    let after = size + adding;
    after > COMPACT_MIN_BYTES && after > compacted.saturating_mul(2)
}

/// Tags from an `X-Cache-Tags` header value: comma-separated, trimmed, empty
/// ones dropped. `None` when there are too many or one is too long.
pub(crate) fn parse_header(value: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut tags = Vec::new();
    for tag in text.split(',') {
        let tag = tag.trim();
        if tag.is_empty() {
            continue;
        }
        if tag.len() > MAX_TAG_BYTES || tags.len() >= MAX_TAGS_PER_PAGE {
            return None;
        }
        tags.push(tag.to_owned());
    }
    tags.sort();
    tags.dedup();
    Some(tags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_are_valid_memcached_keys_for_any_tag() {
        let keys = IndexKeys::new("mcpage:", 16);
        for tag in [
            "comments",
            "article:42",
            "with space",
            "ünïcödé",
            "\r\n",
            &"x".repeat(1000),
        ] {
            for key in [
                keys.tag_clock(tag),
                keys.shard_for(tag, b"/a"),
                keys.shard(tag, 15),
            ] {
                assert!(key.len() <= 250);
                assert!(key.iter().all(|b| *b > b' ' && *b != 0x7f), "{key:?}");
            }
        }
        assert_ne!(keys.tag_clock("a"), keys.tag_clock("b"));
        assert_ne!(keys.shard("a", 0), keys.shard("a", 1));
    }

    #[test]
    fn compaction_keeps_first_occurrences() {
        assert_eq!(compact(b"/a\n/b\n/a\n\n/c\n/b\n"), b"/a\n/b\n/c\n");
        assert_eq!(compact(b""), b"");
        assert_eq!(entries(b"/a\n/b\n").count(), 2);
    }

    #[test]
    fn compaction_threshold_doubles() {
        assert!(!needs_compaction(100, 0, 10));
        assert!(needs_compaction(COMPACT_MIN_BYTES, 0, 10));
        assert!(!needs_compaction(10_000, 6_000, 10));
        assert!(needs_compaction(12_000, 6_000, 10));
    }

    #[test]
    fn header_parsing() {
        assert_eq!(
            parse_header(b" comments, article:42 ,,comments"),
            Some(vec!["article:42".to_owned(), "comments".to_owned()])
        );
        assert_eq!(parse_header(b""), Some(vec![]));
        assert_eq!(parse_header(b"\xff"), None);
        let many = (0..=MAX_TAGS_PER_PAGE)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_header(many.as_bytes()), None);
        assert_eq!(parse_header("x".repeat(MAX_TAG_BYTES + 1).as_bytes()), None);
    }

    proptest! {
        #[test]
        fn compact_is_idempotent_and_keeps_every_entry(keys in proptest::collection::vec("[a-z/]{1,8}", 0..50)) {
            let value: Vec<u8> = keys.iter().flat_map(|k| record(k.as_bytes())).collect();
            let once = compact(&value);
            prop_assert_eq!(compact(&once), once.clone());
            let set: std::collections::HashSet<&[u8]> = entries(&value).collect();
            let compacted: std::collections::HashSet<&[u8]> = entries(&once).collect();
            prop_assert_eq!(set, compacted);
        }

        #[test]
        fn header_parsing_never_panics(value in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse_header(&value);
        }
    }
}
