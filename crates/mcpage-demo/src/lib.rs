//! The mcpage demo: the blog the product was born for, where almost everything
//! comes from the database.
//!
//! Articles, categories, a menu, a home page with the latest articles and their
//! comment counts, per-category and per-month archives, article pages with
//! comments and a comment form, an About page, a search page and an RSS feed,
//! all from SQLite (created and seeded on first start with 200 articles and
//! 2,000 comments, always the same). Templates are minijinja, embedded in the
//! binary, autoescaped.
//!
//! Every page declares the tags it depends on ([`mcpage::CacheTags`]); posting
//! a comment commits, then invalidates `article:<id>`, which every page that
//! shows the article or its comment count carries: its own page, the home page
//! while it is among the latest, its category and month archives. Logged-in
//! users (cookie `sessionid`) bypass the cache and see their name; their pages
//! also carry [`mcpage::SkipCache`] and are never stored.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = mcpage::Config::load(None)?;
//! let cache = mcpage::Cache::connect(&config).await?;
//! let demo = mcpage_demo::Demo::open("mcpage-demo.sqlite3", cache)?;
//! let listener = tokio::net::TcpListener::bind(&config.nginx.app).await?;
//! axum::serve(listener, mcpage_demo::app(demo)).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use mcpage::{Cache, PageCacheLayer};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};

mod db;
mod seed;
mod web;

/// The session cookie the demo sets on login. It must be one of the config's
/// `cache.session_cookies`, so that nginx and the layer bypass the cache for it.
pub const SESSION_COOKIE: &str = "sessionid";

/// The `cache.exclude` rules of the original setup: the RSS feed and the search
/// are never cached. The demo's own config files carry them; the feed and the
/// search page also opt out with `SkipCache` when a config does not.
pub const EXCLUDE: [&str; 3] = [r"\.xml$", "^/articles/search", "^/articles/feed"];

/// Articles on the home page.
pub const HOME_ARTICLES: u32 = 10;

/// What tests and benchmarks may want to know about an article.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArticleMeta {
    /// The id, as in `/articles/<id>`.
    pub id: i64,
    /// The title.
    pub title: String,
    /// The category's slug, as in `/categories/<slug>`.
    pub category: String,
    /// `YYYY-MM` of publication, as in `/archive/YYYY/MM`.
    pub month: String,
    /// Number of comments.
    pub comments: u64,
}

impl ArticleMeta {
    /// `/articles/<id>`
    pub fn url(&self) -> String {
        format!("/articles/{}", self.id)
    }

    /// `/categories/<slug>`
    pub fn category_url(&self) -> String {
        format!("/categories/{}", self.category)
    }

    /// `/archive/YYYY/MM`
    pub fn month_url(&self) -> String {
        format!("/archive/{}", self.month.replacen('-', "/", 1))
    }
}

/// The demo site: database, templates and the page cache. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Demo {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: db::Db,
    cache: Cache,
    templates: Environment<'static>,
}

impl Demo {
    /// Open the SQLite database at `db` (created and seeded when it does not
    /// exist; `:memory:` for a private in-memory one) and use `cache` for pages.
    /// Blocking (seeding a new database takes a few tens of milliseconds).
    ///
    /// Fails when the cache's `cache.session_cookies` does not name
    /// [`SESSION_COOKIE`]: nginx would then serve anonymous pages to logged-in users.
    pub fn open(db: impl AsRef<Path>, cache: Cache) -> anyhow::Result<Demo> {
        if !cache
            .config()
            .cache
            .session_cookies
            .iter()
            .any(|name| name == SESSION_COOKIE)
        {
            anyhow::bail!(
                "cache.session_cookies must include `{SESSION_COOKIE}`, the demo's session cookie \
                 (otherwise nginx would serve cached anonymous pages to logged-in users)"
            );
        }
        let db = db::Db::open(db.as_ref())?;
        Ok(Demo {
            inner: Arc::new(Inner {
                db,
                cache,
                templates: templates().context("compile the templates")?,
            }),
        })
    }

    /// The page cache (for invalidation, `settle`, statistics).
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// An article's id, category, month and comment count.
    pub async fn article(&self, id: i64) -> anyhow::Result<Option<ArticleMeta>> {
        self.inner
            .db
            .call(move |conn| db::article_meta(conn, id))
            .await
    }

    /// The ids of the articles on the home page, newest first.
    pub async fn latest_article_ids(&self) -> anyhow::Result<Vec<i64>> {
        self.inner
            .db
            .call(|conn| db::latest_ids(conn, HOME_ARTICLES))
            .await
    }

    /// Every URL an anonymous visitor can have cached: home, About, login,
    /// every category and month archive and every article (for benchmarks and
    /// cache warming).
    pub async fn page_urls(&self) -> anyhow::Result<Vec<String>> {
        self.inner
            .db
            .call(|conn| {
                let layout = db::layout(conn)?;
                let mut urls = vec!["/".to_owned(), "/about".to_owned(), "/login".to_owned()];
                urls.extend(
                    layout
                        .categories
                        .iter()
                        .map(|c| format!("/categories/{}", c.slug)),
                );
                urls.extend(layout.months.into_iter().map(|m| m.href));
                urls.extend(
                    db::article_ids(conn)?
                        .into_iter()
                        .map(|id| format!("/articles/{id}")),
                );
                Ok(urls)
            })
            .await
    }
}

/// The site behind [`PageCacheLayer`]: what nginx sends misses to.
pub fn app(demo: Demo) -> Router {
    let cache = demo.cache().clone();
    routes(demo).layer(PageCacheLayer::new(cache))
}

/// The site without the cache layer (posting a comment still invalidates):
/// the baseline for benchmarks.
pub fn routes(demo: Demo) -> Router {
    web::router(demo)
}

/// Every template, embedded in the binary; HTML-escaped, undefined variables are errors.
fn templates() -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Every template is HTML or XML: escape everything, whatever the name.
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    for (name, source) in [
        ("base.html", include_str!("../templates/base.html")),
        (
            "article_list.html",
            include_str!("../templates/article_list.html"),
        ),
        ("home.html", include_str!("../templates/home.html")),
        ("article.html", include_str!("../templates/article.html")),
        ("archive.html", include_str!("../templates/archive.html")),
        ("page.html", include_str!("../templates/page.html")),
        ("login.html", include_str!("../templates/login.html")),
        ("search.html", include_str!("../templates/search.html")),
        (
            "not_found.html",
            include_str!("../templates/not_found.html"),
        ),
        ("feed.xml", include_str!("../templates/feed.xml")),
    ] {
        env.add_template(name, source)?;
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_deterministic_and_the_size_the_issue_asks_for() {
        let counts = |db: &db::Db| {
            db.blocking(|conn| {
                let count = |table: &str| -> i64 {
                    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                        .expect("count")
                };
                let digest: String = conn
                    .query_row(
                        "SELECT group_concat(title || published_at, '|') FROM articles",
                        [],
                        |r| r.get(0),
                    )
                    .expect("digest");
                (count("articles"), count("comments"), digest)
            })
        };
        let a = counts(&db::Db::open(Path::new(":memory:")).expect("open"));
        let b = counts(&db::Db::open(Path::new(":memory:")).expect("open"));
        assert_eq!(a.0, i64::from(seed::ARTICLES));
        assert_eq!(a.1, i64::from(seed::COMMENTS));
        assert_eq!(a, b, "two seeds differ");
    }

    #[test]
    fn templates_compile() {
        templates().expect("templates");
    }
}
