"""Invalidation: remove pages after the transaction that changed their data commits.

:func:`invalidate` registers the work with ``transaction.on_commit``; at commit
it is sent to the proxy (``POST /_mcpage/invalidate``) before the response
leaves, so the next request renders fresh pages. Nothing is dropped silently:

- the proxy unreachable, or answering 5xx/408/429 (memcached did not confirm):
  the work is kept, logged (``WARNING`` on logger ``mcpage``) and retried by a
  background thread with exponential backoff (``MCPAGE_RETRY_DELAY`` doubling
  up to ``MCPAGE_RETRY_MAX_DELAY``) until the proxy confirms; while some work
  waits, new work joins it instead of waiting on a dead proxy, and
  :func:`stats` shows it (``pending``);
- the proxy answering ``202 Accepted``: it took the work into its own pending
  queue; that counts as done (``queued_by_proxy``);
- the proxy refusing it (400, 401, 404: a bad URL, a wrong or missing token):
  retrying cannot help; logged as ``ERROR`` with the proxy's reason and counted
  (``rejected``);
- the process exiting with work still waiting: one last attempt, then an
  ``ERROR`` naming the ``manage.py mcpage invalidate`` command that does it.
"""

from __future__ import annotations

import atexit
import http.client
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, FrozenSet, Iterable, List, Optional

from django.db import transaction

from . import client, conf

log = logging.getLogger("mcpage")


class InvalidationError(Exception):
    """The proxy did not confirm an invalidation.

    ``retryable`` is false when retrying cannot help (the proxy refused the
    request: 4xx other than 408/429, or no token configured).
    """

    def __init__(self, message: str, *, retryable: bool, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True)
class Work:
    """Pages to remove: by tag, by URL (as users write it) and by key prefix."""

    tags: FrozenSet[str] = field(default_factory=frozenset)
    urls: FrozenSet[str] = field(default_factory=frozenset)
    prefixes: FrozenSet[str] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls,
        tags: Iterable[str] = (),
        urls: Iterable[str] = (),
        prefix: Optional[str] = None,
    ) -> "Work":
        """Checked: ``tags="comments"`` would be nine one-letter tags."""
        for name, values in (("tags", tags), ("urls", urls)):
            if isinstance(values, (str, bytes)):
                raise TypeError(f"{name} must be a list of strings, not the string {values!r}")
        tags = frozenset(str(t).strip() for t in tags if str(t).strip())
        urls = frozenset(str(u) for u in urls if str(u))
        if any("," in tag for tag in tags):
            raise ValueError("a tag cannot contain a comma (the header separates tags with commas)")
        prefixes = frozenset([prefix]) if prefix else frozenset()
        return cls(tags, urls, prefixes)

    def __bool__(self) -> bool:
        return bool(self.tags or self.urls or self.prefixes)

    def __len__(self) -> int:
        return len(self.tags) + len(self.urls) + len(self.prefixes)

    def merge(self, other: Optional["Work"]) -> "Work":
        if other is None:
            return self
        return Work(
            self.tags | other.tags, self.urls | other.urls, self.prefixes | other.prefixes
        )

    def bodies(self) -> List[Dict[str, Any]]:
        """The JSON bodies: the endpoint takes one prefix per request."""
        first: Dict[str, Any] = {"tags": sorted(self.tags), "urls": sorted(self.urls)}
        prefixes = sorted(self.prefixes)
        if prefixes:
            first["prefix"] = prefixes[0]
        return [first] + [{"prefix": prefix} for prefix in prefixes[1:]]

    def command(self) -> str:
        """The ``manage.py`` command line that does this work by hand."""
        args = [f"--tag {t!r}" for t in sorted(self.tags)]
        args += [f"--url {u!r}" for u in sorted(self.urls)]
        args += [f"--prefix {p!r}" for p in sorted(self.prefixes)]
        return "manage.py mcpage invalidate " + " ".join(args)

    def __str__(self) -> str:
        parts = []
        for name, values in (("tags", self.tags), ("urls", self.urls), ("prefix", self.prefixes)):
            if values:
                parts.append(f"{name} {', '.join(sorted(values))}")
        return "; ".join(parts)


def send(work: Work) -> Dict[str, Any]:
    """Send ``work`` now; the proxy's answer (``{"pages": n, ...}``, merged over
    the requests). Raises :class:`InvalidationError`."""
    settings = conf.get()
    if settings.token is None:
        raise InvalidationError(
            "no MCPAGE_INVALIDATE_TOKEN (or MCPAGE_PROXY__INVALIDATE_TOKEN) is set",
            retryable=False,
        )
    result: Dict[str, Any] = {"pages": 0}
    for body in work.bodies():
        try:
            reply = client.post(settings.proxy_url, settings.token, body, settings.timeout)
        except (OSError, http.client.HTTPException) as error:
            raise InvalidationError(
                f"proxy {settings.proxy_url} unreachable: {error}", retryable=True
            ) from error
        if reply.status == 200 and isinstance(reply.body, dict):
            result["pages"] += int(reply.body.get("pages", 0))
            for key in ("tags", "urls", "prefix"):
                if isinstance(reply.body.get(key), dict):
                    result.setdefault(key, {}).update(reply.body[key])
        elif reply.status == 202:
            result["queued_by_proxy"] = True
        else:
            retryable = reply.status >= 500 or reply.status in (408, 429)
            raise InvalidationError(
                f"proxy {settings.proxy_url} answered {reply.status}: {reply.error}",
                retryable=retryable,
                status=reply.status,
            )
    return result


class Queue:
    """Sends work, keeps what failed and retries it in a background thread."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._waiting: Optional[Work] = None  # failed, to send again
        self._sending: Optional[Work] = None  # taken by the thread, in flight
        self._wake = False
        self._thread: Optional[threading.Thread] = None
        self.sent = 0
        self.failures = 0
        self.retries = 0
        self.rejected = 0
        self.queued_by_proxy = 0

    def submit(self, work: Work) -> None:
        """Send now; on failure keep it for the background thread."""
        if not work:
            return
        with self._lock:
            if self._waiting is not None or self._sending is not None:
                # The proxy is failing: join the waiting work, do not stall this request.
                self._keep(work, "the proxy has not confirmed earlier work")
                return
        try:
            result = send(work)
        except InvalidationError as error:
            with self._lock:
                self.failures += 1
                if error.retryable:
                    self._keep(work, str(error))
                else:
                    self.rejected += 1
                    log.error("mcpage: invalidation of %s refused: %s", work, error)
            return
        with self._lock:
            self._done(result)
        log.debug("mcpage: invalidated %s: %s pages", work, result["pages"])

    def _keep(self, work: Work, reason: str) -> None:
        self._waiting = work.merge(self._waiting)
        log.warning(
            "mcpage: invalidation of %s not confirmed (%s): retrying in the background, %d pending",
            work,
            reason,
            self._pending(),
        )
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="mcpage-invalidate", daemon=True)
            self._thread.start()
        self._lock.notify_all()

    def _done(self, result: Dict[str, Any]) -> None:
        self.sent += 1
        if result.get("queued_by_proxy"):
            self.queued_by_proxy += 1

    def _pending(self) -> int:
        return len(self._waiting or Work()) + len(self._sending or Work())

    def _run(self) -> None:
        delay = conf.get().retry_delay
        while True:
            with self._lock:
                while self._waiting is None:
                    self._lock.wait()
                if not self._wake:
                    self._lock.wait_for(lambda: self._wake, timeout=delay)
                self._wake = False
                work, self._waiting, self._sending = self._waiting, None, self._waiting
                if work is None:
                    continue
                self.retries += 1
            try:
                result = send(work)
            except InvalidationError as error:
                with self._lock:
                    self._sending = None
                    self.failures += 1
                    if error.retryable:
                        self._waiting = work.merge(self._waiting)
                        settings = conf.get()
                        delay = min(max(delay, settings.retry_delay) * 2, settings.retry_max_delay)
                        log.warning(
                            "mcpage: invalidation still not confirmed (%s): %d pending, next try in %.1f s",
                            error,
                            self._pending(),
                            delay,
                        )
                    else:
                        self.rejected += 1
                        log.error("mcpage: invalidation of %s refused: %s", work, error)
                    self._lock.notify_all()
                continue
            with self._lock:
                self._sending = None
                self._done(result)
                delay = conf.get().retry_delay
                # Work that joined meanwhile goes now: the proxy answers again.
                self._wake = self._waiting is not None
                log.warning("mcpage: invalidation of %s confirmed after retrying", work)
                self._lock.notify_all()

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {
                "pending": self._pending(),
                "sent": self.sent,
                "failures": self.failures,
                "retries": self.retries,
                "rejected": self.rejected,
                "queued_by_proxy": self.queued_by_proxy,
            }

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Retry now and wait until nothing is pending (or ``timeout`` passed)."""
        with self._lock:
            self._wake = True
            self._lock.notify_all()
            return self._lock.wait_for(lambda: self._pending() == 0, timeout=timeout)

    def at_exit(self) -> None:
        with self._lock:
            if self._pending() == 0:
                return
        if self.flush(timeout=conf.get().timeout):
            return
        with self._lock:
            work = (self._waiting or Work()).merge(self._sending)
        log.error(
            "mcpage: process %d exits with invalidations the proxy never confirmed: %s; run: %s",
            os.getpid(),
            work,
            work.command(),
        )


QUEUE = Queue()
atexit.register(QUEUE.at_exit)


def invalidate(
    tags: Iterable[str] = (),
    urls: Iterable[str] = (),
    prefix: Optional[str] = None,
    *,
    using: Optional[str] = None,
) -> None:
    """Remove the pages tagged ``tags``, the pages at ``urls`` (``"/about/"``)
    and every page whose key starts with ``prefix``, once the current
    transaction on database ``using`` commits (at once outside a transaction;
    never, if it rolls back)."""
    work = Work.of(tags, urls, prefix)
    if work:
        transaction.on_commit(partial(QUEUE.submit, work), using=using)


def invalidate_now(
    tags: Iterable[str] = (),
    urls: Iterable[str] = (),
    prefix: Optional[str] = None,
) -> Dict[str, Any]:
    """Remove pages now, without a transaction or retries: the proxy's answer
    (``{"pages": 3, "tags": {...}, ...}``), or :class:`InvalidationError`."""
    return send(Work.of(tags, urls, prefix))


def stats() -> Dict[str, int]:
    """This process's counters: ``pending`` (tags, URLs and prefixes waiting
    for the proxy to confirm), ``sent``, ``failures``, ``retries``,
    ``rejected``, ``queued_by_proxy``."""
    return QUEUE.stats()


def flush(timeout: Optional[float] = None) -> bool:
    """Retry pending work now; true once nothing is pending."""
    return QUEUE.flush(timeout)
