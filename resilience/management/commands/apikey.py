"""``manage.py apikey create USERNAME``: print a new API key, only the key."""

from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from resilience.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for a user and print it once on stdout."

    def add_arguments(self, parser: ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="create a key for USERNAME")
        create.add_argument("username")
        create.add_argument("--name", default="", help="what the key is for")

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model()
        try:
            user = users.objects.get(username=options["username"])
        except users.DoesNotExist:
            raise CommandError(f"no user named {options['username']!r}") from None
        _, raw = ApiKey.issue(user, options["name"])
        self.stdout.write(raw)
