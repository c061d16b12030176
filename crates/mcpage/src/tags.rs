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

use crate::config::TagSeparator;

/// Below this size an index item is never compacted.
pub(crate) const COMPACT_MIN_BYTES: usize = 4096;

/// Extra lifetime of index items over the page TTL, so an index item always
/// outlives the pages it lists (each registration extends it).
const INDEX_TTL_MARGIN_SECS: u32 = 600;

/// Lifetime of index items and clocks for pages stored with `page_ttl`
/// seconds: longer than any page they cover.
pub(crate) fn index_ttl(page_ttl: u32) -> u32 {
    page_ttl.saturating_add(INDEX_TTL_MARGIN_SECS)
}

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

    /// Where the page pool remembers which process an index server was (see
    /// `Invalidator::recover_lost_index`).
    pub(crate) fn index_boot(&self, server: &str) -> Vec<u8> {
        format!("{}boot:{}", self.ns, short_hash(server.as_bytes())).into_bytes()
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

/// One index record: the page key and the clock the render read before it
/// started (`K G\n`; K never contains a space or a newline).
///
/// The clock is what makes clearing safe: an invalidation at clock C removes
/// only records with G < C. Those renders started before it, so their pages are
/// gone (deleted by it, or by the render's own re-check). A record with G >= C
/// belongs to a render of committed data whose page must stay findable by the
/// next invalidation, even if it registered while this one was running.
pub(crate) fn record(page_key: &[u8], clock: u64) -> Vec<u8> {
    let mut record = Vec::with_capacity(page_key.len() + 22);
    record.extend_from_slice(page_key);
    record.push(b' ');
    record.extend_from_slice(clock.to_string().as_bytes());
    record.push(b'\n');
    record
}

/// The records of an index item as (page key, clock), duplicates included.
/// A record without a clock reads as clock 0 (removed by any invalidation).
pub(crate) fn entries(value: &[u8]) -> impl Iterator<Item = (&[u8], u64)> {
    value
        .split(|b| *b == b'\n')
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.iter().rposition(|b| *b == b' ') {
            Some(space) => {
                let clock = std::str::from_utf8(&entry[space + 1..])
                    .ok()
                    .and_then(|c| c.parse().ok());
                (&entry[..space], clock.unwrap_or(0))
            }
            None => (entry, 0),
        })
}

fn push_record(out: &mut Vec<u8>, page_key: &[u8], clock: u64) {
    out.extend_from_slice(&record(page_key, clock));
}

/// One record per page key, with its highest clock, in first-seen order.
pub(crate) fn compact(value: &[u8]) -> Vec<u8> {
    let mut order: Vec<&[u8]> = Vec::new();
    let mut latest: std::collections::HashMap<&[u8], u64> = std::collections::HashMap::new();
    for (key, clock) in entries(value) {
        match latest.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if clock > *e.get() {
                    e.insert(clock);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(clock);
                order.push(key);
            }
        }
    }
    let mut out = Vec::with_capacity(value.len());
    for key in order {
        push_record(&mut out, key, latest[key]);
    }
    out
}

/// The records an invalidation at `clock` must keep: renders that started after it.
pub(crate) fn retain_since(value: &[u8], clock: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, g) in entries(value) {
        if g >= clock {
            push_record(&mut out, key, g);
        }
    }
    out
}

/// Does the item already list `page_key` with a clock of at least `clock`?
pub(crate) fn lists(value: &[u8], page_key: &[u8], clock: u64) -> bool {
    entries(value).any(|(key, g)| key == page_key && g >= clock)
}

/// Should a writer compact an item of `size` bytes whose last compaction left
/// `compacted` bytes (its client flags) before appending `adding` bytes?
pub(crate) fn needs_compaction(size: usize, compacted: usize, adding: usize) -> bool {
    let after = size + adding;
    after > COMPACT_MIN_BYTES && after > compacted.saturating_mul(2)
}

/// Tags from an `X-Cache-Tags` header value: comma-separated, trimmed, empty
/// ones dropped. `None` when there are too many or one is too long.
pub(crate) fn parse_header(value: &[u8], separator: TagSeparator) -> Option<Vec<String>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut tags = Vec::new();
    let pieces: Box<dyn Iterator<Item = &str>> = match separator {
        TagSeparator::Comma => Box::new(text.split(',')),
        TagSeparator::Space => Box::new(text.split([' ', '\t'])),
    };
    for tag in pieces {
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
    fn compaction_keeps_one_record_per_page_with_its_latest_clock() {
        assert_eq!(
            compact(b"/a 1\n/b 5\n/a 3\n\n/c 2\n/b 4\n"),
            b"/a 3\n/b 5\n/c 2\n"
        );
        assert_eq!(compact(b""), b"");
        assert_eq!(
            entries(b"/a 1\n/b\n").collect::<Vec<_>>(),
            vec![(&b"/a"[..], 1), (&b"/b"[..], 0)]
        );
    }

    #[test]
    fn invalidation_keeps_only_renders_that_started_after_it() {
        assert_eq!(retain_since(b"/a 1\n/b 5\n/c 7\n", 5), b"/b 5\n/c 7\n");
        assert_eq!(retain_since(b"/a 1\n", 5), b"");
        assert!(lists(b"/a 1\n/b 5\n", b"/b", 5));
        assert!(!lists(b"/a 1\n/b 5\n", b"/a", 5));
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
            parse_header(b" comments, article:42 ,,comments", TagSeparator::Comma),
            Some(vec!["article:42".to_owned(), "comments".to_owned()])
        );
        assert_eq!(parse_header(b"", TagSeparator::Comma), Some(vec![]));
        assert_eq!(
            parse_header(
                b"node:1  node_list\tconfig:system.site",
                TagSeparator::Space
            ),
            Some(vec![
                "config:system.site".to_owned(),
                "node:1".to_owned(),
                "node_list".to_owned()
            ])
        );
        assert_eq!(parse_header(b"\xff", TagSeparator::Comma), None);
        let many = (0..=MAX_TAGS_PER_PAGE)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_header(many.as_bytes(), TagSeparator::Comma), None);
        assert_eq!(
            parse_header(
                "x".repeat(MAX_TAG_BYTES + 1).as_bytes(),
                TagSeparator::Comma
            ),
            None
        );
    }

    proptest! {
        #[test]
        fn compact_is_idempotent_and_keeps_every_page_at_its_latest_clock(
            records in proptest::collection::vec(("[a-z/]{1,8}", 0u64..100), 0..50)
        ) {
            let value: Vec<u8> = records.iter().flat_map(|(k, g)| record(k.as_bytes(), *g)).collect();
            let once = compact(&value);
            prop_assert_eq!(compact(&once), once.clone());
            for (key, g) in entries(&value) {
                prop_assert!(lists(&once, key, g), "compaction lost {:?} at {}", key, g);
            }
            prop_assert_eq!(entries(&once).count(), entries(&once).map(|(k, _)| k).collect::<std::collections::HashSet<_>>().len());
        }

        #[test]
        fn header_parsing_never_panics(value in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse_header(&value, TagSeparator::Comma);
        }
    }
}
