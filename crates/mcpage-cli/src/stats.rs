//! `mcpage stats`: memcached's own statistics per server, the tag index size,
//! and the invalidations the proxy's journal (`proxy.journal`) still holds.
//!
//! Exit codes: 0 all fine; 1 a server is down (reported, not a crash);
//! 3 the index pool has evicted items, so invalidation can no longer be
//! complete (a page may have lost its only route to invalidation).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use mcpage::{Cache, Config, IndexUsage};
use serde::Serialize;

/// Arguments of `mcpage stats`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// One JSON object: servers, index, warnings.
    #[arg(long)]
    json: bool,
}

/// The exit code when a server is down.
const DOWN: u8 = 1;
/// The exit code when the index pool evicted items.
const INDEX_EVICTIONS: u8 = 3;

/// One memcached server.
#[derive(Debug, Serialize)]
struct ServerReport {
    server: String,
    /// `pages`, `index` or `pages+index`.
    role: &'static str,
    up: bool,
    /// Why it is down.
    error: Option<String>,
    items: Option<u64>,
    bytes: Option<u64>,
    limit_maxbytes: Option<u64>,
    get_hits: Option<u64>,
    get_misses: Option<u64>,
    /// get_hits / (get_hits + get_misses); `None` before the first get.
    hit_ratio: Option<f64>,
    evictions: Option<u64>,
    curr_connections: Option<u64>,
}

/// The tag index on one index server.
#[derive(Debug, Serialize)]
struct IndexReport {
    server: String,
    error: Option<String>,
    items: Option<u64>,
    bytes: Option<u64>,
    largest: Option<u64>,
}

/// Invalidations memcached has not confirmed yet, from the proxy's journal.
#[derive(Debug, Serialize)]
struct PendingReport {
    journal: String,
    /// Why the journal could not be read.
    error: Option<String>,
    count: usize,
    oldest_secs: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    servers: Vec<ServerReport>,
    index: Vec<IndexReport>,
    /// `None` without `proxy.journal`.
    pending: Option<PendingReport>,
    warnings: Vec<String>,
}

pub(crate) async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let cache = Cache::connect(config)
        .await
        .context("cannot set up the memcached pools")?;
    let is_page = |name: &str| config.memcached.servers.iter().any(|s| s.address == name);
    let is_index = |name: &str| {
        config
            .memcached
            .index_pool()
            .iter()
            .any(|s| s.address == name)
    };
    let servers: Vec<ServerReport> = cache
        .memcached_stats()
        .await
        .into_iter()
        .map(|report| {
            let role = match (is_page(&report.server), is_index(&report.server)) {
                (true, true) => "pages+index",
                (false, true) => "index",
                _ => "pages",
            };
            server_report(report.server, role, report.result)
        })
        .collect();
    let index: Vec<IndexReport> = cache
        .index_usage()
        .await
        .into_iter()
        .map(|report| index_report(report.server, report.result))
        .collect();

    let mut warnings = Vec::new();
    let down: Vec<&ServerReport> = servers.iter().filter(|s| !s.up).collect();
    for server in &down {
        warnings.push(format!(
            "memcached {} is down: {}; nginx sends its pages to the app (or to the next server on the ring)",
            server.server,
            server.error.as_deref().unwrap_or("no answer")
        ));
    }
    let shared_pool = config.memcached.index_servers.is_empty();
    let evicting: Vec<&ServerReport> = servers
        .iter()
        .filter(|s| s.role != "pages" && s.evictions.is_some_and(|e| e > 0))
        .collect();
    for server in &evicting {
        let evictions = server.evictions.unwrap_or_default();
        let why = if shared_pool {
            "the tag index shares the page servers (memcached.index_servers is empty), \
             so index items may be among the evicted"
        } else {
            "index items were evicted"
        };
        warnings.push(format!(
            "INDEX EVICTIONS: memcached {} evicted {evictions} items and {why}: invalidation can \
             no longer be complete: run the index pool with -M and purge_prefix('/') \
             (`mcpage invalidate --prefix /`)",
            server.server
        ));
    }
    let pending = config.proxy.journal.as_deref().map(|path| {
        let (count, oldest_secs, error) = match crate::journal::read(std::path::Path::new(path)) {
            Ok(items) => (
                items.len(),
                crate::journal::oldest_age(&items).map(|age| age.as_secs_f64()),
                None,
            ),
            Err(error) => (0, None, Some(format!("{error:#}"))),
        };
        PendingReport {
            journal: path.to_owned(),
            error,
            count,
            oldest_secs,
        }
    });
    if let Some(pending) = &pending {
        if let Some(error) = &pending.error {
            warnings.push(format!("cannot read the journal: {error}"));
        } else if pending.count > 0 {
            warnings.push(format!(
                "{} invalidation(s) pending for {:.0} s (memcached has not confirmed them; the proxy \
                 retries them): their pages may be stale",
                pending.count,
                pending.oldest_secs.unwrap_or_default()
            ));
        }
    }
    let (any_down, any_evicting) = (!down.is_empty(), !evicting.is_empty());
    let report = Report {
        servers,
        index,
        pending,
        warnings,
    };

    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &report).context("write to stdout")?;
        writeln!(stdout).context("write to stdout")?;
    } else {
        print_human(&mut stdout, &report).context("write to stdout")?;
    }
    stdout.flush().context("write to stdout")?;
    for warning in &report.warnings {
        eprintln!("mcpage stats: WARNING: {warning}");
    }
    Ok(if any_down {
        ExitCode::from(DOWN)
    } else if any_evicting {
        ExitCode::from(INDEX_EVICTIONS)
    } else {
        ExitCode::SUCCESS
    })
}

fn server_report(
    server: String,
    role: &'static str,
    stats: mcpage::Result<BTreeMap<String, String>>,
) -> ServerReport {
    match stats {
        Ok(stats) => {
            let number = |name: &str| stats.get(name).and_then(|v| v.trim().parse::<u64>().ok());
            let (get_hits, get_misses) = (number("get_hits"), number("get_misses"));
            let hit_ratio = match (get_hits, get_misses) {
                (Some(hits), Some(misses)) if hits + misses > 0 => {
                    Some(hits as f64 / (hits + misses) as f64)
                }
                _ => None,
            };
            ServerReport {
                server,
                role,
                up: true,
                error: None,
                items: number("curr_items"),
                bytes: number("bytes"),
                limit_maxbytes: number("limit_maxbytes"),
                get_hits,
                get_misses,
                hit_ratio,
                evictions: number("evictions"),
                curr_connections: number("curr_connections"),
            }
        }
        Err(error) => ServerReport {
            error: Some(error.detail()),
            server,
            role,
            up: false,
            items: None,
            bytes: None,
            limit_maxbytes: None,
            get_hits: None,
            get_misses: None,
            hit_ratio: None,
            evictions: None,
            curr_connections: None,
        },
    }
}

fn index_report(server: String, usage: mcpage::Result<IndexUsage>) -> IndexReport {
    match usage {
        Ok(usage) => IndexReport {
            server,
            error: None,
            items: Some(usage.items),
            bytes: Some(usage.bytes),
            largest: Some(usage.largest),
        },
        Err(error) => IndexReport {
            error: Some(error.detail()),
            server,
            items: None,
            bytes: None,
            largest: None,
        },
    }
}

fn print_human(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let dash = || "-".to_owned();
    let mut table = Table::new(&[
        "server",
        "role",
        "items",
        "bytes",
        "hit ratio",
        "evictions",
        "connections",
    ]);
    for s in &report.servers {
        if s.up {
            table.row(vec![
                s.server.clone(),
                s.role.to_owned(),
                s.items.map_or_else(dash, |n| n.to_string()),
                s.bytes.map_or_else(dash, size),
                s.hit_ratio
                    .map_or_else(dash, |r| format!("{:.1}%", r * 100.0)),
                s.evictions.map_or_else(dash, |n| n.to_string()),
                s.curr_connections.map_or_else(dash, |n| n.to_string()),
            ]);
        } else {
            table.note(
                vec![s.server.clone(), s.role.to_owned()],
                format!("DOWN: {}", s.error.as_deref().unwrap_or("no answer")),
            );
        }
    }
    table.print(out)?;
    writeln!(out)?;
    let mut table = Table::new(&["tag index", "items", "bytes", "largest"]);
    for i in &report.index {
        match &i.error {
            None => table.row(vec![
                i.server.clone(),
                i.items.map_or_else(dash, |n| n.to_string()),
                i.bytes.map_or_else(dash, size),
                i.largest.map_or_else(dash, size),
            ]),
            Some(error) => table.note(vec![i.server.clone()], format!("DOWN: {error}")),
        }
    }
    table.print(out)?;
    if let Some(pending) = &report.pending {
        writeln!(out)?;
        let mut table = Table::new(&["pending invalidations", "count", "oldest"]);
        match &pending.error {
            None => table.row(vec![
                pending.journal.clone(),
                pending.count.to_string(),
                pending
                    .oldest_secs
                    .map_or_else(dash, |secs| format!("{secs:.0} s")),
            ]),
            Some(error) => table.note(
                vec![pending.journal.clone()],
                format!("UNREADABLE: {error}"),
            ),
        }
        table.print(out)?;
    }
    Ok(())
}

/// A text table: the first two columns left-aligned, the rest right-aligned;
/// a "note" row fills its leading cells and then runs on as free text.
struct Table {
    header: Vec<String>,
    rows: Vec<(Vec<String>, Option<String>)>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push((cells, None));
    }

    fn note(&mut self, cells: Vec<String>, note: String) {
        self.rows.push((cells, Some(note)));
    }

    fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for (cells, _) in &self.rows {
            for (width, cell) in widths.iter_mut().zip(cells) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let left = |i: usize| i == 0 || (i == 1 && self.header.len() > 4);
        let line = |cells: &[String], note: Option<&str>| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let width = widths[i];
                if left(i) {
                    text.push_str(&format!("{cell:<width$}"));
                } else {
                    text.push_str(&format!("{cell:>width$}"));
                }
            }
            if let Some(note) = note {
                text.push_str("  ");
                text.push_str(note);
            }
            text.trim_end().to_owned()
        };
        writeln!(out, "{}", line(&self.header, None))?;
        for (cells, note) in &self.rows {
            writeln!(out, "{}", line(cells, note.as_deref()))?;
        }
        Ok(())
    }
}

/// Bytes for people: `512 B`, `44.0 KiB`, `1.5 MiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(45_100), "44.0 KiB");
        assert_eq!(size(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn table_alignment() {
        let mut table = Table::new(&["tag index", "items", "bytes", "largest"]);
        table.row(vec!["a:1".into(), "16".into(), "1 B".into(), "1 B".into()]);
        table.note(vec!["b:22".into()], "DOWN: refused".into());
        let mut out = Vec::new();
        table.print(&mut out).expect("write");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "tag index  items  bytes  largest\n\
             a:1           16    1 B      1 B\n\
             b:22       DOWN: refused\n"
        );
    }
}
