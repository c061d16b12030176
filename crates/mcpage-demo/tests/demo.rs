//! The demo blog end to end: a real memcached for pages, a second one with `-M`
//! for the tag index, real nginx with the rendered config, and the demo app
//! in-process on an in-memory SQLite database.

use std::time::Duration;

use mcpage_demo::{ArticleMeta, Demo};
use mcpage_tests::{Response, request, wait_until};

const DEADLINE: Duration = Duration::from_secs(10);

struct Stack {
    /// A page server, an index server with `-M`, the demo app, nginx.
    stack: mcpage_tests::Stack,
    demo: Demo,
}

impl Stack {
    async fn start() -> Stack {
        let mut demo = None;
        let stack = mcpage_tests::Stack::builder()
            .index_server(&["-M"])
            .config(|c| {
                c.memcached.timeout_ms = 1000;
                c.cache.exclude = mcpage_demo::EXCLUDE.map(str::to_owned).to_vec();
            })
            .app(|cache| {
                let opened = Demo::open(":memory:", cache.clone()).expect("demo");
                demo = Some(opened.clone());
                mcpage_demo::app(opened)
            })
            .start()
            .await;
        let demo = demo.expect("the app was built");
        Stack { stack, demo }
    }

    async fn get(&self, path: &str) -> Response {
        self.stack.fetch(path, &[]).await
    }

    async fn get_as(&self, path: &str, cookie: &str) -> Response {
        self.stack.fetch(path, &[("Cookie", cookie)]).await
    }

    async fn post_form(&self, path: &str, cookie: Option<&str>, body: &str) -> Response {
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(cookie) = cookie {
            headers.push(("Cookie", cookie));
        }
        request(
            "POST",
            &self.stack.nginx().url(path),
            &headers,
            body.as_bytes(),
        )
        .await
    }

    fn stored(&self, path: &str) -> Option<String> {
        self.stack.memcached()[0]
            .get_raw(path.as_bytes())
            .map(|(_, value)| String::from_utf8_lossy(&value).into_owned())
    }

    /// GET through nginx until the page is a HIT: MISS first, stored, then HIT.
    async fn warm(&self, path: &str) -> Response {
        let first = self.get(path).await;
        assert_eq!(first.status, 200, "{path}: {}", first.text());
        assert_eq!(first.header("x-cache"), Some("MISS"), "first GET of {path}");
        let second = self.cached(path).await;
        assert_eq!(
            second.body, first.body,
            "{path}: the hit is the stored render"
        );
        second
    }

    /// Wait until `path` is stored, then GET it: a HIT.
    async fn cached(&self, path: &str) -> Response {
        wait_until(DEADLINE, &format!("{path} is stored"), || async {
            self.stored(path).is_some()
        })
        .await;
        let hit = self.get(path).await;
        assert_eq!(hit.header("x-cache"), Some("HIT"), "GET of stored {path}");
        assert_eq!(hit.status, 200);
        hit
    }

    async fn article(&self, id: i64) -> ArticleMeta {
        self.demo
            .article(id)
            .await
            .expect("query")
            .unwrap_or_else(|| panic!("article {id} exists"))
    }

    /// An article that shares no page with `other`: not on the home page, another
    /// category, another month.
    async fn unrelated_to(&self, other: &ArticleMeta) -> ArticleMeta {
        let latest = self.demo.latest_article_ids().await.expect("latest");
        for id in 1.. {
            let candidate = self.article(id).await;
            if !latest.contains(&id)
                && candidate.category != other.category
                && candidate.month != other.month
            {
                return candidate;
            }
        }
        unreachable!()
    }

    /// Every value in both memcached instances.
    fn all_values(&self) -> Vec<(String, String)> {
        let mut values = Vec::new();
        for server in [&self.stack.memcached()[0], self.stack.index()] {
            for key in server.keys() {
                if let Some((_, value)) = server.get_raw(&key) {
                    values.push((
                        String::from_utf8_lossy(&key).into_owned(),
                        String::from_utf8_lossy(&value).into_owned(),
                    ));
                }
            }
        }
        values
    }
}

fn count_label(id: i64, n: u64) -> String {
    format!(
        "data-article=\"{id}\">{n} comment{}<",
        if n == 1 { "" } else { "s" }
    )
}

/// The `sessionid=...` pair from a login response.
fn session_cookie(response: &Response) -> String {
    let set_cookie = response
        .header("set-cookie")
        .unwrap_or_else(|| panic!("login sets a cookie: {response:?}"));
    set_cookie
        .split(';')
        .next()
        .expect("cookie pair")
        .trim()
        .to_owned()
}

/// The `csrf` hidden field of a page.
fn csrf_token(page: &str) -> String {
    let start = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no csrf field in {page}"))
        + "name=\"csrf\" value=\"".len();
    page[start..].split('"').next().expect("token").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_page_is_a_miss_then_a_hit() {
    let stack = Stack::start().await;
    let latest = stack.demo.latest_article_ids().await.expect("latest")[0];
    let article = stack.article(latest).await;
    assert!(
        article.comments > 0,
        "the seed gives the latest article comments"
    );

    let home = stack.warm("/").await;
    assert!(home.text().contains("Latest articles"));
    assert!(
        home.text()
            .contains(&count_label(article.id, article.comments)),
        "home shows the latest article's comment count"
    );
    assert_eq!(
        home.header("content-type"),
        Some("text/html; charset=utf-8")
    );

    let page = stack.warm(&article.url()).await.text();
    assert!(page.contains(&article.title.replace('\'', "&#x27;")));
    assert!(page.contains(&count_label(article.id, article.comments)));
    let comments = page.matches("<li id=\"comment-").count();
    assert_eq!(
        comments as u64, article.comments,
        "the article page lists its comments"
    );
    assert!(
        !page.contains("name=\"csrf\""),
        "an anonymous comment form carries no token"
    );
    assert!(page.contains("<form method=\"post\" action=\"/articles/"));

    let category = stack.warm(&article.category_url()).await.text();
    assert!(category.contains(&count_label(article.id, article.comments)));
    let month = stack.warm(&article.month_url()).await.text();
    assert!(month.contains(&count_label(article.id, article.comments)));
    let about = stack.warm("/about").await.text();
    assert!(about.contains("About this blog"));
    stack.warm("/login").await;

    // What was stored is exactly what nginx served, and the site is all from SQLite.
    assert_eq!(
        stack.stored("/").map(|s| s.into_bytes()),
        Some(home.body.to_vec())
    );
    let urls = stack.demo.page_urls().await.expect("urls");
    assert!(urls.len() > 200, "{} urls", urls.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_invalidates_exactly_the_pages_that_show_it() {
    let stack = Stack::start().await;
    let latest = stack.demo.latest_article_ids().await.expect("latest")[0];
    let article = stack.article(latest).await;
    let other = stack.unrelated_to(&article).await;
    let affected = [
        article.url(),
        "/".to_owned(),
        article.category_url(),
        article.month_url(),
    ];
    let unaffected = [
        other.url(),
        other.category_url(),
        other.month_url(),
        "/about".to_owned(),
    ];
    for path in affected.iter().chain(&unaffected) {
        stack.warm(path).await;
    }

    let posted = stack
        .post_form(
            &format!("{}/comments", article.url()),
            None,
            "author=Zed+Tester&body=Cached+pages+%3Cb%3Eneed%3C%2Fb%3E+invalidation",
        )
        .await;
    assert_eq!(posted.status, 303, "{}", posted.text());
    let location = posted.header("location").expect("location").to_owned();
    assert!(
        location.starts_with(&format!("{}#comment-", article.url())),
        "{location}"
    );
    assert_eq!(
        stack.article(article.id).await.comments,
        article.comments + 1
    );

    // Invalidated before the redirect: the next request renders the new data.
    for path in &affected {
        let page = stack.get(path).await;
        assert_eq!(
            page.header("x-cache"),
            Some("MISS"),
            "{path} was invalidated"
        );
        assert!(
            page.text()
                .contains(&count_label(article.id, article.comments + 1)),
            "{path} shows the new count"
        );
    }
    let page = stack.get(&article.url()).await.text();
    assert!(page.contains("Zed Tester"));
    assert!(
        page.contains("Cached pages &lt;b&gt;need&lt;&#x2f;b&gt; invalidation"),
        "the comment is escaped"
    );
    for path in &unaffected {
        assert_eq!(
            stack.get(path).await.header("x-cache"),
            Some("HIT"),
            "{path} does not show the article and stays cached"
        );
    }

    // An article that is not on the home page leaves home cached.
    let home_before = stack.cached("/").await;
    let posted = stack
        .post_form(
            &format!("{}/comments", other.url()),
            None,
            "author=Yan&body=Old+but+gold",
        )
        .await;
    assert_eq!(posted.status, 303);
    assert_eq!(
        stack.get(&other.url()).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        stack.get(&other.category_url()).await.header("x-cache"),
        Some("MISS")
    );
    let home = stack.get("/").await;
    assert_eq!(home.header("x-cache"), Some("HIT"), "home does not list it");
    assert_eq!(home.body, home_before.body);

    // A rejected comment changes nothing.
    let rejected = stack
        .post_form(
            &format!("{}/comments", article.url()),
            None,
            "author=&body=x",
        )
        .await;
    assert_eq!(rejected.status, 422);
    assert!(rejected.text().contains("Please give your name."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_in_users_bypass_the_cache_and_are_never_stored() {
    let stack = Stack::start().await;
    let name = "Ada Lovelace-7f3a";
    let latest = stack.demo.latest_article_ids().await.expect("latest")[0];
    let article = stack.article(latest).await;

    let login = stack
        .post_form("/login", None, "name=Ada+Lovelace-7f3a")
        .await;
    assert_eq!(login.status, 303, "{}", login.text());
    let cookie = session_cookie(&login);
    assert!(cookie.starts_with("sessionid="), "{cookie}");

    let paths = [
        "/".to_owned(),
        article.url(),
        article.category_url(),
        article.month_url(),
        "/about".to_owned(),
        "/login".to_owned(),
    ];
    for path in &paths {
        // Twice: the second would be a HIT if anything had been stored.
        for _ in 0..2 {
            let page = stack.get_as(path, &cookie).await;
            assert_eq!(page.status, 200, "{path}");
            assert_eq!(page.header("x-cache"), Some("BYPASS"), "{path} as {name}");
            assert!(page.text().contains(name), "{path} shows the user's name");
            assert_eq!(page.header("cache-control"), Some("private, no-cache"));
        }
        // Anonymous visitors meanwhile get cached pages without the name.
        let anonymous = stack.warm(path).await;
        assert!(!anonymous.text().contains(name));
    }
    let page = stack.get_as(&article.url(), &cookie).await.text();
    let csrf = csrf_token(&page);

    stack.demo.cache().wait_for_writes().await;
    let values = stack.all_values();
    assert!(
        values.len() > paths.len(),
        "pages and index are in memcached"
    );
    for (key, value) in &values {
        assert!(
            !value.contains(name) && !value.contains(&csrf),
            "memcached key {key} holds the user's name or token"
        );
    }

    // The logged-in comment form needs the session's token; with it the
    // comment is posted under the user's name and invalidates as usual.
    let forged = stack
        .post_form(
            &format!("{}/comments", article.url()),
            Some(&cookie),
            "body=forged&csrf=0000",
        )
        .await;
    assert_eq!(forged.status, 403);
    let posted = stack
        .post_form(
            &format!("{}/comments", article.url()),
            Some(&cookie),
            &format!("body=Signed+comment&author=Mallory&csrf={csrf}"),
        )
        .await;
    assert_eq!(posted.status, 303, "{}", posted.text());
    let anonymous = stack.get(&article.url()).await;
    assert_eq!(anonymous.header("x-cache"), Some("MISS"));
    let text = anonymous.text();
    assert!(text.contains(&format!("<strong class=\"author\">{name}</strong>")));
    assert!(
        !text.contains("Mallory"),
        "the author is the session's name"
    );
    assert!(text.contains(&count_label(article.id, article.comments + 1)));
    assert_eq!(stack.get("/").await.header("x-cache"), Some("MISS"));

    // Logging out clears the cookie and forgets the session.
    let logout = stack
        .post_form("/logout", Some(&cookie), &format!("csrf={csrf}"))
        .await;
    assert_eq!(logout.status, 303);
    assert!(
        logout
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    let after = stack.get_as("/about", &cookie).await;
    assert!(!after.text().contains(name), "the session is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_and_the_search_are_never_cached() {
    let stack = Stack::start().await;
    for path in ["/articles/feed.xml", "/articles/search?q=cache"] {
        for _ in 0..3 {
            let response = stack.get(path).await;
            assert_eq!(response.status, 200, "{path}");
            assert_ne!(response.header("x-cache"), Some("HIT"), "{path}");
            assert_eq!(response.header("x-cache"), Some("BYPASS"), "{path}");
        }
    }
    let feed = stack.get("/articles/feed.xml").await;
    assert_eq!(
        feed.header("content-type"),
        Some("application/rss+xml; charset=utf-8")
    );
    let text = feed.text();
    assert!(text.starts_with("<?xml"), "{text}");
    assert_eq!(text.matches("<item>").count(), 20);
    let search = stack.get("/articles/search?q=cache").await.text();
    assert!(search.contains("result"), "{search}");

    stack.demo.cache().wait_for_writes().await;
    for key in stack.stack.memcached()[0].keys() {
        let key = String::from_utf8_lossy(&key).into_owned();
        assert!(
            !key.contains("feed") && !key.contains("search"),
            "{key} was stored"
        );
    }
}

/// Issue "faults, races and hostile input", leaks: a scripted session of
/// logged-in and anonymous users, interleaved on the same pages. After every
/// step nothing stored may show a signed-in identity or a CSRF token, and no
/// response that set a cookie may have been stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_sessions_never_leak_a_user_page() {
    let stack = Stack::start().await;
    let mut urls = stack.demo.page_urls().await.expect("urls");
    urls.truncate(40);
    urls.push("/login".to_owned());
    let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D);
    let mut next = move |n: usize| rng.usize(..n);

    let mut sessions = Vec::new();
    let mut set_cookie_bodies = Vec::new();
    for i in 0..5 {
        let login = stack
            .post_form("/login", None, &format!("name=Leaky+User+{i}"))
            .await;
        set_cookie_bodies.push(login.body.clone());
        sessions.push((format!("Leaky User {i}"), session_cookie(&login)));
    }
    let mut tokens: Vec<String> = Vec::new();
    let (mut requests, mut comments) = (0usize, 0usize);
    for step in 0..300 {
        let url = &urls[next(urls.len())];
        let response = match next(4) {
            0 | 1 => stack.get(url).await,
            2 => {
                let (_, cookie) = &sessions[next(sessions.len())];
                let page = stack.get_as(url, cookie).await;
                assert_eq!(page.header("x-cache"), Some("BYPASS"), "{url}");
                if page.text().contains("name=\"csrf\"") {
                    tokens.push(csrf_token(&page.text()));
                }
                page
            }
            _ => {
                let (name, cookie) = &sessions[next(sessions.len())];
                let article = stack.article(1 + next(20) as i64).await;
                let page = stack.get_as(&article.url(), cookie).await.text();
                let csrf = csrf_token(&page);
                tokens.push(csrf.clone());
                comments += 1;
                let body = format!("csrf={csrf}&body=step+{step}+by+{}", name.replace(' ', "+"));
                stack
                    .post_form(&format!("{}/comments", article.url()), Some(cookie), &body)
                    .await
            }
        };
        requests += 1;
        assert!(
            response.status.is_success() || response.status.is_redirection(),
            "{url}: {}",
            response.status
        );
        if response.header("set-cookie").is_some() {
            set_cookie_bodies.push(response.body.clone());
        }
        if step % 50 == 49 {
            stack.demo.cache().wait_for_writes().await;
            assert_no_leak(&stack, &tokens, &set_cookie_bodies);
        }
    }
    stack.demo.cache().wait_for_writes().await;
    let stored = assert_no_leak(&stack, &tokens, &set_cookie_bodies);
    println!(
        "leaks: {requests} requests ({comments} comments by signed-in users, {} CSRF tokens seen), \
         {stored} pages stored, signed-in pages or tokens found in memcached: 0",
        tokens.len()
    );
    assert!(
        stored > 10,
        "anonymous pages were cached meanwhile ({stored})"
    );
}

/// Scan every stored page; returns how many there are.
fn assert_no_leak(stack: &Stack, tokens: &[String], set_cookie_bodies: &[bytes::Bytes]) -> usize {
    let mut pages = 0;
    for (key, value) in stack.all_values() {
        if key.starts_with("mcpage:") {
            continue;
        }
        pages += 1;
        assert!(
            !value.contains("Signed in as"),
            "{key} stored a signed-in page"
        );
        assert!(
            !value.contains("class=\"username\""),
            "{key} stored a signed-in page"
        );
        for token in tokens {
            assert!(!value.contains(token.as_str()), "{key} stored a CSRF token");
        }
        for body in set_cookie_bodies {
            assert!(
                body.is_empty() || value.as_bytes() != &body[..],
                "{key} stored a response that set a cookie"
            );
        }
    }
    pages
}
