"""The in-process policy cache.

Policies (provider rows now, limits in later layers) live in the database
and are read on the stream path from this cache only: no database query per
request (shared/CASES.md C20). A write bumps a version key in Redis; each
process reads that key at most every ``POLICY_REFRESH_SECONDS`` and reloads
when it moved, so a change reaches every instance within a second. While
Redis is unreachable the cache reloads from the database on a slower timer.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from asgiref.sync import sync_to_async
from redis.exceptions import RedisError

from llm.base import ChatProvider
from llm.registry import ProviderConfig, build_provider

from . import conf, redis_client
from .circuit_breaker import AsyncCircuitBreaker, BreakerPolicy
from .connection_pool_manager import PoolPolicy
from .queue_request_handler import QueueSettings
from .rate_limiter import BucketPolicy
from .retry_strategy import RetryPolicy

logger = logging.getLogger(__name__)

VERSION_KEY = "policies:version"
DEFAULT_POOL = PoolPolicy(global_max=50, per_user_max=4, lease_ttl_seconds=30)
# Without Redis to tell us about changes, reload this often.
OFFLINE_RELOAD_SECONDS = 5.0


@dataclass(frozen=True)
class ProviderEntry:
    """A provider ready to call: its row, its adapter and its breaker."""

    config: ProviderConfig
    adapter: ChatProvider
    breaker: AsyncCircuitBreaker


@dataclass(frozen=True)
class PolicyRows:
    """The policy tables as plain data, read in one go."""

    providers: list[ProviderConfig]
    pool: PoolPolicy = field(default_factory=lambda: DEFAULT_POOL)
    queue: QueueSettings = field(default_factory=QueueSettings)
    rate_limits: tuple[BucketPolicy, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: dict[str, BreakerPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """Everything the stream path needs to decide, loaded at one moment."""

    version: str | None
    providers: tuple[ProviderEntry, ...] = field(default=())
    pool: PoolPolicy = field(default_factory=lambda: DEFAULT_POOL)
    queue: QueueSettings = field(default_factory=QueueSettings)
    rate_limits: tuple[BucketPolicy, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def enabled_providers(self) -> list[ProviderEntry]:
        return [entry for entry in self.providers if entry.config.enabled]

    def provider(self, name: str) -> ProviderEntry | None:
        for entry in self.enabled_providers():
            if entry.config.name == name:
                return entry
        return None

    def candidates(self, chosen: ProviderEntry) -> list[ProviderEntry]:
        """The chosen provider first, then the other enabled ones in order."""
        others = [e for e in self.enabled_providers() if e is not chosen]
        return [chosen, *others]


def load_rows() -> PolicyRows:
    """Read every policy table (blocking; call from a thread)."""
    from llm.models import Provider

    from .models import BreakerPolicy as BreakerRow
    from .models import PoolPolicy as PoolRow
    from .models import QueuePolicy as QueueRow
    from .models import RateLimitPolicy as RateLimitRow
    from .models import RetryPolicy as RetryRow

    # Read, never create: the stream path must not write. Missing rows (a
    # fresh test database) mean the model defaults.
    pool = PoolRow.objects.filter(pk=1).first() or PoolRow()
    queue = QueueRow.objects.filter(pk=1).first() or QueueRow()
    retry = RetryRow.objects.filter(pk=1).first() or RetryRow()
    return PolicyRows(
        providers=[
            ProviderConfig(p.name, p.kind, p.order, p.enabled, dict(p.options))
            for p in Provider.objects.order_by("order", "name")
        ],
        pool=PoolPolicy(pool.global_max, pool.per_user_max, pool.lease_ttl_seconds),
        queue=QueueSettings(
            queue.enabled,
            queue.max_depth,
            queue.per_user_max,
            queue.max_wait_seconds,
            queue.job_timeout_seconds,
        ),
        rate_limits=tuple(
            BucketPolicy(
                r.name, r.scope, r.capacity, r.refill_per_second, r.on_redis_down
            )
            for r in RateLimitRow.objects.filter(enabled=True).order_by("name")
        ),
        retry=RetryPolicy(
            retry.max_attempts,
            retry.base_delay_seconds,
            retry.max_delay_seconds,
            retry.max_total_seconds,
        ),
        breakers={
            b.provider.name: b.as_policy()
            for b in BreakerRow.objects.select_related("provider")
        },
    )


class PolicyCache:
    """Hold the current ``Snapshot`` and refresh it when the version moves."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, poll: bool = True
    ) -> None:
        self._clock = clock
        self._poll = poll
        self._snapshot: Snapshot | None = None
        self._loaded_at = float("-inf")
        self._adapters: dict[str, ProviderEntry] = {}
        self._redis_ok = True
        self.loads = 0
        self.version_reads = 0
        self._poller: asyncio.Task[None] | None = None

    async def aget(self) -> Snapshot:
        """Return the current snapshot; only the very first call waits.

        A poller task on the running event loop reads the version key every
        ``POLICY_REFRESH_SECONDS`` and reloads when it moved, so a change is
        live within a second whether or not requests arrive, and neither a
        slow database nor a slow Redis holds up a request.
        """
        if self._snapshot is None:
            await self._refresh(self._clock())
        if self._poll:
            self._ensure_poller()
        assert self._snapshot is not None
        return self._snapshot

    async def arefresh(self) -> Snapshot:
        """Check the version and reload now if it moved (commands, tests)."""
        await self._refresh(self._clock())
        assert self._snapshot is not None
        return self._snapshot

    def _ensure_poller(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._poller
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._poller = loop.create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(conf.number("POLICY_REFRESH_SECONDS"))
            try:
                await self._refresh(self._clock())
            except Exception as exc:
                logger.warning("policies: reload failed, keeping the last (%s)", exc)

    async def _refresh(self, now: float) -> None:
        version = await self._aversion()
        if self._needs_reload(version, now):
            rows = await sync_to_async(load_rows, thread_sensitive=False)()
            self._snapshot = self._build(version, rows)
            self._loaded_at = now
            self.loads += 1

    def current(self) -> Snapshot | None:
        """Return the snapshot held now, without refreshing it."""
        return self._snapshot

    def invalidate(self) -> None:
        """Force a reload on the next ``aget`` (tests, commands)."""
        self._snapshot = None

    def _needs_reload(self, version: str | None, now: float) -> bool:
        if self._snapshot is None:
            return True
        if not self._redis_ok:
            return now - self._loaded_at >= OFFLINE_RELOAD_SECONDS
        return version != self._snapshot.version

    async def _aversion(self) -> str | None:
        self.version_reads += 1
        try:
            raw = await redis_client.async_client().get(redis_client.key(VERSION_KEY))
        except (RedisError, OSError) as exc:
            if self._redis_ok:
                logger.warning("policies: Redis unreachable, polling DB (%s)", exc)
            self._redis_ok = False
            return None
        if not self._redis_ok:
            logger.warning("policies: Redis reachable again")
        self._redis_ok = True
        return raw.decode() if raw is not None else "unset"

    def _build(self, version: str | None, rows: PolicyRows) -> Snapshot:
        # Reuse an adapter whose configuration did not change, so its HTTP
        # connection pools survive a reload triggered by another row.
        entries: dict[str, ProviderEntry] = {}
        for config in rows.providers:
            breaker = rows.breakers.get(config.name) or BreakerPolicy()
            fingerprint = json.dumps(
                [config.name, config.kind, config.options, asdict(breaker)],
                sort_keys=True,
            )
            old = self._adapters.get(fingerprint)
            # The entry always carries the new row: ``enabled`` and ``order``
            # are not in the fingerprint, and a stale copy of them would keep
            # a provider switched off in the admin in service.
            entries[fingerprint] = ProviderEntry(
                config,
                old.adapter if old else build_provider(config),
                old.breaker if old else AsyncCircuitBreaker(config.name, breaker),
            )
        self._adapters = entries
        return Snapshot(
            version,
            tuple(entries.values()),
            rows.pool,
            rows.queue,
            rows.rate_limits,
            rows.retry,
        )


def bump_version() -> None:
    """Tell every process that policies changed (called after a commit).

    The version is a fresh random token rather than a counter: a counter
    restarts at 1 after Redis loses the key and could match a version that
    a process already holds.
    """
    try:
        redis_client.sync_client().set(redis_client.key(VERSION_KEY), uuid.uuid4().hex)
    except RedisError as exc:
        logger.warning(
            "policies: could not announce a change (%s); processes pick it up "
            "within %.0f s",
            exc,
            OFFLINE_RELOAD_SECONDS,
        )


policy_cache = PolicyCache()
