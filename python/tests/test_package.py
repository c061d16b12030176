"""The package in-process: tags, the middleware, the checks, and the
invalidation queue against a fake proxy that answers what each test scripts."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.checks import run_checks
from django.db import transaction
from django.http import HttpResponse
from django.test import RequestFactory, override_settings

import mcpage
from blog.models import Article, Comment
from conftest import FakeProxy
from mcpage import conf, invalidation
from mcpage.invalidation import Work
from mcpage.middleware import CacheTagsMiddleware
from stack import wait_until

rf = RequestFactory()


def through_middleware(
    path: str, response: HttpResponse, cookies: Any = None, user: Any = None
) -> HttpResponse:
    request = rf.get(path)
    request.COOKIES.update(cookies or {})
    request.user = user or AnonymousUser()
    return CacheTagsMiddleware(lambda r: response)(request)  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# tags
# ---------------------------------------------------------------------------


def test_cache_tags_fills_templates_from_url_kwargs_and_calls_callables() -> None:
    @mcpage.cache_tags("comments", "article:{pk}", lambda request, pk: [f"author:{pk * 2}"])
    def view(request: Any, pk: int) -> HttpResponse:
        return HttpResponse("ok")

    response = view(rf.get("/articles/21/"), pk=21)
    assert response["X-Cache-Tags"] == "comments, article:21, author:42"
    assert view.__name__ == "view"


def test_tags_merge_and_non_ascii_tags_travel_as_utf8() -> None:
    response = HttpResponse("ok")
    mcpage.tag_response(response, "a", "b")
    mcpage.add_tags(response, ["b", "catégorie:été"])
    # The proxy reads the header's bytes as UTF-8; WSGI carries them as latin-1 text.
    assert response["X-Cache-Tags"].encode("latin-1").decode() == "a, b, catégorie:été"


def test_a_tag_the_proxy_would_split_leaves_the_page_uncached(caplog: Any) -> None:
    @mcpage.cache_tags("article:{slug}")
    def view(request: Any, slug: str) -> HttpResponse:
        return HttpResponse("ok")

    with caplog.at_level(logging.ERROR, logger="mcpage"):
        response = view(rf.get("/x/"), slug="a,b")
    assert "X-Cache-Tags" not in response
    assert "contains a comma" in caplog.text

    @mcpage.cache_tags("article:{missing}")
    def broken(request: Any, pk: int) -> HttpResponse:
        return HttpResponse("ok")

    assert "X-Cache-Tags" not in broken(rf.get("/y/"), pk=1)
    too_many = HttpResponse("ok")
    mcpage.add_tags(too_many, [str(n) for n in range(129)])
    assert "X-Cache-Tags" not in too_many


@override_settings(MCPAGE_TAG_HEADER="X-Page-Tags")
def test_the_header_name_is_a_setting() -> None:
    assert mcpage.tag_response(HttpResponse(), "a")["X-Page-Tags"] == "a"


# ---------------------------------------------------------------------------
# the middleware
# ---------------------------------------------------------------------------


def test_urls_tag_views_you_cannot_decorate_and_exclude_wins() -> None:
    tagged = through_middleware("/pages/colophon/", HttpResponse("ok"))
    assert tagged["X-Cache-Tags"] == "page:colophon"
    about = through_middleware("/about/", HttpResponse("ok"))
    assert about["X-Cache-Tags"] == "about"
    excluded = through_middleware("/pages/private-notes/", HttpResponse("ok"))
    assert "X-Cache-Tags" not in excluded
    untouched = through_middleware("/elsewhere/", HttpResponse("ok"))
    assert "X-Cache-Tags" not in untouched
    # A decorated view keeps its own tags.
    own = mcpage.tag_response(HttpResponse("ok"), "mine")
    assert through_middleware("/about/", own)["X-Cache-Tags"] == "mine"


@override_settings(MCPAGE_URLS=[(r"^/shop/(?P<sku>\d+)/$", lambda request, match: ["sku:" + match["sku"]])])
def test_urls_take_a_callable() -> None:
    assert through_middleware("/shop/7/", HttpResponse("ok"))["X-Cache-Tags"] == "sku:7"


def test_vary_cookie_is_dropped_only_from_tagged_anonymous_pages() -> None:
    def page(tags: bool, vary: str) -> HttpResponse:
        response = HttpResponse("ok")
        response["Vary"] = vary
        return mcpage.tag_response(response, "t") if tags else response

    assert "Vary" not in through_middleware("/x/", page(True, "Cookie"))
    kept = through_middleware("/x/", page(True, "Accept-Encoding, Cookie"))
    assert kept["Vary"] == "Accept-Encoding"
    assert through_middleware("/x/", page(False, "Cookie"))["Vary"] == "Cookie"


def test_a_signed_in_user_or_a_session_cookie_untags_the_page() -> None:
    class Alice:
        is_authenticated = True

    for kwargs in ({"cookies": {"sessionid": "abc"}}, {"user": Alice()}):
        response = HttpResponse("ok")
        response["Vary"] = "Cookie"
        response = through_middleware("/x/", mcpage.tag_response(response, "t"), **kwargs)
        assert "X-Cache-Tags" not in response
        assert response["Vary"] == "Cookie"


# ---------------------------------------------------------------------------
# settings and checks
# ---------------------------------------------------------------------------


def check_ids(**settings: Any) -> list[str]:
    with override_settings(**settings):
        return sorted(m.id for m in run_checks(tags=["mcpage"]) if m.id)


def test_checks() -> None:
    assert check_ids(MCPAGE_INVALIDATE_TOKEN="t") == []
    assert check_ids() == ["mcpage.W001"]  # no token
    for bad in (
        {"MCPAGE_PROXY_URL": "https://127.0.0.1:8081"},
        {"MCPAGE_PROXY_URL": "unix:relative.sock"},
        {"MCPAGE_URLS": {"(": ["x"]}},
        {"MCPAGE_URLS": {"^/": 3}},
        {"MCPAGE_EXCLUDE_URLS": "^/admin/"},
        {"MCPAGE_TIMEOUT": 0},
        {"MCPAGE_TAG_HEADER": "X Tags"},
        {"MCPAGE_INVALIDATE_TOKEN": "two words"},
    ):
        assert check_ids(**bad) == ["mcpage.E001"], bad
    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "mcpage.middleware.CacheTagsMiddleware",
        "django.middleware.gzip.GZipMiddleware",
        "django.middleware.locale.LocaleMiddleware",
    ]
    assert check_ids(MCPAGE_INVALIDATE_TOKEN="t", MIDDLEWARE=middleware) == [
        "mcpage.W003",
        "mcpage.W004",
        "mcpage.W005",
    ]
    assert check_ids(MCPAGE_INVALIDATE_TOKEN="t", MIDDLEWARE=[]) == ["mcpage.W002"]
    assert check_ids(MCPAGE_INVALIDATE_TOKEN="t", SESSION_COOKIE_NAME="sid") == ["mcpage.W006"]


def test_the_token_defaults_to_the_proxys_environment_variable(monkeypatch: Any) -> None:
    monkeypatch.setenv("MCPAGE_PROXY__INVALIDATE_TOKEN", "from-env")
    with override_settings(MCPAGE_TIMEOUT=5.0):  # recompiles the settings
        assert conf.get().token == "from-env"
    with override_settings(MCPAGE_INVALIDATE_TOKEN="from-settings"):
        assert conf.get().token == "from-settings"


# ---------------------------------------------------------------------------
# invalidation
# ---------------------------------------------------------------------------


def test_invalidation_waits_for_the_commit_and_never_runs_on_rollback(fake_proxy: FakeProxy) -> None:
    with transaction.atomic():
        mcpage.invalidate(tags=["comments"], urls=["/about/"])
        assert fake_proxy.bodies() == []
    assert fake_proxy.bodies() == [{"tags": ["comments"], "urls": ["/about/"]}]
    request = fake_proxy.requests[0]
    assert request["path"] == "/_mcpage/invalidate"
    assert request["headers"]["Authorization"] == "Bearer t0ken"

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            mcpage.invalidate(tags=["never"])
            raise RuntimeError("rolled back")
    assert len(fake_proxy.bodies()) == 1


def test_signal_helpers_invalidate_on_save_and_delete(fake_proxy: FakeProxy) -> None:
    article = Article.objects.get(pk=2)
    comment = Comment.objects.create(article=article, author="x", text="y")
    comment.delete()
    expected = {"tags": ["article:2", "comments"], "urls": []}
    assert fake_proxy.bodies() == [expected, expected]


def test_prefixes_go_one_per_request_and_strings_are_refused() -> None:
    work = Work.of(tags=["a"]).merge(Work.of(prefix="/x/")).merge(Work.of(prefix="/y/"))
    assert work.bodies() == [{"tags": ["a"], "urls": [], "prefix": "/x/"}, {"prefix": "/y/"}]
    assert work.command() == "manage.py mcpage invalidate --tag 'a' --prefix '/x/' --prefix '/y/'"
    with pytest.raises(TypeError):
        mcpage.invalidate(tags="comments")


def test_failures_are_retried_in_the_background_until_confirmed(fake_proxy: FakeProxy, caplog: Any) -> None:
    fake_proxy.replies = [(502, {"error": "memcached did not confirm"})] * 3
    before = mcpage.stats()
    with caplog.at_level(logging.WARNING, logger="mcpage"), override_settings(
        MCPAGE_RETRY_DELAY=0.2
    ):
        mcpage.invalidate(tags=["comments"])
        assert "not confirmed" in caplog.text and "memcached did not confirm" in caplog.text
        # Visible until confirmed (the retries come 0.2, 0.4 and 0.8 s later).
        assert mcpage.stats()["pending"] == 1
        assert mcpage.flush(timeout=10)
    after = mcpage.stats()
    assert after["pending"] == 0
    assert after["failures"] - before["failures"] == 3
    assert after["sent"] - before["sent"] == 1
    assert fake_proxy.bodies() == [{"tags": ["comments"], "urls": []}] * 4
    assert "confirmed after retrying" in caplog.text


def test_work_submitted_while_the_proxy_fails_joins_the_pending_work(fake_proxy: FakeProxy) -> None:
    fake_proxy.replies = [(503, "busy")] * 2
    with override_settings(MCPAGE_RETRY_DELAY=5.0, MCPAGE_RETRY_MAX_DELAY=5.0):
        mcpage.invalidate(tags=["a"])
        wait_until("a retry of the first work", lambda: len(fake_proxy.bodies()) >= 2)
        mcpage.invalidate(tags=["b"], urls=["/c/"])
        assert len(fake_proxy.bodies()) == 2  # no request of its own
        wait_until("the combined work pending", lambda: mcpage.stats()["pending"] == 3)
        assert mcpage.flush(timeout=10)
    assert fake_proxy.bodies()[-1] == {"tags": ["a", "b"], "urls": ["/c/"]}


def test_a_refusal_is_reported_not_retried_and_pending_is_accepted(fake_proxy: FakeProxy, caplog: Any) -> None:
    fake_proxy.replies = [(401, {"error": "wrong token"}), (202, {"pending": 1})]
    before = mcpage.stats()
    with caplog.at_level(logging.ERROR, logger="mcpage"):
        mcpage.invalidate(tags=["a"])
    assert "refused" in caplog.text and "answered 401: wrong token" in caplog.text
    mcpage.invalidate(tags=["b"])
    after = mcpage.stats()
    assert after["rejected"] - before["rejected"] == 1
    assert after["queued_by_proxy"] - before["queued_by_proxy"] == 1
    assert after["pending"] == 0
    assert len(fake_proxy.bodies()) == 2


def test_a_proxy_on_a_unix_socket(tmp_path: Any) -> None:
    path = tmp_path / "proxy.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    seen: list[bytes] = []

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                data += connection.recv(65536)
            seen.append(data)
            body = b'{"pages": 3, "tags": {"t": 3}}'
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with override_settings(MCPAGE_PROXY_URL=f"unix:{path}", MCPAGE_INVALIDATE_TOKEN="s"):
        assert mcpage.invalidate_now(tags=["t"]) == {"pages": 3, "tags": {"t": 3}}
    thread.join(timeout=10)
    server.close()
    assert seen[0].startswith(b"POST /_mcpage/invalidate HTTP/1.1\r\nHost: localhost\r\n")


def test_exiting_with_pending_work_names_the_command_that_does_it(caplog: Any) -> None:
    queue = invalidation.Queue()
    with override_settings(
        MCPAGE_PROXY_URL="unix:/nonexistent/mcpage.sock",
        MCPAGE_INVALIDATE_TOKEN="s",
        MCPAGE_TIMEOUT=0.2,
        MCPAGE_RETRY_DELAY=60.0,  # the flush at exit is the only retry
        MCPAGE_RETRY_MAX_DELAY=120.0,
    ):
        queue.submit(Work.of(tags=["comments"], urls=["/about/"]))
        assert queue.stats()["pending"] == 2
        with caplog.at_level(logging.ERROR, logger="mcpage"):
            queue.at_exit()
    assert "never confirmed" in caplog.text
    assert "manage.py mcpage invalidate --tag 'comments' --url '/about/'" in caplog.text
