"""Create the demo staff user once and print its credentials once."""

import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the demo staff user (DEMO_USERNAME, default 'demo') with "
        "DEMO_PASSWORD or a generated password, printed once at creation."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        username = os.environ.get("DEMO_USERNAME") or "demo"
        password = os.environ.get("DEMO_PASSWORD") or ""
        users = get_user_model()
        user = users.objects.filter(username=username).first()
        if user is not None:
            if password:
                user.set_password(password)
                user.save(update_fields=["password"])
                self.stdout.write(f"demo user {username}: password from DEMO_PASSWORD")
            else:
                self.stdout.write(f"demo user {username} exists; password unchanged")
            return
        generated = not password
        password = password or secrets.token_urlsafe(12)
        users.objects.create_superuser(username=username, password=password, email="")
        self.stdout.write(f"created demo staff user: {username}")
        if generated:
            self.stdout.write(f"password (shown once): {password}")
