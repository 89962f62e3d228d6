from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.forms import BaseModelFormSet
from django.http import HttpRequest

from llm.admin import ProviderAdmin
from llm.models import Provider

from .circuit_breaker import CircuitBreaker
from .errors import ResilienceError
from .models import (
    ApiKey,
    BreakerPolicy,
    PoolPolicy,
    QueuePolicy,
    RateLimitPolicy,
    RetryPolicy,
    check_buckets,
)


class BucketsFormSet(BaseModelFormSet):
    """The list page's edited rows, checked together.

    Each row's own check compares it with the saved rows only, so lowering
    the global bucket and raising a per-caller one in the same submit would
    pass both and save a conflict.
    """

    def add_fields(self, form: Any, index: int | None) -> None:
        super().add_fields(form, index)
        # Each row's own check would compare it with the saved rows only and
        # refuse two edits that agree with each other; clean() checks them
        # together instead.
        form.instance.checked_as_a_set = True

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        changed = {f.instance.pk: f.instance for f in self.forms if f.has_changed()}
        rows = [changed.get(row.pk, row) for row in RateLimitPolicy.objects.all()]
        for row in changed.values():
            try:
                check_buckets(rows, changed=row)
            except ValidationError as exc:
                raise ValidationError(f"{row.name}: {' '.join(exc.messages)}") from exc


@admin.register(RateLimitPolicy)
class RateLimitPolicyAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "scope",
        "capacity",
        "refill_per_second",
        "enabled",
        "on_redis_down",
    )
    list_editable = ("capacity", "refill_per_second", "enabled", "on_redis_down")
    list_filter = ("scope", "enabled")

    def get_changelist_formset(self, request: HttpRequest, **kwargs: Any) -> Any:
        kwargs["formset"] = BucketsFormSet
        return super().get_changelist_formset(request, **kwargs)


class SingletonAdmin(admin.ModelAdmin):
    """One row, created by a migration: it can be edited, not added or deleted."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not self.model.objects.exists()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


admin.site.register(PoolPolicy, SingletonAdmin)


@admin.register(QueuePolicy)
class QueuePolicyAdmin(SingletonAdmin):
    fieldsets = [
        (None, {"fields": ["enabled"]}),
        ("Who may wait", {"fields": ["max_depth", "per_user_max"]}),
        ("How long", {"fields": ["max_wait_seconds", "job_timeout_seconds"]}),
    ]


@admin.register(RetryPolicy)
class RetryPolicyAdmin(SingletonAdmin):
    fieldsets = [
        (None, {"fields": ["max_attempts"]}),
        ("Backoff", {"fields": ["base_delay_seconds", "max_delay_seconds"]}),
        ("Budget", {"fields": ["max_total_seconds"]}),
    ]


BREAKER_FIELDSETS: list[Any] = [
    ("When to open", {"fields": [
        "failure_threshold", "failure_rate_percent", "window_seconds",
        "minimum_calls",
    ]}),
    ("How to recover", {"fields": [
        "recovery_timeout_seconds", "half_open_probes", "probe_timeout_seconds",
    ]}),
]  # fmt: skip


class BreakerInline(admin.StackedInline):
    """The provider's breaker, edited on the provider's own page."""

    model = BreakerPolicy
    can_delete = False
    extra = 0
    max_num = 1
    fieldsets = BREAKER_FIELDSETS


admin.site.unregister(Provider)


@admin.register(Provider)
class ProviderWithBreakerAdmin(ProviderAdmin):
    inlines = [BreakerInline]

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        # A new provider gets its default breaker from a signal on save;
        # an inline form on the add page would try to create a second one.
        return [BreakerInline] if obj is not None else []


def _breaker(row: BreakerPolicy) -> CircuitBreaker:
    # The row's own policy: reading the state may move open to half-open,
    # which must happen at this provider's recovery time, not the default's.
    return CircuitBreaker(row.provider.name, row.as_policy())


def _apply(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: Any, op: str
) -> None:
    """Run ``op`` (force_open, force_closed, reset) on each selected breaker."""
    done = []
    for row in queryset.select_related("provider"):
        try:
            getattr(_breaker(row), op)()
        except ResilienceError as exc:
            modeladmin.message_user(request, str(exc), messages.ERROR)
            return
        done.append(row.provider.name)
    label = op.replace("_", " ")
    modeladmin.message_user(request, f"{label}: {', '.join(done)}", messages.SUCCESS)


@admin.register(BreakerPolicy)
class BreakerPolicyAdmin(admin.ModelAdmin):
    list_display = (
        "provider",
        "state",
        "failure_threshold",
        "failure_rate_percent",
        "window_seconds",
        "recovery_timeout_seconds",
        "half_open_probes",
    )
    actions = ["force_open", "force_closed", "reset"]
    fieldsets = [(None, {"fields": ["provider"]}), *BREAKER_FIELDSETS]

    @admin.display(description="state now")
    def state(self, row: BreakerPolicy) -> str:
        try:
            return _breaker(row).state().state
        except ResilienceError:
            return "unknown (Redis unreachable)"

    @admin.action(description="Force open: stop all traffic to the provider")
    def force_open(self, request: HttpRequest, queryset: Any) -> None:
        _apply(self, request, queryset, "force_open")

    @admin.action(description="Force closed: send traffic whatever fails")
    def force_closed(self, request: HttpRequest, queryset: Any) -> None:
        _apply(self, request, queryset, "force_closed")

    @admin.action(description="Reset: forget failures and close")
    def reset(self, request: HttpRequest, queryset: Any) -> None:
        _apply(self, request, queryset, "reset")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("prefix", "user__username", "name")
    readonly_fields = ("prefix", "created_at")
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A key is shown once, at creation: `manage.py apikey create USER`.
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: Any) -> None:
        from django.utils import timezone

        for key in queryset.filter(revoked_at__isnull=True):
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
