"""The blog end to end: nginx -> memcached, misses through ``mcpage proxy`` (unix
socket) to gunicorn (unix socket) running Django with the mcpage package.
Every wait polls with a deadline; nothing sleeps."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

import stack as processes
from conftest import Stack, csrf_token, short_tempdir

PAGES = [
    "/",
    "/articles/1/",
    "/articles/2/",
    "/category/news/",
    "/category/tech/",
    "/about/",
    "/pages/colophon/",
]


def cached(stack: Stack, path: str) -> str:
    """Render ``path`` (a miss), wait until it is stored, check the hit; the body."""
    status, headers, miss = stack.get(path)
    assert (status, headers["X-Cache"]) == (200, "MISS"), (path, dict(headers), stack.logs())
    # CacheTagsMiddleware dropped the Vary: Cookie that the templates' use of
    # `user` made SessionMiddleware add; otherwise the proxy would not store it.
    assert "cookie" not in headers.get("Vary", "").lower(), dict(headers)
    stack.wait_stored(path)
    status, headers, hit = stack.get(path)
    assert (status, headers["X-Cache"]) == (200, "HIT"), (path, dict(headers))
    assert hit == miss
    return hit


def test_a_comment_makes_exactly_the_pages_that_show_it_misses(stack: Stack) -> None:
    for path in PAGES:
        cached(stack, path)
    # Excluded by MCPAGE_EXCLUDE_URLS: never stored.
    for _ in range(2):
        status, headers, _ = stack.get("/pages/private-notes/")
        assert (status, headers["X-Cache"]) == (200, "BYPASS")
    assert not stack.stored("/pages/private-notes/")

    status, headers, _ = stack.post("/articles/1/comments/", {"author": "carol", "text": "Great read"})
    assert status == 302, stack.logs()
    assert headers["Location"] == "/articles/1/"
    # The invalidation ran at commit, before the response: no waiting needed.
    shows_it = {"/", "/articles/1/"}
    for path in PAGES:
        assert stack.stored(path) == (path not in shows_it), path
    for path in PAGES:
        status, headers, body = stack.get(path)
        expected = "MISS" if path in shows_it else "HIT"
        assert (status, headers["X-Cache"]) == (200, expected), path
        assert ("Great read" in body) == (path in shows_it), (path, body)


def test_a_signed_in_user_never_gets_or_makes_a_cached_page(stack: Stack) -> None:
    cached_page = cached(stack, "/articles/3/")
    assert "Sign in" in cached_page

    # Sign in with Django's own LoginView (its form sets the CSRF cookie: not cached).
    status, headers, body = stack.get("/accounts/login/")
    assert (status, headers["X-Cache"]) == (200, "BYPASS")
    jar = processes.cookies_of(headers)
    status, headers, _ = stack.post(
        "/accounts/login/",
        {"username": "alice", "password": "wonderland", "csrfmiddlewaretoken": csrf_token(body)},
        jar,
    )
    assert status == 302, stack.logs()
    jar.update(processes.cookies_of(headers))
    assert "sessionid" in jar

    # A cached page: nginx does not serve it to her, the app renders her own.
    status, headers, body = stack.get("/articles/3/", jar)
    assert (status, headers["X-Cache"]) == (200, "BYPASS")
    assert "Signed in as alice" in body
    assert stack.memcached.get("/articles/3/") == cached_page.encode()

    # A page nobody has cached yet: rendered for her, and not stored.
    for _ in range(2):
        status, headers, body = stack.get("/pages/members/", jar)
        assert (status, headers["X-Cache"]) == (200, "BYPASS")
        assert "Signed in as alice" in body
    assert not stack.stored("/pages/members/")
    status, headers, body = stack.get("/pages/members/")
    assert (status, headers["X-Cache"]) == (200, "MISS"), "a signed-in render was stored"
    assert "alice" not in body

    # Her comment invalidates like anyone's.
    status, _, _ = stack.post("/articles/3/comments/", {"author": "alice", "text": "Mine"}, jar)
    assert status == 302
    assert not stack.stored("/articles/3/")


def test_manage_py_mcpage_invalidate(stack: Stack) -> None:
    for path in ["/pages/cmd-a/", "/pages/cmd-b/", "/pages/cmd-c/", "/pages/cmd-d/"]:
        cached(stack, path)

    # As an operator runs it: manage.py in the site's environment.
    done = stack.manage("mcpage", "invalidate", "--tag", "page:cmd-a", "--url", "/pages/cmd-b/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "removed 2 pages (tags page:cmd-a; urls /pages/cmd-b/)"
    assert not stack.stored("/pages/cmd-a/") and not stack.stored("/pages/cmd-b/")
    assert stack.stored("/pages/cmd-c/")

    # The same command in this process (Django starts in seconds, not milliseconds).
    with override_settings(MCPAGE_PROXY_URL=stack.proxy.listen, MCPAGE_INVALIDATE_TOKEN=stack.token):
        out = io.StringIO()
        call_command("mcpage", "invalidate", "--prefix", "/pages/cmd-c", "--json", stdout=out)
        answer = json.loads(out.getvalue())
        assert (answer["pages"], answer["prefix"]) == (1, {"/pages/cmd-c": 1}), answer
        assert not stack.stored("/pages/cmd-c/") and stack.stored("/pages/cmd-d/")
        with pytest.raises(CommandError, match="give --tag, --url or --prefix"):
            call_command("mcpage", "invalidate")
    with override_settings(MCPAGE_PROXY_URL=stack.proxy.listen, MCPAGE_INVALIDATE_TOKEN="wrong"):
        with pytest.raises(CommandError, match="answered 401"):
            call_command("mcpage", "invalidate", "--tag", "page:cmd-d")
    assert stack.stored("/pages/cmd-d/")


def test_manage_py_check_is_clean(stack: Stack) -> None:
    with override_settings(MCPAGE_INVALIDATE_TOKEN=stack.token):
        call_command("check", fail_level="WARNING")


def test_unconfirmed_work_is_handed_to_the_proxy_and_confirmed_when_memcached_is_back() -> None:
    """memcached down: the proxy answers 202 (pending: it keeps and retries the
    work itself), the package counts the work as handed off, and the proxy
    confirms it once memcached is back. Its own memcached and proxy (over TCP),
    so the stack above is untouched."""
    from mcpage import flush, invalidate, stats

    directory = short_tempdir("mcpage-retry-")
    started = []
    memcached = None
    try:
        memcached = processes.Memcached(directory)
        listen = f"127.0.0.1:{processes.free_port()}"
        config = directory / "mcpage.toml"
        config.write_text(
            processes.mcpage_toml([memcached], f"127.0.0.1:{processes.free_port()}", listen, "http://127.0.0.1:9")
        )
        proxy = processes.Proxy(config, listen, "retry-token")
        started.append(proxy.process)

        def proxy_pending() -> float:
            return proxy.metrics().get("mcpage_pending_invalidations", 0.0)

        with override_settings(
            MCPAGE_PROXY_URL=f"http://{listen}",
            MCPAGE_INVALIDATE_TOKEN="retry-token",
            MCPAGE_RETRY_DELAY=0.05,
            MCPAGE_RETRY_MAX_DELAY=0.2,
        ):
            memcached.stop()
            invalidate(tags=["comments"], urls=["/about/"])  # autocommit: sent at once
            assert flush(timeout=30), stats()  # accepted by the proxy (202) in the end
            assert stats()["pending"] == 0
            processes.wait_until("the proxy holds the unconfirmed work", lambda: proxy_pending() > 0 or None)
            memcached.start()
            processes.wait_until("the proxy confirms it", lambda: proxy_pending() == 0 or None)
            metrics = proxy.metrics()
            assert metrics["mcpage_invalidation_retries_total"] >= 1, metrics
    except processes.Missing as missing:
        pytest.fail(str(missing), pytrace=False)
    finally:
        processes.stop_all([p for p in started if p is not None])
        # After stop() and start() it is another process than the first one.
        if memcached is not None:
            memcached.stop()
        processes.shutil.rmtree(directory, ignore_errors=True)
