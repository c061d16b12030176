"""``mcpage.middleware.CacheTagsMiddleware``: put it **first** in ``MIDDLEWARE``.

On the way out it

1. tags pages of views you cannot decorate by URL (``MCPAGE_URLS``, the
   successor of StaticGenerator's ``STATIC_GENERATOR_URLS``);
2. untags pages matching ``MCPAGE_EXCLUDE_URLS``;
3. untags every page rendered for a signed-in user or a request that carries
   the session cookie: such a page is never stored, even if the proxy's
   ``cache.session_cookies`` missed your cookie name;
4. drops ``Vary: Cookie`` from the tagged pages that are left. Django's
   ``SessionMiddleware`` adds it as soon as a template touches ``request.user``,
   even for a visitor without a session; the proxy does not cache a page that
   varies, and nginx never serves a cached page to a request with the session
   cookie, so for these pages the header says nothing.
"""

from __future__ import annotations

import logging
from typing import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import cc_delim_re

from . import conf
from .tags import TagError, add_tags, expand

log = logging.getLogger("mcpage")


class CacheTagsMiddleware:
    """See the module documentation."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        config = conf.get()
        header = config.tag_header
        path = request.path
        if header not in response.headers:
            for rule in config.urls:
                match = rule.pattern.search(path)
                if match is None:
                    continue
                try:
                    tags = expand(rule.tags, match.groupdict(), request, match)
                except (KeyError, IndexError, AttributeError, TagError) as error:
                    log.error("mcpage: %s: cannot fill a tag (%r): page not cached", path, error)
                    return response
                add_tags(response, tags)
                break
        if header not in response.headers:
            return response
        if any(pattern.search(path) for pattern in config.exclude_urls) or signed_in(request):
            del response.headers[header]
            return response
        drop_vary_cookie(response)
        return response


def signed_in(request: HttpRequest) -> bool:
    """Does the request carry the session cookie, or belong to a signed-in user?"""
    if settings.SESSION_COOKIE_NAME in request.COOKIES:
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated)


def drop_vary_cookie(response: HttpResponseBase) -> None:
    """Remove ``Cookie`` from the response's ``Vary`` header (and the header if empty)."""
    if "Vary" not in response.headers:
        return
    kept = [v for v in cc_delim_re.split(response.headers["Vary"]) if v and v.lower() != "cookie"]
    if kept:
        response.headers["Vary"] = ", ".join(kept)
    else:
        del response.headers["Vary"]
