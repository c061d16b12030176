"""System checks (``manage.py check``): ``mcpage.E00x`` errors, ``mcpage.W00x`` warnings."""

from __future__ import annotations

from typing import Any, List

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from . import conf

MIDDLEWARE = "mcpage.middleware.CacheTagsMiddleware"
SESSION_MIDDLEWARE = "django.contrib.sessions.middleware.SessionMiddleware"


@register("mcpage")
def check_settings(app_configs: Any = None, **kwargs: Any) -> List[CheckMessage]:
    messages: List[CheckMessage] = []
    try:
        config = conf.get()
    except conf.ImproperlyConfigured as error:
        return [
            Error(
                f"{error.setting} is invalid: {error.message}",
                hint=f"See mcpage.conf for what {error.setting} takes.",
                id="mcpage.E001",
            )
        ]
    if config.token is None:
        messages.append(
            Warning(
                "No invalidation token: mcpage.invalidate() cannot remove pages.",
                hint=(
                    "Set MCPAGE_INVALIDATE_TOKEN (or the environment variable "
                    f"{conf.TOKEN_ENV}, which the proxy reads too) to the proxy's "
                    "proxy.invalidate_token."
                ),
                id="mcpage.W001",
            )
        )
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE not in middleware:
        messages.append(
            Warning(
                f"{MIDDLEWARE} is not in MIDDLEWARE: pages that touch the session "
                "(Vary: Cookie) are never cached, MCPAGE_URLS and MCPAGE_EXCLUDE_URLS do nothing.",
                hint=f"Put {MIDDLEWARE!r} first in MIDDLEWARE.",
                id="mcpage.W002",
            )
        )
    elif SESSION_MIDDLEWARE in middleware and middleware.index(SESSION_MIDDLEWARE) < middleware.index(
        MIDDLEWARE
    ):
        messages.append(
            Warning(
                f"{MIDDLEWARE} comes after SessionMiddleware: it cannot remove the "
                "Vary: Cookie that SessionMiddleware adds, so those pages are never cached.",
                hint=f"Put {MIDDLEWARE!r} first in MIDDLEWARE.",
                id="mcpage.W003",
            )
        )
    if "django.middleware.gzip.GZipMiddleware" in middleware:
        messages.append(
            Warning(
                "GZipMiddleware is on: the proxy does not cache compressed responses.",
                hint="Remove it; let nginx compress (gzip on;) or set cache.gzip = true in mcpage.toml.",
                id="mcpage.W004",
            )
        )
    if "django.middleware.locale.LocaleMiddleware" in middleware:
        messages.append(
            Warning(
                "LocaleMiddleware adds Vary: Accept-Language, which keeps pages out of the cache.",
                hint="Put the language in the URL (i18n_patterns) and keep nginx's key per URL.",
                id="mcpage.W005",
            )
        )
    cookie = getattr(settings, "SESSION_COOKIE_NAME", "sessionid")
    if cookie != "sessionid":
        messages.append(
            Warning(
                f"SESSION_COOKIE_NAME is {cookie!r}: the proxy and nginx only know "
                "signed-in visitors by the cookies in cache.session_cookies.",
                hint=f'Set cache.session_cookies = ["{cookie}"] in mcpage.toml.',
                id="mcpage.W006",
            )
        )
    return messages
