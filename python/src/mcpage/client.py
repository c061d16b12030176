"""One ``POST /_mcpage/invalidate`` to the proxy, over TCP or its unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any, Mapping

#: The proxy's endpoint (README, "The admin endpoints").
PATH = "/_mcpage/invalidate"


@dataclass(frozen=True)
class Reply:
    """What the proxy answered."""

    status: int
    body: Any

    @property
    def error(self) -> str:
        """The proxy's ``error`` field, or the body."""
        if isinstance(self.body, Mapping) and isinstance(self.body.get("error"), str):
            return str(self.body["error"])
        return str(self.body)


def connect(proxy_url: str, timeout: float) -> socket.socket:
    """A connection to ``http://host:port`` or ``unix:/path``."""
    if proxy_url.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(proxy_url[len("unix:") :])
        except OSError:
            sock.close()
            raise
        return sock
    host, _, port = proxy_url[len("http://") :].rstrip("/").rpartition(":")
    if not host:
        host, port = port, "80"
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def post(proxy_url: str, token: str, body: Mapping[str, Any], timeout: float) -> Reply:
    """Send ``body`` to the proxy; raises ``OSError`` (or an ``http.client``
    error) when it could not be asked or did not answer.

    The request goes out in one write: the proxy may answer (401, say) as soon
    as it has read the head, and a body sent after that would meet a closed
    connection instead of the answer.
    """
    data = json.dumps(body).encode()
    host = "localhost" if proxy_url.startswith("unix:") else proxy_url[len("http://") :].rstrip("/")
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    sock = connect(proxy_url, timeout)
    try:
        sock.sendall(head + data)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        payload = response.read()
        try:
            parsed: Any = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode("utf-8", errors="replace")
        return Reply(response.status, parsed)
    finally:
        sock.close()
