//! `mcpage invalidate`: remove pages by tag, URL or prefix.
//!
//! Prints how many pages each tag, URL and prefix removed, then the total.
//! Exit codes: 0 done; 1 memcached did not confirm (some pages may still be
//! cached: the error says which server); 2 usage (nothing to invalidate, or
//! a URL that has no cache key).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use mcpage::{Cache, Config, Removed};

/// Arguments of `mcpage invalidate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Remove every page registered under this tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Remove the page of this URL, written as users do: /a//b, /caf%C3%A9 (repeatable).
    #[arg(long = "url", value_name = "PATH")]
    urls: Vec<String>,
    /// Remove every page whose path starts with this (`/` removes all pages; walks memcached's key list).
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
}

/// The exit code when memcached did not confirm.
const INCOMPLETE: u8 = 1;
/// The exit code for usage errors.
const USAGE: u8 = 2;

pub(crate) async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let tags: Vec<&String> = args.tags.iter().filter(|t| !t.trim().is_empty()).collect();
    if tags.is_empty() && args.urls.is_empty() && args.prefix.is_none() {
        eprintln!(
            "mcpage invalidate: nothing to invalidate: give --tag TAG, --url PATH or --prefix PREFIX"
        );
        return Ok(ExitCode::from(USAGE));
    }
    let cache = Cache::connect(config)
        .await
        .context("cannot set up the memcached pools")?;
    // Every URL must map to a key before anything is removed.
    for url in &args.urls {
        let (host, target) = mcpage::key::split_url(url);
        if let Err(skip) = cache.page_key(host.map(str::as_bytes), target.as_bytes()) {
            eprintln!(
                "mcpage invalidate: --url `{url}` has no cache key ({}): such pages are never cached",
                skip.reason()
            );
            return Ok(ExitCode::from(USAGE));
        }
    }

    let invalidator = cache.invalidator();
    let mut report = Report::default();
    // Each kind is tried even when an earlier one failed: remove what can be removed.
    let mut failures = Vec::new();
    if !tags.is_empty() {
        match invalidator.invalidate_tags(&tags).await {
            Ok(removed) => report.add("tag", &removed, tags.iter().map(|t| t.trim())),
            Err(error) => {
                report.failed("tag", tags.iter().map(|t| t.trim()));
                failures.push(("tag", error));
            }
        }
    }
    if !args.urls.is_empty() {
        match invalidator.invalidate_urls(&args.urls).await {
            Ok(removed) => report.add("url", &removed, args.urls.iter().map(String::as_str)),
            Err(error) => {
                report.failed("url", args.urls.iter().map(String::as_str));
                failures.push(("url", error));
            }
        }
    }
    if let Some(prefix) = &args.prefix {
        match invalidator.purge_prefix(prefix).await {
            Ok(removed) => report.add("prefix", &removed, [prefix.as_str()]),
            Err(error) => {
                report.failed("prefix", [prefix.as_str()]);
                failures.push(("prefix", error));
            }
        }
    }

    let mut stdout = std::io::stdout().lock();
    report.print(&mut stdout).context("write to stdout")?;
    stdout.flush().context("write to stdout")?;
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (kind, error) in &failures {
        eprintln!(
            "mcpage invalidate: removing by {kind} was not confirmed, pages may still be cached \
             (run it again): {error}"
        );
    }
    Ok(ExitCode::from(INCOMPLETE))
}

/// What was removed so far.
#[derive(Default)]
struct Report {
    /// (kind, item, pages removed; `None`: not confirmed)
    rows: Vec<(&'static str, String, Option<usize>)>,
    total: usize,
    incomplete: bool,
}

impl Report {
    fn add<'a>(
        &mut self,
        kind: &'static str,
        removed: &Removed,
        items: impl IntoIterator<Item = &'a str>,
    ) {
        self.rows(kind, items, |item| Some(removed.count_for(item)));
        self.total += removed.pages;
    }

    fn failed<'a>(&mut self, kind: &'static str, items: impl IntoIterator<Item = &'a str>) {
        self.rows(kind, items, |_| None);
        self.incomplete = true;
    }

    fn rows<'a>(
        &mut self,
        kind: &'static str,
        items: impl IntoIterator<Item = &'a str>,
        count: impl Fn(&str) -> Option<usize>,
    ) {
        let mut seen = Vec::new();
        for item in items {
            if !seen.contains(&item) {
                seen.push(item);
                self.rows.push((kind, item.to_owned(), count(item)));
            }
        }
    }

    fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let width = self
            .rows
            .iter()
            .map(|(kind, item, _)| kind.len() + 1 + item.chars().count())
            .max()
            .unwrap_or(0);
        for (kind, item, pages) in &self.rows {
            let label = format!("{kind} {item}");
            match pages {
                Some(pages) => writeln!(out, "{label:<width$}  {}", pages_text(*pages))?,
                None => writeln!(out, "{label:<width$}  not confirmed")?,
            }
        }
        if self.incomplete {
            writeln!(out, "removed {} (incomplete)", pages_text(self.total))
        } else {
            writeln!(out, "removed {}", pages_text(self.total))
        }
    }
}

fn pages_text(n: usize) -> String {
    if n == 1 {
        "1 page".to_owned()
    } else {
        format!("{n} pages")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines() {
        let mut report = Report::default();
        report.add("tag", &Removed::default(), ["comments", "comments"]);
        report.failed("url", ["/about"]);
        let mut out = Vec::new();
        report.print(&mut out).expect("write");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "tag comments  0 pages\nurl /about    not confirmed\nremoved 0 pages (incomplete)\n"
        );
    }
}
