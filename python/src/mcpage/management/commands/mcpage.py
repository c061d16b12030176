"""``manage.py mcpage invalidate --tag T --url U --prefix P``: remove pages now."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from mcpage.invalidation import InvalidationError, Work, send


class Command(BaseCommand):
    help = "Remove cached pages through the mcpage proxy."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="action", required=True)
        invalidate = commands.add_parser(
            "invalidate",
            help="Remove pages by tag, URL or key prefix (each repeatable).",
        )
        invalidate.add_argument("--tag", action="append", default=[], help="a tag, e.g. comments")
        invalidate.add_argument("--url", action="append", default=[], help="a URL path, e.g. /about/")
        invalidate.add_argument(
            "--prefix", action="append", default=[], help='a key prefix; "/" removes every page'
        )
        invalidate.add_argument("--json", action="store_true", help="print the proxy's answer as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] != "invalidate":  # pragma: no cover (argparse refuses others)
            raise CommandError(f"unknown action {options['action']!r}")
        work = Work.of(options["tag"], options["url"])
        for prefix in options["prefix"]:
            if not prefix:
                raise CommandError("--prefix must not be empty (\"/\" removes every page)")
            work = work.merge(Work.of(prefix=prefix))
        if not work:
            raise CommandError("nothing to invalidate: give --tag, --url or --prefix")
        try:
            result = send(work)
        except InvalidationError as error:
            raise CommandError(f"not confirmed: {error}") from error
        if options["json"]:
            self.stdout.write(json.dumps(result, sort_keys=True))
        elif result.get("queued_by_proxy"):
            self.stdout.write(f"queued by the proxy: {work}")
        else:
            self.stdout.write(f"removed {result['pages']} pages ({work})")
