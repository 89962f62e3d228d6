"""Announce policy changes to every process once the write has committed."""

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save

from llm.models import Provider

from .models import (
    ApiKey,
    BreakerPolicy,
    PoolPolicy,
    QueuePolicy,
    RateLimitPolicy,
    RetryPolicy,
)
from .policies import bump_version

WATCHED = (
    Provider,
    RateLimitPolicy,
    PoolPolicy,
    QueuePolicy,
    RetryPolicy,
    BreakerPolicy,
    ApiKey,
)


def announce_policy_change(**kwargs: Any) -> None:
    transaction.on_commit(bump_version)


def give_provider_a_breaker(instance: Provider, created: bool, **kwargs: Any) -> None:
    if created and not kwargs.get("raw"):
        BreakerPolicy.objects.get_or_create(provider=instance)


for model in WATCHED:
    post_save.connect(announce_policy_change, sender=model, dispatch_uid=f"p-{model}")
    post_delete.connect(announce_policy_change, sender=model, dispatch_uid=f"d-{model}")
post_save.connect(give_provider_a_breaker, sender=Provider, dispatch_uid="breaker")
