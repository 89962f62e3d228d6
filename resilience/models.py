"""Admin-editable policies of the resilience layers, and API keys.

Every model validates itself in ``clean`` so the admin and ``policies
import`` refuse the same mistakes with the same words. The stream path never
reads these tables directly: it reads ``resilience.policies.policy_cache``.
"""

import hashlib
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from llm.models import Provider

if TYPE_CHECKING:
    from .circuit_breaker import BreakerPolicy as CircuitPolicy

SCOPES = [
    ("global", "global: every request"),
    ("ip", "ip: every request, by client IP"),
    ("user", "user: requests with a user (session or API key owner)"),
    ("api_key", "api_key: requests with an API key"),
]
ON_REDIS_DOWN = [
    ("fail_open", "fail open: a per-instance bucket at the same rate"),
    ("fail_closed", "fail closed: answer 503 rate_limiter_unavailable"),
]


PER_CALLER_SCOPES = ("ip", "user", "api_key")


def positive(field: str, value: float | None) -> None:
    # None: the field itself is invalid, and the form already says so.
    if value is not None and value <= 0:
        raise ValidationError({field: "must be greater than zero"})


def _above(value: float | None, bound: float | None) -> bool:
    """Compare two fields; a blank one is the form's error, not this rule's."""
    return value is not None and bound is not None and value > bound


def bucket_conflict(
    limits: "list[RateLimitPolicy]",
) -> "tuple[RateLimitPolicy, RateLimitPolicy, str] | None":
    """Return a per-caller bucket larger than an enabled global one, if any.

    A caller's bucket above the global one can never be used up (the global
    bucket runs dry first), so it is a mistake, not a looser limit. Returns
    ``(per_caller, global_bucket, field)``.
    """
    for limit, bound, field in _bucket_conflicts(limits):
        return limit, bound, field
    return None


def _bucket_conflicts(
    limits: "list[RateLimitPolicy]",
) -> "Iterator[tuple[RateLimitPolicy, RateLimitPolicy, str]]":
    enabled = [limit for limit in limits if limit.enabled]
    fleet = [limit for limit in enabled if limit.scope == "global"]
    for limit in enabled:
        if limit.scope not in PER_CALLER_SCOPES:
            continue
        for bound in fleet:
            for field in ("capacity", "refill_per_second"):
                mine, theirs = getattr(limit, field), getattr(bound, field)
                if mine is not None and theirs is not None and mine > theirs:
                    yield limit, bound, field


def check_buckets(limits: "list[RateLimitPolicy]", changed: "RateLimitPolicy") -> None:
    """Refuse ``changed`` if it makes a per-caller bucket exceed a global one."""
    # Only conflicts that involve the changed row: one between two other
    # rows is not this edit's doing and must not hide this edit's own.
    mine = [c for c in _bucket_conflicts(limits) if changed in c[:2]]
    if not mine:
        return
    caller, bound, field = mine[0]
    if changed is caller:
        message = (
            f"cannot be above the global bucket {bound.name!r} "
            f"({getattr(bound, field)}): one caller could never use it"
        )
    elif changed is bound:
        message = (
            f"cannot be below the per-caller bucket {caller.name!r} "
            f"({getattr(caller, field)}): lower that one first"
        )
    else:
        return
    raise ValidationError({field: message})


def check_retry_fits_job(retry: "RetryPolicy", queue: "QueuePolicy") -> str | None:
    """Return which field breaks "retries fit in one queue job", if one does.

    A worker retries inside its job: a retry budget as long as the job timeout
    would let RQ kill the job in the middle of a backoff.
    """
    total, limit = retry.max_total_seconds, queue.job_timeout_seconds
    if total is None or limit is None or total < limit:
        return None
    return (
        f"the retry budget ({retry.max_total_seconds}s) must be below the "
        f"queue's job timeout ({queue.job_timeout_seconds}s)"
    )


class SingletonPolicy(models.Model):
    """A policy with exactly one row (pk 1), created by a data migration."""

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.pk = 1
        super().save(*args, **kwargs)

    @classmethod
    def current(cls) -> Any:
        """Return the row, creating it with the defaults if missing."""
        obj, _ = cls._default_manager.get_or_create(pk=1)
        return obj


class RateLimitPolicy(models.Model):
    """A token bucket applied to every request of its scope."""

    name = models.SlugField(
        max_length=64, unique=True, help_text="Names the bucket in headers and logs."
    )
    scope = models.CharField(
        max_length=16,
        choices=SCOPES,
        help_text="Which requests share a bucket: one for all (global), one per "
        "client IP, per user, or per API key.",
    )
    capacity = models.PositiveIntegerField(
        validators=[MinValueValidator(1)],
        help_text="Burst: how many requests a full bucket admits at once. "
        "This is RateLimit-Limit.",
    )
    refill_per_second = models.FloatField(
        help_text="Sustained rate: tokens added per second (0.5 = one request "
        "every two seconds).",
    )
    enabled = models.BooleanField(
        default=True, help_text="Disabled buckets admit everything."
    )
    on_redis_down = models.CharField(
        max_length=16,
        choices=ON_REDIS_DOWN,
        default="fail_open",
        help_text="When Redis is unreachable: keep admitting at this rate per "
        "instance (fail open), or refuse with 503 (fail closed).",
    )

    class Meta:
        ordering = ["name"]
        verbose_name = "rate limit"

    def __str__(self) -> str:
        return (
            f"{self.name} ({self.scope}: {self.capacity} @ {self.refill_per_second}/s)"
        )

    def clean_own(self) -> None:
        """Check this row alone (``policies import`` checks the rest as a set)."""
        positive("refill_per_second", self.refill_per_second)

    # Set by the admin's list page, which checks its edited rows as a set.
    checked_as_a_set = False

    def clean(self) -> None:
        self.clean_own()
        if self.checked_as_a_set:
            return
        others = list(RateLimitPolicy.objects.exclude(pk=self.pk))
        check_buckets([*others, self], changed=self)


class PoolPolicy(SingletonPolicy):
    """Concurrent direct streams: across the fleet and per caller."""

    global_max = models.PositiveIntegerField(
        default=50,
        validators=[MinValueValidator(1)],
        help_text="Most direct streams open at once across every API instance. "
        "Requests beyond it go to the queue.",
    )
    per_user_max = models.PositiveIntegerField(
        default=4,
        validators=[MinValueValidator(1)],
        help_text="Most direct streams one caller (user, or IP when anonymous) "
        "holds at once. Not above the global maximum.",
    )
    lease_ttl_seconds = models.FloatField(
        default=30,
        help_text="A stream's slot expires this long after its last renewal, so "
        "a crashed instance frees its slots within it. Renewed every third of it.",
    )

    class Meta:
        verbose_name = "connection pool"
        verbose_name_plural = "connection pool"

    def __str__(self) -> str:
        return f"pool: {self.global_max} global, {self.per_user_max} per caller"

    def clean(self) -> None:
        if self.lease_ttl_seconds is not None and self.lease_ttl_seconds < 1:
            raise ValidationError({"lease_ttl_seconds": "must be at least 1 second"})
        if _above(self.per_user_max, self.global_max):
            raise ValidationError(
                {"per_user_max": "cannot be above the global maximum"}
            )


class QueuePolicy(SingletonPolicy):
    """Overflow queue: what happens when the pool is full."""

    enabled = models.BooleanField(
        default=True,
        help_text="Queue requests when the pool is full. Off: a full pool answers "
        "503 pool_full.",
    )
    max_depth = models.PositiveIntegerField(
        default=200,
        validators=[MinValueValidator(1)],
        help_text="Most requests waiting at once; beyond it 503 queue_full.",
    )
    per_user_max = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1)],
        help_text="Most requests one caller may have waiting. Not above the depth.",
    )
    max_wait_seconds = models.FloatField(
        default=120,
        help_text="A request waiting longer ends with error queue_timeout and "
        "its job is removed.",
    )
    job_timeout_seconds = models.FloatField(
        default=600,
        help_text="Longest a worker may spend on one answer (RQ job timeout).",
    )

    class Meta:
        verbose_name = "overflow queue"
        verbose_name_plural = "overflow queue"

    def __str__(self) -> str:
        return f"queue: depth {self.max_depth}, {self.per_user_max} per caller"

    def clean_own(self) -> None:
        """Check this row alone (``policies import`` checks the rest as a set)."""
        positive("max_wait_seconds", self.max_wait_seconds)
        positive("job_timeout_seconds", self.job_timeout_seconds)
        if _above(self.per_user_max, self.max_depth):
            raise ValidationError({"per_user_max": "cannot be above max_depth"})

    def clean(self) -> None:
        self.clean_own()
        problem = check_retry_fits_job(RetryPolicy.current(), self)
        if problem:
            raise ValidationError({"job_timeout_seconds": problem})


class RetryPolicy(SingletonPolicy):
    """Retries of a provider call before the first token reached the client."""

    max_attempts = models.PositiveIntegerField(
        default=3,
        validators=[MinValueValidator(1), MaxValueValidator(10)],
        help_text="Attempts per provider, counting the first call (1 = no retry).",
    )
    base_delay_seconds = models.FloatField(
        default=0.5,
        help_text="Backoff before the second attempt; doubles each time, with "
        "full jitter.",
    )
    max_delay_seconds = models.FloatField(
        default=8, help_text="Longest single backoff."
    )
    max_total_seconds = models.FloatField(
        default=20,
        help_text="Retry budget: a provider asking to wait longer is not waited "
        "on; the request moves to the next provider or fails.",
    )

    class Meta:
        verbose_name = "retry policy"
        verbose_name_plural = "retry policy"

    def __str__(self) -> str:
        return f"retry: {self.max_attempts} attempts within {self.max_total_seconds}s"

    def clean_own(self) -> None:
        """Check this row alone (``policies import`` checks the rest as a set)."""
        positive("base_delay_seconds", self.base_delay_seconds)
        positive("max_total_seconds", self.max_total_seconds)
        if _above(self.base_delay_seconds, self.max_delay_seconds):
            raise ValidationError(
                {"max_delay_seconds": "cannot be below base_delay_seconds"}
            )

    def clean(self) -> None:
        self.clean_own()
        problem = check_retry_fits_job(self, QueuePolicy.current())
        if problem:
            raise ValidationError({"max_total_seconds": problem})


class BreakerPolicy(models.Model):
    """The circuit breaker settings of one provider."""

    provider = models.OneToOneField(
        Provider,
        on_delete=models.CASCADE,
        related_name="breaker",
        help_text="The provider this breaker guards; every instance and worker "
        "shares its state through Redis.",
    )
    failure_threshold = models.PositiveIntegerField(
        default=5,
        help_text="Open after this many consecutive failures (0: off).",
    )
    failure_rate_percent = models.FloatField(
        default=50,
        validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Open when at least this share of the calls in the window "
        "failed (0: off).",
    )
    window_seconds = models.FloatField(
        default=30, help_text="The window the failure rate is measured over."
    )
    minimum_calls = models.PositiveIntegerField(
        default=10,
        help_text="The failure rate counts only once the window holds this many calls.",
    )
    recovery_timeout_seconds = models.FloatField(
        default=30,
        help_text="How long the breaker stays open before it lets probes through.",
    )
    half_open_probes = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Probe calls admitted across the fleet while half-open; all "
        "must succeed to close.",
    )
    probe_timeout_seconds = models.FloatField(
        default=30,
        help_text="A probe not finished within this frees its slot for another.",
    )

    class Meta:
        verbose_name = "circuit breaker"

    def as_policy(self) -> "CircuitPolicy":
        """Return this row as the breaker's own ``BreakerPolicy`` dataclass."""
        from .circuit_breaker import BreakerPolicy as Policy

        return Policy(
            self.failure_threshold,
            self.failure_rate_percent,
            self.window_seconds,
            self.minimum_calls,
            self.recovery_timeout_seconds,
            self.half_open_probes,
            self.probe_timeout_seconds,
        )

    def __str__(self) -> str:
        return f"breaker for {self.provider.name}"

    def clean(self) -> None:
        for field in (
            "window_seconds",
            "recovery_timeout_seconds",
            "probe_timeout_seconds",
        ):
            positive(field, getattr(self, field))
        if not self.failure_threshold and not self.failure_rate_percent:
            raise ValidationError(
                "set failure_threshold or failure_rate_percent, or the breaker "
                "never opens"
            )


def hash_key(raw: str) -> str:
    """Return the stored form of an API key (SHA-256; keys are random)."""
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKey(models.Model):
    """A bearer token owned by a user; only its hash is stored."""

    PREFIX = "sk-ss-"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="api_keys",
        help_text="Requests with the key count as this user for user-scoped "
        "limits and the per-caller pool cap.",
    )
    name = models.CharField(max_length=100, blank=True, help_text="What it is for.")
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The key's first characters."
    )
    key_hash = models.CharField(
        max_length=64,
        unique=True,
        editable=False,
        help_text="SHA-256 of the key; the key itself is never stored.",
    )
    created_at = models.DateTimeField(
        default=timezone.now, editable=False, help_text="When the key was issued."
    )
    revoked_at = models.DateTimeField(
        null=True, blank=True, help_text="Set to revoke: the key stops working."
    )

    objects: ClassVar[models.Manager["ApiKey"]]

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        state = "revoked" if self.revoked_at else "active"
        return f"{self.prefix}… ({self.user}, {state})"

    @classmethod
    def issue(cls, user: Any, name: str = "") -> tuple["ApiKey", str]:
        """Create a key for ``user``; return it and the raw key (shown once)."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            user=user, name=name, prefix=raw[:12], key_hash=hash_key(raw)
        )
        return key, raw
