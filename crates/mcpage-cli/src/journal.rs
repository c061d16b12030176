//! The journal of pending invalidations (`proxy.journal`): the tags, URLs and
//! prefixes memcached has not confirmed yet, so a restarted proxy retries them
//! and `mcpage stats` can show them from another process.
//!
//! One JSON document, `{"version": 1, "pending": [{"target": {"tag": "x"},
//! "since_unix_ms": ...}]}`, rewritten whole on every change: written to a
//! temporary file, synced, renamed over the journal, and the directory synced,
//! so a crash leaves the old journal or the new one, never a torn one. The
//! proxy writes it before it answers `202` for a pending invalidation.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use mcpage::{Invalidator, PendingItem};
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Document {
    version: u32,
    pending: Vec<PendingItem>,
}

/// Read the journal; a missing file is an empty one.
///
/// # Errors
/// The file cannot be read or is not a journal of this version.
pub(crate) fn read(path: &Path) -> anyhow::Result<Vec<PendingItem>> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    };
    let document: Document = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not an mcpage journal", path.display()))?;
    if document.version != VERSION {
        anyhow::bail!(
            "{}: journal version {} (this mcpage writes {VERSION})",
            path.display(),
            document.version
        );
    }
    Ok(document.pending)
}

/// Replace the journal with `pending`, atomically and durably.
fn write(path: &Path, pending: Vec<PendingItem>) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(&Document {
        version: VERSION,
        pending,
    })
    .map_err(std::io::Error::other)?;
    text.push(b'\n');
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&text)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// The oldest pending item's age, from the journal's timestamps.
pub(crate) fn oldest_age(pending: &[PendingItem]) -> Option<Duration> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    pending
        .iter()
        .map(|item| Duration::from_millis(now.saturating_sub(item.since_unix_ms)))
        .max()
}

/// The proxy's journal: one writer at a time, each writing the queue as it is
/// when it gets its turn (so the last write is never older than the queue).
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    turn: tokio::sync::Mutex<()>,
}

impl Journal {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Journal {
        Journal {
            path: path.into(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Write `invalidator`'s pending queue.
    ///
    /// # Errors
    /// The journal could not be written (the queue stays in memory).
    pub(crate) async fn save(&self, invalidator: &Invalidator) -> anyhow::Result<()> {
        let _turn = self.turn.lock().await;
        let pending = invalidator.pending_items();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write(&path, pending))
            .await
            .context("journal writer")?
            .with_context(|| format!("write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpage::Target;

    #[test]
    fn the_journal_round_trips_and_a_missing_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("mcpage-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("proxy.journal");
        assert!(read(&path).expect("missing").is_empty());
        let items = vec![
            PendingItem::new(Target::Tag("comments".into()), 1),
            PendingItem::new(Target::Url("/about".into()), 2),
        ];
        write(&path, items.clone()).expect("write");
        assert_eq!(read(&path).expect("read"), items);
        assert!(oldest_age(&items).is_some_and(|age| age > Duration::from_secs(3600)));
        std::fs::write(&path, b"{\"version\": 2, \"pending\": []}").expect("write");
        assert!(read(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
