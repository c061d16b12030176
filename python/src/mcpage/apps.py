"""``"mcpage"`` in ``INSTALLED_APPS``: system checks and the management command."""

from django.apps import AppConfig


class McpageConfig(AppConfig):
    name = "mcpage"
    verbose_name = "mcpage page cache"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
