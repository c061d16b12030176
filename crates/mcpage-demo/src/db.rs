//! SQLite: the schema, the seed on first start, and every query the pages run.
//!
//! rusqlite is synchronous: one connection behind a mutex, used from
//! `tokio::task::spawn_blocking`. A page runs all its queries in one call
//! (one lock, one blocking task); they take well under a millisecond on the
//! seeded data, and anonymous traffic is answered by nginx from memcached anyway.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

/// Bumped when the schema changes; a database with another version is refused.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE categories (
    id INTEGER PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL
);
CREATE TABLE articles (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    summary TEXT NOT NULL,
    body TEXT NOT NULL,
    category_id INTEGER NOT NULL REFERENCES categories(id),
    published_at TEXT NOT NULL
);
CREATE INDEX articles_published ON articles (published_at);
CREATE INDEX articles_category ON articles (category_id, published_at);
CREATE TABLE comments (
    id INTEGER PRIMARY KEY,
    article_id INTEGER NOT NULL REFERENCES articles(id),
    author TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX comments_article ON comments (article_id, created_at);
CREATE TABLE menu (
    position INTEGER PRIMARY KEY,
    label TEXT NOT NULL,
    href TEXT NOT NULL
);
CREATE TABLE pages (
    slug TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE sessions (
    token TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
);
";

/// The database handle; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Db(Arc<Mutex<Connection>>);

impl Db {
    /// Open (or create) the database at `path` (`:memory:` for a private
    /// in-memory one) and seed it when it is new. Blocking.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Db> {
        let mut conn = if path == Path::new(":memory:") {
            Connection::open_in_memory()
        } else {
            Connection::open(path)
        }
        .with_context(|| format!("open the database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA foreign_keys = ON;")?;
        if path != Path::new(":memory:") {
            // WAL: readers (say the sqlite3 shell) never block the demo's writes.
            conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        match version {
            0 => {
                let tx = conn.transaction()?;
                tx.execute_batch(SCHEMA)
                    .with_context(|| format!("create the schema in {}", path.display()))?;
                crate::seed::seed(&tx).context("seed the database")?;
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))?;
                tx.commit()?;
                tracing::info!(path = %path.display(), "created and seeded the database");
            }
            SCHEMA_VERSION => {}
            other => anyhow::bail!(
                "{} has schema version {other}, this demo expects {SCHEMA_VERSION}: \
                 remove it to start over",
                path.display()
            ),
        }
        Ok(Db(Arc::new(Mutex::new(conn))))
    }

    /// Run `f` with the connection on this thread (tests).
    #[cfg(test)]
    pub(crate) fn blocking<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Run `f` with the connection on the blocking pool.
    pub(crate) async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves SQLite consistent (every
            // write is one transaction), so a poisoned lock is still usable.
            let mut conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .context("database task")?
        .context("database query")
    }
}

/// A menu entry.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MenuItem {
    pub(crate) label: String,
    pub(crate) href: String,
}

/// A category with its number of articles.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CategoryCount {
    pub(crate) slug: String,
    pub(crate) name: String,
    pub(crate) count: i64,
}

/// A month with its number of articles.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MonthCount {
    /// `/archive/2024/03`
    pub(crate) href: String,
    /// `March 2024`
    pub(crate) label: String,
    pub(crate) count: i64,
}

/// What every page shows around its content (menu, categories, months).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Layout {
    pub(crate) menu: Vec<MenuItem>,
    pub(crate) categories: Vec<CategoryCount>,
    pub(crate) months: Vec<MonthCount>,
    /// When the page was rendered (UTC), shown in the footer.
    pub(crate) rendered_at: String,
}

/// An article in a list (home, archives, search) or at the top of its page.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ArticleRow {
    pub(crate) id: i64,
    pub(crate) title: String,
    pub(crate) summary: String,
    pub(crate) category_slug: String,
    pub(crate) category_name: String,
    /// `2024-03-05 14:02:00`
    pub(crate) published_at: String,
    /// `2024-03-05`
    pub(crate) published: String,
    pub(crate) comments: i64,
}

/// One article with its body.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Article {
    #[serde(flatten)]
    pub(crate) row: ArticleRow,
    pub(crate) body: Vec<String>,
}

/// One comment.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comment {
    pub(crate) id: i64,
    pub(crate) author: String,
    pub(crate) body: Vec<String>,
    /// `2024-03-05 14:02`
    pub(crate) created: String,
}

/// A category archive's header.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Category {
    pub(crate) slug: String,
    pub(crate) name: String,
    pub(crate) description: String,
}

/// A page such as About.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Page {
    pub(crate) title: String,
    pub(crate) body: Vec<String>,
}

/// A logged-in user's session.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Session {
    pub(crate) name: String,
    pub(crate) csrf: String,
}

/// One item of the RSS feed.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FeedItem {
    pub(crate) id: i64,
    pub(crate) title: String,
    pub(crate) summary: String,
    pub(crate) category_name: String,
    /// RFC 822, as RSS wants it: `Tue, 05 Mar 2024 14:02:00 +0000`
    pub(crate) pub_date: String,
}

/// Text with blank lines between paragraphs, as paragraphs.
pub(crate) fn paragraphs(text: &str) -> Vec<String> {
    text.split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `2024-03` → `March 2024`.
fn month_label(month: &str) -> String {
    let name = month
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .copied()
        .unwrap_or("?");
    format!("{name} {}", month.get(..4).unwrap_or("?"))
}

const ARTICLE_ROW: &str = "
SELECT a.id, a.title, a.summary, c.slug, c.name, a.published_at,
       (SELECT COUNT(*) FROM comments m WHERE m.article_id = a.id)
FROM articles a JOIN categories c ON c.id = a.category_id";

fn article_row(row: &Row<'_>) -> rusqlite::Result<ArticleRow> {
    let published_at: String = row.get(5)?;
    Ok(ArticleRow {
        id: row.get(0)?,
        title: row.get(1)?,
        summary: row.get(2)?,
        category_slug: row.get(3)?,
        category_name: row.get(4)?,
        published: published_at.get(..10).unwrap_or_default().to_owned(),
        published_at,
        comments: row.get(6)?,
    })
}

fn article_rows(
    conn: &Connection,
    sql_tail: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<ArticleRow>> {
    let mut stmt = conn.prepare_cached(&format!("{ARTICLE_ROW} {sql_tail}"))?;
    stmt.query_map(params, article_row)?.collect()
}

/// The menu, the category and month lists, and the render time.
pub(crate) fn layout(conn: &Connection) -> rusqlite::Result<Layout> {
    let menu = conn
        .prepare_cached("SELECT label, href FROM menu ORDER BY position")?
        .query_map([], |row| {
            Ok(MenuItem {
                label: row.get(0)?,
                href: row.get(1)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let categories = conn
        .prepare_cached(
            "SELECT c.slug, c.name, COUNT(a.id) FROM categories c \
             LEFT JOIN articles a ON a.category_id = c.id \
             GROUP BY c.id ORDER BY c.name COLLATE NOCASE",
        )?
        .query_map([], |row| {
            Ok(CategoryCount {
                slug: row.get(0)?,
                name: row.get(1)?,
                count: row.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let months = conn
        .prepare_cached(
            "SELECT substr(published_at, 1, 7) AS month, COUNT(*) FROM articles \
             GROUP BY month ORDER BY month DESC",
        )?
        .query_map([], |row| {
            let month: String = row.get(0)?;
            Ok(MonthCount {
                href: format!(
                    "/archive/{}/{}",
                    month.get(..4).unwrap_or_default(),
                    month.get(5..7).unwrap_or_default()
                ),
                label: month_label(&month),
                count: row.get(1)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let rendered_at = conn.query_row("SELECT datetime('now')", [], |row| row.get(0))?;
    Ok(Layout {
        menu,
        categories,
        months,
        rendered_at,
    })
}

/// The `n` latest articles.
pub(crate) fn latest(conn: &Connection, n: u32) -> rusqlite::Result<Vec<ArticleRow>> {
    article_rows(
        conn,
        "ORDER BY a.published_at DESC, a.id DESC LIMIT ?1",
        params![n],
    )
}

/// One article and its comments, oldest first.
pub(crate) fn article(
    conn: &Connection,
    id: i64,
) -> rusqlite::Result<Option<(Article, Vec<Comment>)>> {
    let Some((row, body)) = conn
        .prepare_cached(
            "SELECT a.id, a.title, a.summary, c.slug, c.name, a.published_at, \
                    (SELECT COUNT(*) FROM comments m WHERE m.article_id = a.id), a.body \
             FROM articles a JOIN categories c ON c.id = a.category_id WHERE a.id = ?1",
        )?
        .query_row([id], |row| {
            Ok((article_row(row)?, row.get::<_, String>(7)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let comments = conn
        .prepare_cached(
            "SELECT id, author, body, substr(created_at, 1, 16) FROM comments \
             WHERE article_id = ?1 ORDER BY created_at, id",
        )?
        .query_map([id], |row| {
            let body: String = row.get(2)?;
            Ok(Comment {
                id: row.get(0)?,
                author: row.get(1)?,
                body: paragraphs(&body),
                created: row.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some((
        Article {
            row,
            body: paragraphs(&body),
        },
        comments,
    )))
}

/// A category and its articles, newest first.
pub(crate) fn category(
    conn: &Connection,
    slug: &str,
) -> rusqlite::Result<Option<(Category, Vec<ArticleRow>)>> {
    let Some(category) = conn
        .prepare_cached("SELECT slug, name, description FROM categories WHERE slug = ?1")?
        .query_row([slug], |row| {
            Ok(Category {
                slug: row.get(0)?,
                name: row.get(1)?,
                description: row.get(2)?,
            })
        })
        .optional()?
    else {
        return Ok(None);
    };
    let articles = article_rows(
        conn,
        "WHERE c.slug = ?1 ORDER BY a.published_at DESC, a.id DESC",
        [slug],
    )?;
    Ok(Some((category, articles)))
}

/// The articles published in `year`-`month` (1-12), newest first.
pub(crate) fn month(conn: &Connection, year: u32, month: u32) -> rusqlite::Result<Vec<ArticleRow>> {
    let start = format!("{year:04}-{month:02}-01");
    let end = if month == 12 {
        format!("{:04}-01-01", year + 1)
    } else {
        format!("{year:04}-{:02}-01", month + 1)
    };
    article_rows(
        conn,
        "WHERE a.published_at >= ?1 AND a.published_at < ?2 \
         ORDER BY a.published_at DESC, a.id DESC",
        params![start, end],
    )
}

/// `2024-03` → `March 2024`, for the month archive's heading.
pub(crate) fn month_title(year: u32, month: u32) -> String {
    month_label(&format!("{year:04}-{month:02}"))
}

/// A page such as `about`.
pub(crate) fn page(conn: &Connection, slug: &str) -> rusqlite::Result<Option<Page>> {
    conn.prepare_cached("SELECT title, body FROM pages WHERE slug = ?1")?
        .query_row([slug], |row| {
            let body: String = row.get(1)?;
            Ok(Page {
                title: row.get(0)?,
                body: paragraphs(&body),
            })
        })
        .optional()
}

/// Articles whose title or summary contains `query` (case-insensitive for ASCII).
pub(crate) fn search(conn: &Connection, query: &str) -> rusqlite::Result<Vec<ArticleRow>> {
    let escaped = query
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    let pattern = format!("%{escaped}%");
    article_rows(
        conn,
        "WHERE a.title LIKE ?1 ESCAPE '\\' OR a.summary LIKE ?1 ESCAPE '\\' \
         ORDER BY a.published_at DESC, a.id DESC LIMIT 50",
        [pattern],
    )
}

/// The `n` latest articles for the RSS feed.
pub(crate) fn feed(conn: &Connection, n: u32) -> rusqlite::Result<Vec<FeedItem>> {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS_SHORT: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    conn.prepare_cached(
        "SELECT a.id, a.title, a.summary, c.name, \
                CAST(strftime('%w', a.published_at) AS INTEGER), \
                strftime('%d', a.published_at), \
                CAST(strftime('%m', a.published_at) AS INTEGER), \
                strftime('%Y %H:%M:%S', a.published_at) \
         FROM articles a JOIN categories c ON c.id = a.category_id \
         ORDER BY a.published_at DESC, a.id DESC LIMIT ?1",
    )?
    .query_map([n], |row| {
        let weekday: usize = row.get(4)?;
        let day: String = row.get(5)?;
        let month: usize = row.get(6)?;
        let rest: String = row.get(7)?;
        Ok(FeedItem {
            id: row.get(0)?,
            title: row.get(1)?,
            summary: row.get(2)?,
            category_name: row.get(3)?,
            pub_date: format!(
                "{}, {day} {} {rest} +0000",
                DAYS.get(weekday).copied().unwrap_or("Sun"),
                MONTHS_SHORT
                    .get(month.wrapping_sub(1))
                    .copied()
                    .unwrap_or("Jan"),
            ),
        })
    })?
    .collect()
}

/// Add a comment and return its id, or `None` when the article does not exist.
/// Committed when this returns.
pub(crate) fn add_comment(
    conn: &mut Connection,
    article_id: i64,
    author: &str,
    body: &str,
) -> rusqlite::Result<Option<i64>> {
    let tx = conn.transaction()?;
    let inserted = tx.execute(
        "INSERT INTO comments (article_id, author, body, created_at) \
         SELECT id, ?2, ?3, datetime('now') FROM articles WHERE id = ?1",
        params![article_id, author, body],
    )?;
    let id = (inserted == 1).then(|| tx.last_insert_rowid());
    tx.commit()?;
    Ok(id)
}

/// The session behind a `sessionid` cookie.
pub(crate) fn session(conn: &Connection, token: &str) -> rusqlite::Result<Option<Session>> {
    conn.prepare_cached("SELECT name, csrf FROM sessions WHERE token = ?1")?
        .query_row([token], |row| {
            Ok(Session {
                name: row.get(0)?,
                csrf: row.get(1)?,
            })
        })
        .optional()
}

/// Store a new session.
pub(crate) fn create_session(
    conn: &Connection,
    token: &str,
    name: &str,
    csrf: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO sessions (token, name, csrf) VALUES (?1, ?2, ?3)",
        params![token, name, csrf],
    )
    .map(drop)
}

/// Forget a session.
pub(crate) fn delete_session(conn: &Connection, token: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM sessions WHERE token = ?1", [token])
        .map(drop)
}

/// What tests and the bench harness need to know about an article.
pub(crate) fn article_meta(
    conn: &Connection,
    id: i64,
) -> rusqlite::Result<Option<crate::ArticleMeta>> {
    conn.prepare_cached(&format!("{ARTICLE_ROW} WHERE a.id = ?1"))?
        .query_row([id], article_row)
        .optional()
        .map(|row| {
            row.map(|row| crate::ArticleMeta {
                id: row.id,
                title: row.title,
                category: row.category_slug,
                month: row.published_at.get(..7).unwrap_or_default().to_owned(),
                comments: u64::try_from(row.comments).unwrap_or(0),
            })
        })
}

/// Ids of the `n` latest articles (the ones on the home page), newest first.
pub(crate) fn latest_ids(conn: &Connection, n: u32) -> rusqlite::Result<Vec<i64>> {
    conn.prepare_cached("SELECT id FROM articles ORDER BY published_at DESC, id DESC LIMIT ?1")?
        .query_map([n], |row| row.get(0))?
        .collect()
}

/// Every article id, oldest first.
pub(crate) fn article_ids(conn: &Connection) -> rusqlite::Result<Vec<i64>> {
    conn.prepare_cached("SELECT id FROM articles ORDER BY published_at, id")?
        .query_map([], |row| row.get(0))?
        .collect()
}
