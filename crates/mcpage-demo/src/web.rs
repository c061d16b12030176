//! Routes, handlers and the tags each page declares.
//!
//! | route | tags (anonymous GET) |
//! |---|---|
//! | `/` | `home`, `comments`, `article:<id>` for each listed article, + layout |
//! | `/articles/<id>` | `article:<id>`, `category:<slug>`, `comments`, + layout |
//! | `/categories/<slug>` | `category:<slug>`, `comments`, `article:<id>` for each listed, + layout |
//! | `/archive/<yyyy>/<mm>` | `month:<yyyy-mm>`, `comments`, `article:<id>` for each listed, + layout |
//! | `/about` | `page:about`, + layout |
//! | `/login` | layout only (the anonymous form carries no token) |
//!
//! The layout tags are `menu`, `categories` and `months` (the menu and the
//! sidebar's article counts). `article:<id>` means "shows this article or its
//! comment count", so a new comment invalidates exactly that tag. Never cached:
//! `/articles/feed.xml`, `/articles/search`, every POST, every page rendered for
//! a logged-in user (they also carry `SkipCache`), errors.

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, extract::Request};
use mcpage::CacheTags;
use mcpage::SkipCache;
use minijinja::value::{Serde, Value};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::db::{self, Layout, Session};
use crate::{Demo, HOME_ARTICLES, SESSION_COOKIE};

/// Longest accepted comment author and login name, in characters.
const MAX_NAME: usize = 60;
/// Longest accepted comment, in characters.
const MAX_COMMENT: usize = 4_000;
/// Items in the RSS feed.
const FEED_ITEMS: u32 = 20;

pub(crate) fn router(demo: Demo) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/articles/feed.xml", get(feed))
        .route("/articles/search", get(search))
        .route("/articles/{id}", get(article))
        .route("/articles/{id}/comments", post(post_comment))
        .route("/categories/{slug}", get(category))
        .route("/archive/{year}/{month}", get(month))
        .route("/about", get(about))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .fallback(not_found)
        .with_state(demo)
}

/// A handler's failure: logged, answered 500 (never cached).
struct AppError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for AppError {
    fn from(error: E) -> Self {
        AppError(error.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        tracing::error!("request failed: {:#}", self.0);
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "internal error\n",
        )
            .into_response()
    }
}

type Result<T, E = AppError> = std::result::Result<T, E>;

/// Who is asking.
#[derive(Debug, Clone)]
enum Viewer {
    Anonymous,
    /// A `sessionid` cookie for a session that no longer exists: rendered as
    /// anonymous, and the cookie is cleared.
    Stale,
    User {
        token: String,
        session: Session,
    },
}

impl Viewer {
    fn session(&self) -> Option<&Session> {
        match self {
            Viewer::User { session, .. } => Some(session),
            _ => None,
        }
    }
}

/// The `sessionid` cookie's value, from any `Cookie` header.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.trim() == SESSION_COOKIE)
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
        .filter(|value| !value.is_empty())
}

fn viewer(conn: &Connection, token: Option<String>) -> rusqlite::Result<Viewer> {
    let Some(token) = token else {
        return Ok(Viewer::Anonymous);
    };
    Ok(match db::session(conn, &token)? {
        Some(session) => Viewer::User { token, session },
        None => Viewer::Stale,
    })
}

/// The tags of the layout every page shows.
fn layout_tags() -> CacheTags {
    CacheTags::new(["menu", "categories", "months"])
}

fn article_tags<'a>(tags: &mut CacheTags, articles: impl IntoIterator<Item = &'a db::ArticleRow>) {
    for article in articles {
        tags.push(format!("article:{}", article.id));
    }
}

/// The template context: the layout, the viewer, and the page's own fields.
#[derive(Serialize)]
struct Context<'a, T: Serialize> {
    layout: &'a Layout,
    user: Option<&'a Session>,
    #[serde(flatten)]
    page: T,
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("sessionid=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax")
}

impl Demo {
    /// A category or month archive: its own tag, `comments` (the counts) and
    /// every listed article.
    fn archive_page(
        &self,
        viewer: &Viewer,
        layout: &Layout,
        tag: String,
        archive: Archive,
    ) -> Result<Response> {
        let mut tags = layout_tags();
        tags.push(tag);
        tags.push("comments");
        article_tags(&mut tags, &archive.articles);
        self.page(
            StatusCode::OK,
            viewer,
            layout,
            tags,
            "archive.html",
            archive,
        )
    }

    fn render(&self, name: &str, context: impl Serialize) -> Result<String> {
        let template = self.inner.templates.get_template(name)?;
        Ok(template.render(Value::from(Serde(context)))?)
    }

    /// Render a page: anonymous ones carry `tags` and may be cached; pages for
    /// a logged-in user carry `SkipCache` and `Cache-Control: private`.
    fn page(
        &self,
        status: StatusCode,
        viewer: &Viewer,
        layout: &Layout,
        tags: CacheTags,
        template: &str,
        page: impl Serialize,
    ) -> Result<Response> {
        let body = self.render(
            template,
            Context {
                layout,
                user: viewer.session(),
                page,
            },
        )?;
        let mut response = match viewer {
            Viewer::Anonymous => (status, tags, Html(body)).into_response(),
            Viewer::Stale => {
                let mut response = (status, Html(body)).into_response();
                response
                    .headers_mut()
                    .insert(header::SET_COOKIE, clear_cookie());
                response
            }
            Viewer::User { .. } => (status, SkipCache, Html(body)).into_response(),
        };
        if viewer.session().is_some() {
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-cache"),
            );
        }
        Ok(response)
    }

    /// Load the viewer, the layout and the page's data in one database call.
    async fn load<T, F>(&self, headers: &HeaderMap, f: F) -> Result<(Viewer, Layout, T)>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let token = session_token(headers);
        Ok(self
            .inner
            .db
            .call(move |conn| {
                let viewer = viewer(conn, token)?;
                let layout = db::layout(conn)?;
                let data = f(conn)?;
                Ok((viewer, layout, data))
            })
            .await?)
    }

    async fn not_found_page(&self, headers: &HeaderMap) -> Result<Response> {
        let (viewer, layout, ()) = self.load(headers, |_| Ok(())).await?;
        self.page(
            StatusCode::NOT_FOUND,
            &viewer,
            &layout,
            CacheTags::default(),
            "not_found.html",
            Empty {},
        )
    }
}

#[derive(Serialize)]
struct Empty {}

async fn home(State(demo): State<Demo>, headers: HeaderMap) -> Result<Response> {
    let (viewer, layout, articles) = demo
        .load(&headers, |conn| db::latest(conn, HOME_ARTICLES))
        .await?;
    let mut tags = layout_tags();
    tags.push("home");
    tags.push("comments");
    article_tags(&mut tags, &articles);
    #[derive(Serialize)]
    struct Page {
        articles: Vec<db::ArticleRow>,
    }
    demo.page(
        StatusCode::OK,
        &viewer,
        &layout,
        tags,
        "home.html",
        Page { articles },
    )
}

/// A canonical positive decimal id (no sign, no leading zero), else `None`.
fn parse_id(text: &str) -> Option<i64> {
    if text.is_empty() || text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CommentForm {
    #[serde(default)]
    author: String,
    #[serde(default)]
    body: String,
    #[serde(default, skip_serializing)]
    csrf: String,
}

#[derive(Serialize)]
struct ArticlePage {
    article: db::Article,
    comments: Vec<db::Comment>,
    form: CommentForm,
    error: Option<String>,
}

async fn article(
    State(demo): State<Demo>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let Some(id) = parse_id(&id) else {
        return demo.not_found_page(&headers).await;
    };
    article_page(
        &demo,
        &headers,
        id,
        StatusCode::OK,
        CommentForm::default(),
        None,
    )
    .await
}

async fn article_page(
    demo: &Demo,
    headers: &HeaderMap,
    id: i64,
    status: StatusCode,
    form: CommentForm,
    error: Option<String>,
) -> Result<Response> {
    let (viewer, layout, found) = demo
        .load(headers, move |conn| db::article(conn, id))
        .await?;
    let Some((article, comments)) = found else {
        return demo.not_found_page(headers).await;
    };
    let mut tags = layout_tags();
    tags.push(format!("article:{id}"));
    tags.push(format!("category:{}", article.row.category_slug));
    tags.push("comments");
    demo.page(
        status,
        &viewer,
        &layout,
        tags,
        "article.html",
        ArticlePage {
            article,
            comments,
            form,
            error,
        },
    )
}

/// Compare two secrets without an early exit.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn forbidden(message: &'static str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn post_comment(
    State(demo): State<Demo>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(mut form): Form<CommentForm>,
) -> Result<Response> {
    let Some(id) = parse_id(&id) else {
        return demo.not_found_page(&headers).await;
    };
    let token = session_token(&headers);
    let viewer = demo.inner.db.call(move |conn| viewer(conn, token)).await?;
    if let Some(session) = viewer.session() {
        // A logged-in form carries the session's token; an anonymous one has
        // none to steal (and the cookie is SameSite=Lax besides).
        if !same_secret(&form.csrf, &session.csrf) {
            return Ok(forbidden(
                "invalid CSRF token: reload the page and try again\n",
            ));
        }
        form.author.clone_from(&session.name);
    }
    form.author = form.author.trim().to_owned();
    form.body = form.body.trim().replace("\r\n", "\n");
    let error = if form.author.is_empty() {
        Some("Please give your name.".to_owned())
    } else if form.author.chars().count() > MAX_NAME {
        Some(format!("Names are at most {MAX_NAME} characters."))
    } else if form.body.is_empty() {
        Some("The comment is empty.".to_owned())
    } else if form.body.chars().count() > MAX_COMMENT {
        Some(format!("Comments are at most {MAX_COMMENT} characters."))
    } else {
        None
    };
    if error.is_some() {
        return article_page(
            &demo,
            &headers,
            id,
            StatusCode::UNPROCESSABLE_ENTITY,
            form,
            error,
        )
        .await;
    }
    let (author, body) = (form.author, form.body);
    let Some(comment) = demo
        .inner
        .db
        .call(move |conn| db::add_comment(conn, id, &author, &body))
        .await?
    else {
        return demo.not_found_page(&headers).await;
    };
    // Committed: now remove every page that shows this article or its count.
    invalidate(&demo, format!("article:{id}")).await;
    let mut response = Redirect::to(&format!("/articles/{id}#comment-{comment}")).into_response();
    if matches!(viewer, Viewer::Stale) {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, clear_cookie());
    }
    Ok(response)
}

/// Invalidate `tag`. What memcached does not confirm, the invalidator keeps
/// and retries in the background until it does (its pages may be stale
/// meanwhile): logged, never lost.
async fn invalidate(demo: &Demo, tag: String) {
    match demo
        .cache()
        .invalidator()
        .invalidate_tags([tag.as_str()])
        .await
    {
        Ok(removed) => tracing::info!(%tag, pages = removed.pages, "invalidated"),
        Err(error) => tracing::warn!(%tag, "invalidation not confirmed: {error}"),
    }
}

async fn category(
    State(demo): State<Demo>,
    Path(slug): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let (viewer, layout, found) = demo
        .load(&headers, move |conn| db::category(conn, &slug))
        .await?;
    let Some((category, articles)) = found else {
        return demo.not_found_page(&headers).await;
    };
    demo.archive_page(
        &viewer,
        &layout,
        format!("category:{}", category.slug),
        Archive {
            heading: category.name,
            description: Some(category.description),
            articles,
        },
    )
}

#[derive(Serialize)]
struct Archive {
    heading: String,
    description: Option<String>,
    articles: Vec<db::ArticleRow>,
}

async fn month(
    State(demo): State<Demo>,
    Path((year, month)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    // Only the canonical form: /archive/2024/03.
    let parsed = (year.len() == 4 && month.len() == 2)
        .then(|| Some((year.parse::<u32>().ok()?, month.parse::<u32>().ok()?)))
        .flatten()
        .filter(|(y, m)| *y >= 1000 && (1..=12).contains(m));
    let Some((y, m)) = parsed else {
        return demo.not_found_page(&headers).await;
    };
    let (viewer, layout, articles) = demo
        .load(&headers, move |conn| db::month(conn, y, m))
        .await?;
    if articles.is_empty() {
        return demo.not_found_page(&headers).await;
    }
    demo.archive_page(
        &viewer,
        &layout,
        format!("month:{y:04}-{m:02}"),
        Archive {
            heading: db::month_title(y, m),
            description: None,
            articles,
        },
    )
}

async fn about(State(demo): State<Demo>, headers: HeaderMap) -> Result<Response> {
    let (viewer, layout, page) = demo.load(&headers, |conn| db::page(conn, "about")).await?;
    let Some(page) = page else {
        return demo.not_found_page(&headers).await;
    };
    let mut tags = layout_tags();
    tags.push("page:about");
    #[derive(Serialize)]
    struct About {
        page: db::Page,
    }
    demo.page(
        StatusCode::OK,
        &viewer,
        &layout,
        tags,
        "page.html",
        About { page },
    )
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LoginForm {
    #[serde(default)]
    name: String,
}

#[derive(Serialize)]
struct LoginPage {
    name: String,
    error: Option<String>,
}

async fn login_form(State(demo): State<Demo>, headers: HeaderMap) -> Result<Response> {
    let (viewer, layout, ()) = demo.load(&headers, |_| Ok(())).await?;
    demo.page(
        StatusCode::OK,
        &viewer,
        &layout,
        layout_tags(),
        "login.html",
        LoginPage {
            name: String::new(),
            error: None,
        },
    )
}

/// 128 random bits as hex.
fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn login(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response> {
    let name = form.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        let (viewer, layout, ()) = demo.load(&headers, |_| Ok(())).await?;
        return demo.page(
            StatusCode::UNPROCESSABLE_ENTITY,
            &viewer,
            &layout,
            CacheTags::default(),
            "login.html",
            LoginPage {
                name,
                error: Some(format!("Names are 1 to {MAX_NAME} characters.")),
            },
        );
    }
    let token = random_token()?;
    let csrf = random_token()?;
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax");
    demo.inner
        .db
        .call(move |conn| db::create_session(conn, &token, &name, &csrf))
        .await?;
    let mut response = Redirect::to("/").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::try_from(cookie)?);
    Ok(response)
}

#[derive(Debug, Default, Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(demo): State<Demo>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Result<Response> {
    let token = session_token(&headers);
    let viewer = demo.inner.db.call(move |conn| viewer(conn, token)).await?;
    if let Viewer::User { token, session } = viewer {
        if !same_secret(&form.csrf, &session.csrf) {
            return Ok(forbidden(
                "invalid CSRF token: reload the page and try again\n",
            ));
        }
        demo.inner
            .db
            .call(move |conn| db::delete_session(conn, &token))
            .await?;
    }
    let mut response = Redirect::to("/").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// Excluded from caching (`^/articles/search`); also opts out with `SkipCache`.
async fn search(
    State(demo): State<Demo>,
    Query(query): Query<SearchQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let query: String = query.q.trim().chars().take(100).collect();
    let needle = query.clone();
    let (viewer, layout, articles) = demo
        .load(&headers, move |conn| {
            if needle.is_empty() {
                Ok(Vec::new())
            } else {
                db::search(conn, &needle)
            }
        })
        .await?;
    #[derive(Serialize)]
    struct Search {
        query: String,
        articles: Vec<db::ArticleRow>,
    }
    let mut response = demo.page(
        StatusCode::OK,
        &viewer,
        &layout,
        CacheTags::default(),
        "search.html",
        Search { query, articles },
    )?;
    response.extensions_mut().insert(SkipCache);
    Ok(response)
}

/// The RSS feed: excluded from caching (`\.xml$`, `^/articles/feed`), not a
/// cached content type, and opted out with `SkipCache` all the same.
async fn feed(State(demo): State<Demo>, headers: HeaderMap) -> Result<Response> {
    let items = demo
        .inner
        .db
        .call(|conn| db::feed(conn, FEED_ITEMS))
        .await?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1:8080");
    #[derive(Serialize)]
    struct Feed {
        base: String,
        items: Vec<db::FeedItem>,
    }
    let body = demo.render(
        "feed.xml",
        Feed {
            base: format!("http://{host}"),
            items,
        },
    )?;
    Ok((
        SkipCache,
        [(header::CONTENT_TYPE, "application/rss+xml; charset=utf-8")],
        body,
    )
        .into_response())
}

async fn not_found(State(demo): State<Demo>, request: Request) -> Result<Response> {
    demo.not_found_page(request.headers()).await
}
