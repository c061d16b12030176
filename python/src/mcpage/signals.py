"""Invalidate on model changes, whatever the write path (views, admin, shell)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Type, Union

from django.db import models
from django.db.models.signals import post_delete, post_save

from .invalidation import invalidate

#: Tag or URL templates filled from the instance (``"article:{article_id}"``),
#: or a callable ``(instance) -> list of strings``.
Spec = Union[Sequence[str], Callable[[Any], Iterable[str]]]

EVENTS = {"save": post_save, "delete": post_delete}


class _Fields(Mapping[str, Any]):
    """The instance's attributes, for ``str.format_map``."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self.instance, name)
        except AttributeError:
            raise KeyError(name) from None

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def _fill(spec: Spec, instance: Any) -> list[str]:
    if callable(spec):
        values = spec(instance)
        return [values] if isinstance(values, str) else list(values)
    if isinstance(spec, str):
        raise TypeError(f"give a list of templates, not the string {spec!r}")
    fields = _Fields(instance)
    return [template.format_map(fields) for template in spec]


def invalidate_on_change(
    model: Type[models.Model],
    tags: Spec = (),
    urls: Spec = (),
    prefix: Optional[str] = None,
    *,
    on: Iterable[str] = ("save", "delete"),
) -> Callable[..., None]:
    """Invalidate ``tags``/``urls``/``prefix`` after every save and delete of
    ``model``, once the transaction commits::

        invalidate_on_change(Comment, tags=["comments", "article:{article_id}"])

    Templates are filled from the instance's attributes; a callable gets the
    instance. Call it once, e.g. in your ``AppConfig.ready()``. Returns the
    receiver (connected strongly, so it stays).

    Note that a save which moves an instance (``comment.article_id`` changed)
    fills the templates with the new values only: tag both, or invalidate
    the old one yourself.
    """
    events = [EVENTS[event] for event in on]

    def receiver(sender: Any, instance: Any, raw: bool = False, using: Any = None, **kwargs: Any) -> None:
        if raw:  # loaddata: no pages to worry about yet
            return
        invalidate(_fill(tags, instance), _fill(urls, instance), prefix, using=using)

    uid = f"mcpage:{model._meta.label}:{id(receiver)}"
    for signal in events:
        signal.connect(receiver, sender=model, weak=False, dispatch_uid=uid)
    return receiver
