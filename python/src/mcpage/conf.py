"""Settings: every ``MCPAGE_*`` name with its default, read from Django's settings.

=========================  =========================  ==========================================
setting                    default                    meaning
=========================  =========================  ==========================================
MCPAGE_PROXY_URL           ``http://127.0.0.1:8081``  the proxy (its ``proxy.listen``), or
                                                      ``unix:/path`` for its unix socket
MCPAGE_INVALIDATE_TOKEN    ``$MCPAGE_PROXY__INVA...`` the proxy's ``proxy.invalidate_token``
MCPAGE_TAG_HEADER          ``X-Cache-Tags``           the response header the proxy reads
MCPAGE_URLS                ``{}``                     ``{regex: tags}`` for views you cannot
                                                      decorate (``STATIC_GENERATOR_URLS``)
MCPAGE_EXCLUDE_URLS        ``()``                     regexes of paths never cached
MCPAGE_TIMEOUT             ``5.0``                    seconds per invalidation request
MCPAGE_RETRY_DELAY         ``1.0``                    first retry after a failure (seconds)
MCPAGE_RETRY_MAX_DELAY     ``60.0``                   the backoff doubles up to this
=========================  =========================  ==========================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence, Tuple, Union

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

#: What ``MCPAGE_URLS`` maps a regex to: tag templates (``"article:{pk}"``,
#: filled from the regex's named groups), or a callable ``(request, match) -> tags``.
TagSpec = Union[str, Sequence[str], Callable[..., Iterable[str]]]

DEFAULTS: Mapping[str, Any] = {
    "MCPAGE_PROXY_URL": "http://127.0.0.1:8081",
    "MCPAGE_INVALIDATE_TOKEN": None,
    "MCPAGE_TAG_HEADER": "X-Cache-Tags",
    "MCPAGE_URLS": {},
    "MCPAGE_EXCLUDE_URLS": (),
    "MCPAGE_TIMEOUT": 5.0,
    "MCPAGE_RETRY_DELAY": 1.0,
    "MCPAGE_RETRY_MAX_DELAY": 60.0,
}

#: The environment variable the proxy reads its token from; used when
#: ``MCPAGE_INVALIDATE_TOKEN`` is not set, so one variable configures both.
TOKEN_ENV = "MCPAGE_PROXY__INVALIDATE_TOKEN"


class ImproperlyConfigured(ValueError):
    """A ``MCPAGE_*`` setting has a value mcpage cannot use (the checks name it)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


@dataclass(frozen=True)
class UrlRule:
    """One ``MCPAGE_URLS`` entry, compiled."""

    pattern: re.Pattern[str]
    tags: TagSpec


@dataclass(frozen=True)
class Settings:
    """The ``MCPAGE_*`` settings, checked and compiled (see :func:`get`)."""

    proxy_url: str
    token: str | None
    tag_header: str
    urls: Tuple[UrlRule, ...]
    exclude_urls: Tuple[re.Pattern[str], ...]
    timeout: float
    retry_delay: float
    retry_max_delay: float


def raw(name: str) -> Any:
    """A setting as written, or its default."""
    return getattr(django_settings, name, DEFAULTS[name])


def get() -> Settings:
    """The current settings; raises :class:`ImproperlyConfigured` on a bad value.

    Compiled once and recompiled when a setting changes (``override_settings``).
    """
    return _compiled()


@lru_cache(maxsize=1)
def _compiled() -> Settings:
    token = raw("MCPAGE_INVALIDATE_TOKEN")
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is not None and not (
        isinstance(token, str) and token and all(0x21 <= ord(c) <= 0x7E for c in token)
    ):
        raise ImproperlyConfigured(
            "MCPAGE_INVALIDATE_TOKEN", "must be a string of visible ASCII characters"
        )
    return Settings(
        proxy_url=_proxy_url(raw("MCPAGE_PROXY_URL")),
        token=token,
        tag_header=_header(raw("MCPAGE_TAG_HEADER")),
        urls=_url_rules(raw("MCPAGE_URLS")),
        exclude_urls=tuple(
            _regex("MCPAGE_EXCLUDE_URLS", p) for p in _patterns(raw("MCPAGE_EXCLUDE_URLS"))
        ),
        timeout=_seconds("MCPAGE_TIMEOUT"),
        retry_delay=_seconds("MCPAGE_RETRY_DELAY"),
        retry_max_delay=_seconds("MCPAGE_RETRY_MAX_DELAY"),
    )


@receiver(setting_changed)
def _reset(setting: str, **kwargs: Any) -> None:
    if setting.startswith("MCPAGE_"):
        _compiled.cache_clear()


def _proxy_url(value: Any) -> str:
    name = "MCPAGE_PROXY_URL"
    if not isinstance(value, str):
        raise ImproperlyConfigured(name, "must be a string such as http://127.0.0.1:8081")
    if value.startswith("unix:"):
        if not value[len("unix:") :].startswith("/"):
            raise ImproperlyConfigured(name, f"{value!r}: the socket path must be absolute")
        return value
    match = re.fullmatch(r"http://([^/:@\s]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?/?", value)
    if match is None:
        raise ImproperlyConfigured(
            name, f"{value!r} is not http://host:port or unix:/path (the proxy's listen address)"
        )
    return value.rstrip("/")


def _header(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
        raise ImproperlyConfigured("MCPAGE_TAG_HEADER", f"{value!r} is not a header name")
    return value


def _seconds(name: str) -> float:
    value = raw(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ImproperlyConfigured(name, f"{value!r}: must be a positive number of seconds")
    return float(value)


def _patterns(value: Any) -> Sequence[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ImproperlyConfigured("MCPAGE_EXCLUDE_URLS", "must be a list of regexes")
    return value


def _regex(name: str, pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ImproperlyConfigured(name, f"{pattern!r} is not a regex string")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ImproperlyConfigured(name, f"{pattern!r}: {error}") from None


def _url_rules(value: Any) -> Tuple[UrlRule, ...]:
    name = "MCPAGE_URLS"
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in value
    ):
        pairs = [tuple(pair) for pair in value]
    else:
        raise ImproperlyConfigured(name, "must map regexes to tags: {r'^/blog/': ['entries']}")
    rules = []
    for pattern, tags in pairs:
        regex = _regex(name, pattern)
        if not (
            callable(tags)
            or isinstance(tags, str)
            or (isinstance(tags, (list, tuple)) and all(isinstance(t, str) for t in tags))
        ):
            raise ImproperlyConfigured(
                name, f"{pattern!r}: tags must be a string, a list of strings or a callable"
            )
        rules.append(UrlRule(regex, tags))
    return tuple(rules)
