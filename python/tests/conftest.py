"""Test setup: the ``blog`` project (tests/blog) configured in-process for the
unit tests, and, for the end-to-end tests, the whole stack started once per
session: memcached, gunicorn serving the blog on a unix socket, ``mcpage
proxy`` on another unix socket in front of it, and nginx (rendered by
``mcpage nginx --full``) on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import urlencode

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# The unit tests' database: a file of their own (never the stack's).
_UNIT_DIR = tempfile.mkdtemp(prefix="mcpage-unit-")
os.environ["DJANGO_SETTINGS_MODULE"] = "blog.settings"
os.environ["BLOG_DB"] = os.path.join(_UNIT_DIR, "unit.sqlite3")
os.environ.pop("MCPAGE_PROXY__INVALIDATE_TOKEN", None)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

import stack as processes  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def unit_database() -> Iterator[None]:
    call_command("migrate", verbosity=0)
    yield
    shutil.rmtree(_UNIT_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def empty_queue() -> Iterator[None]:
    """Every test leaves nothing pending in this process's invalidation queue."""
    yield
    from mcpage import flush, stats

    assert flush(timeout=10), f"invalidations still pending after the test: {stats()}"


# ---------------------------------------------------------------------------
# a fake proxy for the unit tests
# ---------------------------------------------------------------------------


@dataclass
class FakeProxy:
    """Records every request; answers from ``replies`` (status, body) in
    order, then ``200 {"pages": 0}``."""

    url: str
    requests: List[Dict[str, Any]] = field(default_factory=list)
    replies: List[Tuple[int, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> List[Any]:
        with self.lock:
            return [r["body"] for r in self.requests]


@pytest.fixture
def fake_proxy() -> Iterator[FakeProxy]:
    fake = FakeProxy(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with fake.lock:
                fake.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(data)}
                )
                status, body = fake.replies.pop(0) if fake.replies else (200, {"pages": 0})
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    from django.test import override_settings

    with override_settings(MCPAGE_PROXY_URL=fake.url, MCPAGE_INVALIDATE_TOKEN="t0ken"):
        yield fake
        from mcpage import flush

        flush(timeout=10)
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------
# the real stack
# ---------------------------------------------------------------------------


@dataclass
class Stack:
    directory: Path
    memcached: processes.Memcached
    proxy: processes.Proxy
    nginx: processes.Nginx
    gunicorn: processes.Gunicorn
    env: Dict[str, str]
    token: str

    def get(self, path: str, cookies: Optional[Mapping[str, str]] = None) -> Tuple[int, Any, str]:
        """``GET path`` through nginx; the tag header must never reach a client."""
        headers = {"Cookie": processes.cookie_header(cookies)} if cookies else {}
        status, response_headers, body = processes.request(self.nginx.listen, "GET", path, headers)
        assert "X-Cache-Tags" not in response_headers, (path, dict(response_headers))
        return status, response_headers, body.decode()

    def post(
        self, path: str, form: Mapping[str, str], cookies: Optional[Mapping[str, str]] = None
    ) -> Tuple[int, Any, str]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if cookies:
            headers["Cookie"] = processes.cookie_header(cookies)
        status, response_headers, body = processes.request(
            self.nginx.listen, "POST", path, headers, urlencode(form).encode()
        )
        return status, response_headers, body.decode()

    def stored(self, path: str) -> bool:
        return self.memcached.get(path) is not None

    def wait_stored(self, path: str) -> None:
        processes.wait_until(f"{path} in memcached", lambda: self.stored(path))

    def manage(self, *args: str, env: Optional[Mapping[str, str]] = None) -> "subprocess.CompletedProcess[str]":
        """``manage.py ARGS`` as the site runs it (``env`` overrides variables)."""
        return subprocess.run(
            [sys.executable, str(TESTS / "manage.py"), *args],
            env={**self.env, **(env or {})},
            cwd=TESTS,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}:\n{p.log()[-4000:]}"
            for p in (self.gunicorn.process, self.proxy.process, self.nginx.process)
        )


def short_tempdir(prefix: str) -> Path:
    """Under /tmp (unix socket paths are short), traversable by nginx's workers."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    directory = short_tempdir("mcpage-py-")
    started: List[processes.Process] = []
    try:
        processes.mcpage_binary()  # fail early, with the hint, when it is missing
        memcached = processes.Memcached(directory)
        assert memcached.process is not None
        started.append(memcached.process)
        token = secrets.token_hex(16)
        proxy_socket = f"unix:{directory}/proxy.sock"
        env = processes.clean_env(
            {
                "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "DJANGO_SETTINGS_MODULE": "blog.settings",
                "BLOG_DB": str(directory / "blog.sqlite3"),
                "BLOG_MCPAGE_PROXY_URL": proxy_socket,
                "MCPAGE_PROXY__INVALIDATE_TOKEN": token,
            }
        )
        subprocess.run(
            [sys.executable, str(TESTS / "manage.py"), "migrate", "-v0"],
            env=env,
            cwd=TESTS,
            check=True,
        )
        gunicorn = processes.Gunicorn(f"unix:{directory}/gunicorn.sock", directory, env)
        started.append(gunicorn.process)
        nginx_listen = f"127.0.0.1:{processes.free_port()}"
        config = directory / "mcpage.toml"
        config.write_text(
            processes.mcpage_toml(
                [memcached], nginx_listen, proxy_socket, f"unix:{directory}/gunicorn.sock"
            )
        )
        proxy = processes.Proxy(config, proxy_socket, token)
        started.append(proxy.process)
        nginx = processes.Nginx(config, directory, nginx_listen)
        started.append(nginx.process)
        yield Stack(directory, memcached, proxy, nginx, gunicorn, env, token)
    except processes.Missing as missing:
        pytest.fail(str(missing), pytrace=False)
    finally:
        processes.stop_all(started)
        shutil.rmtree(directory, ignore_errors=True)


def csrf_token(body: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', body)
    assert match, body
    return match.group(1)
