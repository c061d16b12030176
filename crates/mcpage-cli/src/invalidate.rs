//! `mcpage invalidate`: remove pages by tag, URL or prefix.
//!
//! Prints how many pages each tag, URL and prefix removed, then the total.
//! All of them go in one invalidation run. What memcached does not confirm
//! is retried with backoff for up to `--wait` seconds (the library's retry
//! queue); the process then exits, so work still pending is reported, not kept.
//! Exit codes: 0 done (at once or after retries); 1 still not confirmed after
//! `--wait` (some pages may still be cached: the error says which server);
//! 2 usage (nothing to invalidate, or a URL that has no cache key).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use mcpage::{Cache, Config, Removed, Target};

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
    /// Keep retrying what memcached did not confirm for this long before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    wait: u64,
}

/// The exit code when memcached did not confirm.
const INCOMPLETE: u8 = 1;
/// The exit code for usage errors.
const USAGE: u8 = 2;
/// How often the retry queue is looked at while waiting.
const POLL: Duration = Duration::from_millis(50);

pub(crate) async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let tags: Vec<&str> = args
        .tags
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .collect();
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

    let mut targets: Vec<Target> = tags.iter().map(|t| Target::Tag((*t).to_owned())).collect();
    targets.extend(args.urls.iter().map(|u| Target::Url(u.clone())));
    targets.extend(args.prefix.iter().map(|p| Target::Prefix(p.clone())));
    let invalidator = cache.invalidator();
    let mut report = Report::default();
    let failure = match invalidator.invalidate(targets.iter().cloned()).await {
        Ok(removed) => {
            report.add(&removed, &targets);
            None
        }
        Err(error) => {
            // Pending work is retried in the background: wait for it.
            let deadline = Instant::now() + Duration::from_secs(args.wait);
            while matches!(error, mcpage::Error::Pending { .. })
                && invalidator.pending().count > 0
                && Instant::now() < deadline
            {
                tokio::time::sleep(POLL).await;
            }
            let confirmed =
                matches!(error, mcpage::Error::Pending { .. }) && invalidator.pending().count == 0;
            report.unknown(&targets, confirmed);
            (!confirmed).then_some(error)
        }
    };

    let mut stdout = std::io::stdout().lock();
    report.print(&mut stdout).context("write to stdout")?;
    stdout.flush().context("write to stdout")?;
    let Some(error) = failure else {
        return Ok(ExitCode::SUCCESS);
    };
    let error = match invalidator.pending().last_error {
        Some(last) if matches!(error, mcpage::Error::Pending { .. }) => last,
        _ => error.to_string(),
    };
    eprintln!(
        "mcpage invalidate: not confirmed after retrying for {} s, pages may still be cached \
         (run it again): {error}",
        args.wait
    );
    Ok(ExitCode::from(INCOMPLETE))
}

/// One row of the report.
enum Count {
    Pages(usize),
    /// Confirmed by a retry (the counts of retries are not kept).
    Retried,
    NotConfirmed,
}

/// What was removed.
#[derive(Default)]
struct Report {
    rows: Vec<(&'static str, String, Count)>,
    total: usize,
    retried: bool,
    incomplete: bool,
}

fn kind(target: &Target) -> &'static str {
    match target {
        Target::Url(_) => "url",
        Target::Prefix(_) => "prefix",
        _ => "tag",
    }
}

impl Report {
    fn add(&mut self, removed: &Removed, targets: &[Target]) {
        self.rows(targets, |target| {
            Count::Pages(
                removed
                    .by_item
                    .iter()
                    .find(|item| item.target == *target)
                    .map_or(0, |item| item.pages),
            )
        });
        self.total += removed.pages;
    }

    fn unknown(&mut self, targets: &[Target], confirmed: bool) {
        self.rows(targets, |_| {
            if confirmed {
                Count::Retried
            } else {
                Count::NotConfirmed
            }
        });
        self.retried = confirmed;
        self.incomplete = !confirmed;
    }

    fn rows(&mut self, targets: &[Target], count: impl Fn(&Target) -> Count) {
        let mut seen: Vec<&Target> = Vec::new();
        for target in targets {
            if !seen.contains(&target) {
                seen.push(target);
                self.rows
                    .push((kind(target), target.item().to_owned(), count(target)));
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
        for (kind, item, count) in &self.rows {
            let label = format!("{kind} {item}");
            match count {
                Count::Pages(pages) => writeln!(out, "{label:<width$}  {}", pages_text(*pages))?,
                Count::Retried => writeln!(out, "{label:<width$}  confirmed after retrying")?,
                Count::NotConfirmed => writeln!(out, "{label:<width$}  not confirmed")?,
            }
        }
        if self.incomplete {
            writeln!(out, "removed {} (incomplete)", pages_text(self.total))
        } else if self.retried {
            writeln!(out, "removed (confirmed after retrying; counts unknown)")
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
        let comments = Target::Tag("comments".into());
        report.add(&Removed::default(), &[comments.clone(), comments]);
        report.unknown(&[Target::Url("/about".into())], false);
        let mut out = Vec::new();
        report.print(&mut out).expect("write");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "tag comments  0 pages\nurl /about    not confirmed\nremoved 0 pages (incomplete)\n"
        );
    }
}
