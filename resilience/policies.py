"""The in-process policy cache.

Policies (provider rows now, limits in later layers) live in the database
and are read on the stream path from this cache only: no database query per
request (shared/CASES.md C20). A write bumps a version key in Redis; each
process reads that key at most every ``POLICY_REFRESH_SECONDS`` and reloads
when it moved, so a change reaches every instance within a second. While
Redis is unreachable the cache reloads from the database on a slower timer.
"""

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from redis.exceptions import RedisError

from llm.base import ChatProvider
from llm.registry import ProviderConfig, build_provider

from . import conf, redis_client

logger = logging.getLogger(__name__)

VERSION_KEY = "policies:version"
# Without Redis to tell us about changes, reload this often.
OFFLINE_RELOAD_SECONDS = 5.0


@dataclass(frozen=True)
class ProviderEntry:
    config: ProviderConfig
    adapter: ChatProvider


@dataclass(frozen=True)
class Snapshot:
    """Everything the stream path needs to decide, loaded at one moment."""

    version: str | None
    providers: tuple[ProviderEntry, ...] = field(default=())

    def enabled_providers(self) -> list[ProviderEntry]:
        return [entry for entry in self.providers if entry.config.enabled]

    def provider(self, name: str) -> ProviderEntry | None:
        for entry in self.enabled_providers():
            if entry.config.name == name:
                return entry
        return None


def load_provider_configs() -> list[ProviderConfig]:
    """Read every provider row (blocking; call from a thread)."""
    from llm.models import Provider

    return [
        ProviderConfig(p.name, p.kind, p.order, p.enabled, dict(p.options))
        for p in Provider.objects.order_by("order", "name")
    ]


class PolicyCache:
    """Hold the current ``Snapshot`` and refresh it when the version moves."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._checked_at = float("-inf")
        self._loaded_at = float("-inf")
        self._adapters: dict[str, ProviderEntry] = {}
        self._redis_ok = True
        self.loads = 0
        self.version_reads = 0

    async def aget(self) -> Snapshot:
        """Return a snapshot no older than the refresh interval allows."""
        now = self._clock()
        interval = conf.number("POLICY_REFRESH_SECONDS")
        if self._snapshot is not None and now - self._checked_at < interval:
            return self._snapshot
        self._checked_at = now
        version = await self._aversion()
        if self._needs_reload(version, now):
            configs = await sync_to_async(
                load_provider_configs, thread_sensitive=False
            )()
            self._snapshot = self._build(version, configs)
            self._loaded_at = now
            self.loads += 1
        assert self._snapshot is not None
        return self._snapshot

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

    def _build(self, version: str | None, configs: list[ProviderConfig]) -> Snapshot:
        # Reuse an adapter whose configuration did not change, so its HTTP
        # connection pools survive a reload triggered by another row.
        entries: dict[str, ProviderEntry] = {}
        for config in configs:
            fingerprint = json.dumps(
                [config.name, config.kind, config.options], sort_keys=True
            )
            old = self._adapters.get(fingerprint)
            adapter = old.adapter if old else build_provider(config)
            entries[fingerprint] = ProviderEntry(config, adapter)
        self._adapters = entries
        return Snapshot(version, tuple(entries.values()))


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
