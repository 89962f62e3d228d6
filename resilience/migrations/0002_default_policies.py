"""Sensible defaults so a new install is protected from its first request."""

from django.db import migrations

RATE_LIMITS = [
    # name, scope, capacity, refill per second
    ("global", "global", 200, 50.0),
    ("per-ip", "ip", 30, 1.0),
    ("per-user", "user", 60, 2.0),
]


def create_defaults(apps, schema_editor):  # type: ignore[no-untyped-def]
    RateLimitPolicy = apps.get_model("resilience", "RateLimitPolicy")
    for name, scope, capacity, rate in RATE_LIMITS:
        RateLimitPolicy.objects.get_or_create(
            name=name,
            defaults={"scope": scope, "capacity": capacity, "refill_per_second": rate},
        )
    for model in ("PoolPolicy", "QueuePolicy", "RetryPolicy"):
        apps.get_model("resilience", model).objects.get_or_create(pk=1)
    BreakerPolicy = apps.get_model("resilience", "BreakerPolicy")
    for provider in apps.get_model("llm", "Provider").objects.all():
        BreakerPolicy.objects.get_or_create(provider=provider)


def remove_defaults(apps, schema_editor):  # type: ignore[no-untyped-def]
    names = [name for name, *_ in RATE_LIMITS]
    apps.get_model("resilience", "RateLimitPolicy").objects.filter(
        name__in=names
    ).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("resilience", "0001_initial"),
        ("llm", "0002_simulated_provider"),
    ]
    operations = [migrations.RunPython(create_defaults, remove_defaults)]
