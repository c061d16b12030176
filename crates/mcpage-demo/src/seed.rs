//! The deterministic seed: categories, a menu, an About page, 200 articles and
//! 2,000 comments, always the same (a fixed-seed PRNG and fixed dates), so
//! tests, benchmarks and screenshots agree from one run to the next.

use fastrand::Rng;
use rusqlite::{Transaction, params};

/// Articles in the seed.
pub(crate) const ARTICLES: u32 = 200;
/// Comments in the seed.
pub(crate) const COMMENTS: u32 = 2_000;

/// `(slug, name, description, topics)`.
const CATEGORIES: &[(&str, &str, &str, &[&str])] = &[
    (
        "rust",
        "Rust",
        "Ownership, async and the ecosystem around them.",
        &[
            "ownership",
            "lifetimes",
            "async Rust",
            "trait objects",
            "error handling",
            "iterators",
            "tokio",
            "cargo workspaces",
        ],
    ),
    (
        "databases",
        "Databases",
        "SQLite, PostgreSQL and the queries behind every page.",
        &[
            "SQLite",
            "indexes",
            "query plans",
            "transactions",
            "write-ahead logging",
            "connection pools",
            "migrations",
        ],
    ),
    (
        "nginx",
        "nginx",
        "The web server in front of it all.",
        &[
            "upstream keepalive",
            "memcached_pass",
            "error_page",
            "access logs",
            "proxy buffering",
            "location matching",
        ],
    ),
    (
        "caching",
        "Caching",
        "Full-page caches, tags and invalidation.",
        &[
            "cache invalidation",
            "cache tags",
            "memcached",
            "TTLs",
            "cache stampedes",
            "page caching",
            "hit ratios",
        ],
    ),
    (
        "operations",
        "Operations",
        "Running small sites on small machines.",
        &[
            "systemd units",
            "backups",
            "monitoring",
            "deploys",
            "log rotation",
            "capacity planning",
        ],
    ),
    (
        "web",
        "The web",
        "HTML, HTTP and the browsers that read them.",
        &[
            "HTTP caching headers",
            "cookies",
            "CSRF tokens",
            "RSS feeds",
            "forms",
            "semantic HTML",
        ],
    ),
];

const TITLES: &[&str] = &[
    "Understanding {}",
    "{} in practice",
    "A closer look at {}",
    "What I learned about {}",
    "{}: pitfalls and fixes",
    "Notes on {}",
    "Getting {} right",
    "{} for small sites",
    "Ten minutes with {}",
    "Why {} matters",
];

const OPENERS: &[&str] = &[
    "Most of the time",
    "On a busy day",
    "In the original setup",
    "After the last deploy",
    "On a two-core machine",
    "Under load",
    "In production",
    "During the migration",
    "Once the cache was warm",
    "Before anyone noticed",
];

const SUBJECTS: &[&str] = &[
    "the database",
    "nginx",
    "memcached",
    "the application",
    "every anonymous request",
    "the home page",
    "the comment form",
    "the archive page",
    "the RSS feed",
    "the tag index",
];

const VERBS: &[&str] = &[
    "answered",
    "served",
    "rendered",
    "ignored",
    "outlived",
    "invalidated",
    "counted",
    "stored",
    "skipped",
    "cached",
];

const OBJECTS: &[&str] = &[
    "thousands of pages a second",
    "the latest comments",
    "a page nobody had asked for",
    "the same key nginx computed",
    "every article in the category",
    "the session cookie",
    "a stale comment count",
    "the month archive",
    "the whole site from memory",
    "exactly the pages that changed",
];

const CLOSERS: &[&str] = &[
    "and nobody had to restart anything.",
    "which is exactly what we wanted.",
    "so the graphs stayed flat.",
    "without a single query.",
    "and the logs said why.",
    "which surprised everyone.",
    "in well under a millisecond.",
    "until the next comment arrived.",
];

const AUTHORS: &[&str] = &[
    "Alice", "Bob", "Carol", "Dmitri", "Eve", "Farah", "Gustavo", "Hiroko", "Ines", "Jonas",
    "Kwame", "Lena", "Mateo", "Nadia", "Oskar", "Priya",
];

const COMMENT_LINES: &[&str] = &[
    "Great write-up, thanks!",
    "We hit exactly this last month.",
    "Does this still hold with a second memcached?",
    "I had to read the part about invalidation twice.",
    "Bookmarked for the next outage.",
    "How does this compare to Varnish?",
    "The numbers at the end are impressive.",
    "Small typo in the third paragraph.",
    "Could you share the nginx config?",
    "This saved my weekend.",
    "I disagree with the conclusion, but the reasoning is sound.",
    "Any plans for a follow-up?",
];

/// One of `items`.
fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn sentence(rng: &mut Rng) -> String {
    format!(
        "{}, {} {} {} {}",
        pick(rng, OPENERS),
        pick(rng, SUBJECTS),
        pick(rng, VERBS),
        pick(rng, OBJECTS),
        pick(rng, CLOSERS)
    )
}

fn paragraph(rng: &mut Rng, sentences: usize) -> String {
    (0..sentences)
        .map(|_| sentence(rng))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Create every row of the seed in `tx` (the schema exists, the tables are empty).
pub(crate) fn seed(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let mut rng = Rng::with_seed(0x6D63_7061_6765_2121);

    for (i, (slug, name, description, _)) in CATEGORIES.iter().enumerate() {
        tx.execute(
            "INSERT INTO categories (id, slug, name, description) VALUES (?1, ?2, ?3, ?4)",
            params![i + 1, slug, name, description],
        )?;
    }

    let menu = [
        ("Home", "/"),
        ("Rust", "/categories/rust"),
        ("Databases", "/categories/databases"),
        ("Caching", "/categories/caching"),
        ("About", "/about"),
        ("RSS", "/articles/feed.xml"),
    ];
    for (position, (label, href)) in menu.iter().enumerate() {
        tx.execute(
            "INSERT INTO menu (position, label, href) VALUES (?1, ?2, ?3)",
            params![position, label, href],
        )?;
    }

    tx.execute(
        "INSERT INTO pages (slug, title, body) VALUES ('about', 'About this blog', ?1)",
        params![
            "This is the demo site of mcpage, the blog the product was born for: \
             almost everything on it comes from the database.\n\n\
             Anonymous visitors get pages that nginx serves straight from memcached; \
             the application only renders a page the first time, or after a comment \
             changed what the page shows. Look at the X-Cache response header: HIT \
             means the application never saw the request.\n\n\
             Log in (any name will do) and every page is rendered for you alone, \
             with your name on it, and never stored."
        ],
    )?;

    // Articles: one every 3.5 days from 2023-01-02, each at a slightly different time.
    let mut seen_titles = std::collections::HashMap::<String, u32>::new();
    for id in 1..=ARTICLES {
        let category = rng.usize(..CATEGORIES.len());
        let (_, _, _, topics) = CATEGORIES[category];
        let topic = pick(&mut rng, topics);
        let pattern = pick(&mut rng, TITLES);
        let base = capitalize(&pattern.replace("{}", topic));
        let count = seen_titles.entry(base.clone()).or_insert(0);
        *count += 1;
        let title = if *count == 1 {
            base
        } else {
            format!("{base}, part {count}")
        };
        let summary = sentence(&mut rng);
        let paragraphs = 3 + rng.usize(..4);
        let body = (0..paragraphs)
            .map(|_| {
                let n = 3 + rng.usize(..4);
                paragraph(&mut rng, n)
            })
            .collect::<Vec<_>>()
            .join("\n\n");
        let minutes = u64::from(id - 1) * 5_040 + rng.u64(..600);
        tx.execute(
            "INSERT INTO articles (id, title, summary, body, category_id, published_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, datetime('2023-01-02 08:00:00', ?6))",
            params![
                id,
                title,
                summary,
                body,
                category + 1,
                format!("+{minutes} minutes")
            ],
        )?;
    }

    // Comments: spread over the articles, each some hours after its article.
    let mut insert = tx.prepare(
        "INSERT INTO comments (article_id, author, body, created_at) \
         SELECT ?1, ?2, ?3, datetime(published_at, ?4) FROM articles WHERE id = ?1",
    )?;
    for _ in 0..COMMENTS {
        let article = 1 + rng.usize(..ARTICLES as usize);
        let author = pick(&mut rng, AUTHORS);
        let mut body = pick(&mut rng, COMMENT_LINES).to_owned();
        if rng.usize(..3) == 0 {
            body.push_str("\n\n");
            body.push_str(&sentence(&mut rng));
        }
        let minutes = 30 + rng.usize(..20 * 24 * 60);
        insert.execute(params![
            article,
            author,
            body,
            format!("+{minutes} minutes")
        ])?;
    }
    Ok(())
}
