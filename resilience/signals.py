"""Announce policy changes to every process once the write has committed."""

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from llm.models import Provider

from .policies import bump_version


@receiver(post_save, sender=Provider)
@receiver(post_delete, sender=Provider)
def announce_policy_change(**kwargs: Any) -> None:
    transaction.on_commit(bump_version)
