"""mcpage for Django: tag pages for the nginx + memcached page cache, and
invalidate them once the data they show has committed.

    from mcpage import cache_tags, invalidate, invalidate_on_change

    @cache_tags("comments", "article:{pk}")
    def article(request, pk): ...

    invalidate_on_change(Comment, tags=["comments", "article:{article_id}"])

See https://github.com/mcpage/mcpage#use-it-from-django.
"""

from .invalidation import InvalidationError, flush, invalidate, invalidate_now, stats
from .signals import invalidate_on_change
from .tags import TagError, add_tags, cache_tags, tag_response

__all__ = [
    "InvalidationError",
    "TagError",
    "add_tags",
    "cache_tags",
    "flush",
    "invalidate",
    "invalidate_now",
    "invalidate_on_change",
    "stats",
    "tag_response",
]

__version__ = "0.1.0"
