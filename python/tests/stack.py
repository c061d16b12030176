"""The real processes the end-to-end tests run: memcached, the `mcpage` binary
(proxy and nginx config), nginx and gunicorn. Each binds 127.0.0.1 (or a unix
socket in the test's directory), is waited for by polling with a deadline, and
is stopped by its PID. A missing binary fails with an install hint."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, TypeVar

DEADLINE = 20.0
POLL = 0.01
REPO = Path(__file__).resolve().parents[2]
INSTALL_SERVERS = "install them with `apt-get install -y memcached nginx`"

T = TypeVar("T")


class Missing(Exception):
    """A binary the tests need is not installed."""


def wait_until(what: str, check: Callable[[], Optional[T]], deadline: float = DEADLINE) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(POLL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Missing(f"`{name}` is not installed: {hint}")
    return path


def mcpage_binary() -> str:
    """``$MCPAGE_BIN``, else the debug build of this repository."""
    path = os.environ.get("MCPAGE_BIN") or str(REPO / "target" / "debug" / "mcpage")
    if not os.access(path, os.X_OK):
        raise Missing(
            f"the mcpage binary is missing ({path}): build it with `cargo build -p mcpage-cli` "
            "in the repository, or point MCPAGE_BIN at one"
        )
    return path


class Process:
    """A child process with its log; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, args: Sequence[str], log: Path, env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None) -> None:
        self.name = name
        self.log_path = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, what: str, ready: Callable[[], bool]) -> None:
        def check() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before {what}:\n{self.log()}"
                )
            return ready()

        try:
            wait_until(what, check)
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"{error}\n--- {self.name} log:\n{self.log()}") from None

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connects(address: str) -> bool:
    """Does ``host:port`` or ``unix:/path`` accept a connection?"""
    try:
        if address.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(address[len("unix:") :])
        else:
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=1):
                pass
        return True
    except OSError:
        return False


class Memcached:
    """memcached on a free loopback port."""

    def __init__(self, directory: Path, port: int = 0) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: Optional[Process] = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [binary("memcached", INSTALL_SERVERS), "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64", "-t", "1"]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self.process = Process("memcached", args, self.directory / f"memcached-{self.port}.log")
        self.process.wait_ready(f"memcached on {self.address}", lambda: connects(self.address))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def command(self, line: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(line)
            data = b""
            while not (data.endswith(b"END\r\n") or data.endswith(b"ERROR\r\n")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def get(self, key: str) -> Optional[bytes]:
        """The value stored under ``key`` (a page's URL path), or None."""
        data = self.command(b"get " + key.encode() + b"\r\n")
        if not data.startswith(b"VALUE "):
            return None
        header, _, rest = data.partition(b"\r\n")
        length = int(header.split()[3])
        return rest[:length]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mcpage_toml(memcached: Sequence[Memcached], nginx_listen: str, app: str, upstream: str, extra: str = "") -> str:
    servers = ", ".join(json.dumps(m.address) for m in memcached)
    return (
        f"[memcached]\nservers = [{servers}]\n\n"
        f"[nginx]\nlisten = {json.dumps(nginx_listen)}\napp = {json.dumps(app)}\n\n"
        f"[proxy]\nlisten = {json.dumps(app)}\nupstream = {json.dumps(upstream)}\n{extra}"
    )


def clean_env(extra: Mapping[str, str]) -> Dict[str, str]:
    """This environment without MCPAGE_* (the config under test is the file), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPAGE_")}
    env.update(extra)
    return env


class Proxy:
    """``mcpage --config FILE proxy``; ready once ``/_mcpage/health`` answers."""

    def __init__(self, config: Path, listen: str, token: str) -> None:
        self.listen = listen
        self.process = Process(
            "mcpage proxy",
            [mcpage_binary(), "--config", str(config), "proxy"],
            config.with_suffix(".log"),
            env=clean_env({"MCPAGE_PROXY__INVALIDATE_TOKEN": token, "RUST_LOG": "mcpage=info"}),
        )
        self.process.wait_ready(f"the proxy on {listen}", self._healthy)

    def _healthy(self) -> bool:
        try:
            return request(self.listen, "GET", "/_mcpage/health")[0] == 200
        except OSError:
            return False

    def metrics(self) -> Dict[str, float]:
        status, _, body = request(self.listen, "GET", "/_mcpage/metrics")
        assert status == 200, body
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


class Nginx:
    """nginx running what ``mcpage nginx --full`` renders from the config."""

    def __init__(self, config: Path, directory: Path, listen: str) -> None:
        nginx = binary("nginx", INSTALL_SERVERS)
        prefix = directory / "nginx"
        prefix.mkdir()
        prefix.chmod(0o755)
        rendered = subprocess.run(
            [mcpage_binary(), "--config", str(config), "nginx", "--full", "--prefix-dir", str(prefix)],
            check=True,
            capture_output=True,
            env=clean_env({}),
        )
        conf = prefix / "nginx.conf"
        conf.write_bytes(rendered.stdout)
        self.listen = listen
        self.process = Process(
            "nginx",
            [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log"), "-g", "daemon off;"],
            prefix / "stderr.log",
        )
        self.error_log = prefix / "error.log"
        self.process.wait_ready(f"nginx on {listen}", lambda: connects(listen))


class Gunicorn:
    """gunicorn serving the test project (``blog``) on ``bind``."""

    def __init__(self, bind: str, directory: Path, env: Mapping[str, str]) -> None:
        self.bind = bind
        self.process = Process(
            "gunicorn",
            [
                sys.executable, "-m", "gunicorn",
                "--bind", bind,
                "--workers", "2",
                "--worker-class", "gthread", "--threads", "4",
                "--keep-alive", "2",
                "--access-logfile", "-",
                "blog.wsgi:application",
            ],
            directory / "gunicorn.log",
            env=env,
            cwd=Path(__file__).parent,
        )
        self.process.wait_ready(f"gunicorn on {bind}", lambda: connects(bind))


def request(
    address: str,
    method: str,
    path: str,
    headers: Optional[Mapping[str, str]] = None,
    body: Optional[bytes] = None,
) -> "tuple[int, http.client.HTTPMessage, bytes]":
    """One HTTP/1.1 request to ``host:port`` or ``unix:/path``; (status, headers, body)."""
    connection: http.client.HTTPConnection
    if address.startswith("unix:"):
        connection = UnixHTTPConnection(address[len("unix:") :], 30)
    else:
        connection = http.client.HTTPConnection(address, timeout=30)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def cookies_of(headers: "http.client.HTTPMessage") -> Dict[str, str]:
    """``name -> value`` of every ``Set-Cookie``."""
    jar = {}
    for value in headers.get_all("Set-Cookie") or []:
        name, _, rest = value.partition("=")
        jar[name.strip()] = rest.split(";", 1)[0]
    return jar


def cookie_header(jar: Mapping[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in jar.items())


def stop_all(processes: List[Process]) -> None:
    """Stop in reverse order of start."""
    for process in reversed(processes):
        process.stop()
