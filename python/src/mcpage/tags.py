"""Tagging pages: the ``X-Cache-Tags`` header the proxy reads (and removes).

A page is cached only when it carries the header; invalidating any of its tags
removes it. The proxy's rules: comma-separated, at most 128 tags of at most
1024 bytes each. A tag that breaks them leaves the page untagged (served, not
cached) and is logged, so a bad URL argument never breaks a page.
"""

from __future__ import annotations

import logging
from functools import wraps
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union, cast

from django.http import HttpRequest, HttpResponseBase

from . import conf

log = logging.getLogger("mcpage")

#: The proxy's limits (README, "The header contract").
MAX_TAGS = 128
MAX_TAG_BYTES = 1024

#: A tag template (``"article:{pk}"``) or a callable returning tags.
Tag = Union[str, Callable[..., Iterable[str]]]

View = TypeVar("View", bound=Callable[..., HttpResponseBase])


class TagError(ValueError):
    """A tag the proxy would split or refuse (a comma, too long, too many)."""


def cache_tags(*tags: Tag) -> Callable[[View], View]:
    """Cache the view's page under ``tags``.

    Each tag is a string, formatted with the URL's keyword arguments
    (``"article:{pk}"``), or a callable ``(request, *args, **kwargs)`` that
    returns tags. The page is cached only for anonymous visitors and only when
    the proxy's other rules allow (status 200, no ``Set-Cookie``, ...)::

        @cache_tags("comments", "article:{pk}")
        def article(request, pk): ...

    A class-based view: ``cache_tags("about")(AboutView.as_view())``.
    """

    def decorator(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            response = view(request, *args, **kwargs)
            try:
                values = [
                    value
                    for tag in tags
                    for value in expand(tag, kwargs, request, *args, **kwargs)
                ]
            except (KeyError, IndexError, AttributeError) as error:
                log.error("mcpage: %s: cannot fill a tag (%r): page not cached", request.path, error)
                return response
            add_tags(response, values)
            return response

        return cast(View, wrapper)

    return decorator


def expand(
    spec: Union[Tag, Sequence[str]], fields: Mapping[str, Any], *args: Any, **kwargs: Any
) -> list[str]:
    """The tags ``spec`` stands for: templates filled from ``fields`` (one, or
    a list), or what a callable returns when called with ``args`` and ``kwargs``."""
    if callable(spec):
        result = spec(*args, **kwargs)
        return [result] if isinstance(result, str) else [str(tag) for tag in result]
    if isinstance(spec, str):
        return [spec.format_map(fields)]
    return [template.format_map(fields) for template in spec]


def add_tags(response: HttpResponseBase, tags: Iterable[str]) -> None:
    """Add ``tags`` to the response's tag header (kept, if it has one).

    A tag the proxy cannot carry removes the header (the page is not cached)
    and logs why.
    """
    header = conf.get().tag_header
    current = parse(response.headers[header]) if header in response.headers else []
    try:
        merged = join(current + [str(tag) for tag in tags])
    except TagError as error:
        log.error("mcpage: %s: page not cached", error)
        if header in response.headers:
            del response.headers[header]
        return
    # WSGI headers are latin-1 text: carry the tags' UTF-8 bytes through it,
    # as the proxy reads them.
    response.headers[header] = merged.encode().decode("latin-1")


def tag_response(response: HttpResponseBase, *tags: str) -> HttpResponseBase:
    """Tag a response you built yourself; returns it."""
    add_tags(response, tags)
    return response


def parse(value: str) -> list[str]:
    """Tags in a header value (UTF-8 bytes as latin-1 text), as the proxy reads them."""
    text = value.encode("latin-1", errors="replace").decode("utf-8", errors="replace")
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def join(tags: Iterable[str]) -> str:
    """The header value for ``tags`` (duplicates dropped, order kept);
    :class:`TagError` when the proxy would not read them back as given."""
    unique: list[str] = []
    for tag in tags:
        tag = tag.strip()
        if "," in tag:
            raise TagError(f"tag {tag!r} contains a comma")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in tag):
            raise TagError(f"tag {tag!r} contains a control character")
        if len(tag.encode()) > MAX_TAG_BYTES:
            raise TagError(f"tag {tag[:40]!r}... is longer than {MAX_TAG_BYTES} bytes")
        if tag and tag not in unique:
            unique.append(tag)
    if len(unique) > MAX_TAGS:
        raise TagError(f"{len(unique)} tags, more than the proxy's {MAX_TAGS}")
    return ", ".join(unique)
