"""``manage.py policies export`` / ``manage.py policies import FILE|-``."""

import json
import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from resilience.policy_io import PolicyImportError, export_policies, import_policies


class Command(BaseCommand):
    help = (
        "Export every policy as JSON, or import a policy file atomically: each "
        "section present replaces that section, absent sections are kept."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        actions.add_parser("export", help="print every policy as JSON")
        importer = actions.add_parser("import", help="validate and apply a file")
        importer.add_argument("file", help="a JSON file, or - for standard input")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "export":
            self.stdout.write(json.dumps(export_policies(), indent=2, sort_keys=True))
            return
        data = self._read(options["file"])
        try:
            sections = import_policies(data)
        except PolicyImportError as exc:
            raise CommandError(f"nothing imported: {exc}") from exc
        self.stdout.write(f"imported: {', '.join(sections) or 'nothing'}")

    def _read(self, path: str) -> Any:
        try:
            if path == "-":
                return json.load(sys.stdin)
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise CommandError(f"nothing imported: {path} is not JSON: {exc}") from exc
