"""A cluster-wide pool of expiring leases for direct streams.

Every API instance takes a lease before it opens a direct provider stream:
a global cap on concurrent streams and a per-caller cap hold across all
instances at once. A lease is a member of two Redis sorted sets (global and
the caller's), scored by its expiry in Redis time; one Lua step purges
expired members, checks both caps and adds the lease. Nothing is counted
by an increment/decrement pair, so a crashed instance's leases stop
counting by themselves within their TTL.

::

    lease = await pool.acquire(caller, policy)     # PoolFull -> 503
    try:
        async with pool.hold(lease):                # renews, always releases
            async for event in stream:
                await send(event)
    except LeaseLost as exc:                        # renewal found it gone
        await send(events.error(exc.code, exc.message))

Errors: ``PoolFull`` (``pool_full``, 503, ``scope`` and ``retry_after``)
and ``LeaseLost`` (``lease_lost``), both ``ResilienceError``.

While Redis is unreachable (errors or timeouts) the pool falls back to
in-process limits with the same policy: the global cap then holds per
instance, not across the cluster. Redis is retried at most every
``REDIS_RETRY_SECONDS``, so a hung Redis costs one request per second the
socket timeout, not every request. Leases taken locally are renewed and
released locally; the per-instance count includes this process's Redis
leases, so streams that started before the outage still count.

Note: after Redis comes back, leases taken locally during the outage are
not in Redis, so the cluster may run above the global cap until they end.
A Redis lease released while Redis is unreachable stays counted there
until its TTL passes. Both are bounded, and preferred to refusing every
stream or cutting running ones on a Redis blip.

Redis Cluster: each Lua step touches the global key and one caller key, so
all pool keys carry the ``{pool}`` hash tag and live in one slot (one shard
serves the whole pool; that is the price of one atomic step).
"""

import asyncio
import heapq
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import redis_client
from .errors import ResilienceError
from .streams import cancel_and_wait, raise_if_cancelling, run_to_end

logger = logging.getLogger(__name__)

Scope = Literal["global", "per_user"]

HASH_TAG = "{pool}"
# After Redis failed, go to Redis again at most this often.
REDIS_RETRY_SECONDS = 1.0
# Renew a held lease every TTL * RENEW_FRACTION, leaving two more tries
# before it expires.
RENEW_FRACTION = 1 / 3
# Weight of the newest hold duration in the moving average.
EWMA_WEIGHT = 0.2
_UNREACHABLE = (RedisError, OSError)
_T = TypeVar("_T")


class PoolFull(ResilienceError):
    """No slot is free: ``scope`` says which cap was reached."""

    code = "pool_full"
    status = 503

    def __init__(self, scope: Scope, retry_after: float) -> None:
        super().__init__(f"connection pool full ({scope})", retry_after)
        self.scope = scope


class LeaseLost(ResilienceError):
    """A held lease was found gone (expired or removed) while in use."""

    code = "lease_lost"
    status = 503


@dataclass(frozen=True)
class PoolPolicy:
    """Caps for one class of callers, as plain data."""

    global_max: int
    per_user_max: int
    lease_ttl_seconds: float

    def __post_init__(self) -> None:
        if self.global_max < 0 or self.per_user_max < 0:
            raise ValueError("PoolPolicy: caps must be >= 0")
        if not self.lease_ttl_seconds > 0:
            raise ValueError("PoolPolicy: lease_ttl_seconds must be > 0")

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl_seconds * 1000))


@dataclass(frozen=True)
class Lease:
    """One slot of the pool, held by ``caller`` until released or expired.

    ``remote`` is false for a lease taken from the in-process fallback.
    ``acquired_at`` is read from the pool's clock.
    """

    id: str
    caller: str
    policy: PoolPolicy
    acquired_at: float
    remote: bool = True


@dataclass(frozen=True)
class CallerUsage:
    caller: str
    in_use: int


@dataclass(frozen=True)
class Occupancy:
    """What the pool holds now, for a status page or metrics.

    ``global_in_use`` and ``busiest`` come from Redis and are ``None`` and
    empty while it is unreachable; ``instance_in_use`` counts the leases
    this process holds, Redis and fallback alike.
    """

    global_in_use: int | None
    busiest: tuple[CallerUsage, ...]
    instance_in_use: int
    redis_available: bool


@dataclass
class PoolCounters:
    """Plain counts since start; round trips are Redis requests sent."""

    acquires: int = 0
    acquire_round_trips: int = 0
    rejected: int = 0
    fallback_acquires: int = 0
    renewals: int = 0
    renew_round_trips: int = 0
    releases: int = 0
    release_round_trips: int = 0
    redis_errors: int = 0
    leases_lost: int = 0


_ACQUIRE = redis_client.LuaScript.load("pool_acquire.lua", "pool")
_RENEW = redis_client.LuaScript.load("pool_renew.lua", "pool")
_RELEASE = redis_client.LuaScript.load("pool_release.lua", "pool")


class _RedisHealth:
    """Remember whether Redis answers; log each change once."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.up = True
        self._retry_at = float("-inf")

    def should_try(self) -> bool:
        """Return whether to send this call to Redis (one probe per interval)."""
        if self.up:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + REDIS_RETRY_SECONDS
        return True

    def failed(self, exc: BaseException) -> None:
        self._retry_at = self._clock() + REDIS_RETRY_SECONDS
        if self.up:
            logger.warning(
                "pool: Redis unreachable, using per-instance limits (%r)", exc
            )
        self.up = False

    def answered(self) -> None:
        if not self.up:
            logger.warning("pool: Redis reachable again, cluster-wide limits back")
        self.up = True


class _LocalPool:
    """This process's leases, and the fallback limits while Redis is down.

    Remote leases are tracked here too (without a cap check), so that the
    fallback counts streams that started before Redis went away. Not
    thread-safe: use it from one event loop.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._by_caller: dict[str, set[str]] = {}
        self._caller_of: dict[str, str] = {}

    def try_acquire(
        self, lease_id: str, caller: str, policy: PoolPolicy
    ) -> Scope | None:
        """Add the lease if both caps allow; return the full scope otherwise."""
        self._purge()
        if len(self._by_caller.get(caller, ())) >= policy.per_user_max:
            return "per_user"
        if len(self._expiry) >= policy.global_max:
            return "global"
        self.track(lease_id, caller, policy.lease_ttl_seconds)
        return None

    def track(self, lease_id: str, caller: str, ttl: float) -> None:
        self._expiry[lease_id] = self._clock() + ttl
        self._caller_of[lease_id] = caller
        self._by_caller.setdefault(caller, set()).add(lease_id)

    def renew(self, lease_id: str, caller: str, ttl: float) -> bool:
        expiry = self._expiry.get(lease_id)
        now = self._clock()
        if expiry is None or expiry <= now or self._caller_of[lease_id] != caller:
            self.release(lease_id, caller)
            return False
        self._expiry[lease_id] = now + ttl
        return True

    def release(self, lease_id: str, caller: str) -> bool:
        """Remove exactly this lease of ``caller``; return whether it was held."""
        if self._caller_of.get(lease_id) != caller:
            return False
        del self._caller_of[lease_id]
        del self._expiry[lease_id]
        ids = self._by_caller[caller]
        ids.discard(lease_id)
        if not ids:
            del self._by_caller[caller]
        return True

    def usage(self, top: int) -> tuple[int, tuple[CallerUsage, ...]]:
        self._purge()
        counts = ((len(ids), c) for c, ids in self._by_caller.items())
        busiest = heapq.nlargest(top, counts)
        return len(self._expiry), tuple(CallerUsage(c, n) for n, c in busiest)

    def _purge(self) -> None:
        now = self._clock()
        for lease_id in [i for i, exp in self._expiry.items() if exp <= now]:
            self.release(lease_id, self._caller_of[lease_id])


class _DurationAverage:
    """An exponentially weighted mean of how long leases were held."""

    def __init__(self) -> None:
        self.mean: float | None = None

    def observe(self, seconds: float) -> None:
        if self.mean is None:
            self.mean = seconds
        else:
            self.mean += EWMA_WEIGHT * (seconds - self.mean)

    def retry_after(self, slots: int, fallback: float) -> float:
        """Estimate the wait until one of ``slots`` busy slots frees.

        With holds of mean length D whose ends are spread evenly, the next
        of N ends after about D / N. Before any hold ended here, answer
        ``fallback`` (the lease TTL). The mean is this instance's only.
        """
        if self.mean is None:
            return fallback
        return self.mean / max(1, slots)


class AsyncConnectionPool:
    """Lease slots against a global and a per-caller cap, cluster-wide.

    One instance per process (per event loop). ``redis`` returns the
    running loop's client; ``clock`` measures hold durations and paces the
    Redis retries while it is down.
    """

    def __init__(
        self,
        redis: Callable[[], aioredis.Redis] = redis_client.async_client,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._health = _RedisHealth(clock)
        self._local = _LocalPool(clock)
        self._durations = _DurationAverage()
        self.counters = PoolCounters()
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def redis_available(self) -> bool:
        """Return whether the last Redis call answered."""
        return self._health.up

    async def acquire(self, caller: str, policy: PoolPolicy) -> Lease:
        """Return a new lease for ``caller``, or raise ``PoolFull``.

        Both caps are checked and the lease added in one atomic Redis step.
        While Redis is unreachable the caps hold per instance.
        """
        lease_id = secrets.token_urlsafe(18)
        self.counters.acquires += 1
        if self._health.should_try():
            attempt = self._spawn(self._acquire_remote(lease_id, caller, policy))
            try:
                return await asyncio.shield(attempt)
            except asyncio.CancelledError:
                # The script may already have granted the slot: give it back.
                attempt.add_done_callback(self._release_orphan)
                raise
            except _UNREACHABLE as exc:
                self._unreachable(exc)
        return self._acquire_local(lease_id, caller, policy)

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by its TTL; return false if it is gone.

        Note: while Redis is unreachable a Redis lease cannot be checked;
        it is reported alive, and the first renewal after recovery decides.
        """
        self.counters.renewals += 1
        ttl = lease.policy.lease_ttl_seconds
        if not lease.remote:
            return self._local.renew(lease.id, lease.caller, ttl)
        alive = await self._renew_remote(lease)
        if alive is False:
            self._local.release(lease.id, lease.caller)
            return False
        self._local.renew(lease.id, lease.caller, ttl)
        return True

    async def release(self, lease: Lease) -> None:
        """Give the lease back; releasing twice or a foreign id frees nothing.

        Never raises for Redis trouble: a lease that cannot be removed now
        expires by itself within its TTL.
        """
        self.counters.releases += 1
        held_here = self._local.release(lease.id, lease.caller)
        removed = held_here
        if lease.remote:
            # Shielded: a cancelled caller still gives the slot back.
            removed = await asyncio.shield(self._spawn(self._release_remote(lease)))
        if removed:
            self._durations.observe(self._clock() - lease.acquired_at)

    def hold(
        self,
        lease: Lease,
        *,
        renew_fraction: float = RENEW_FRACTION,
        interrupt: bool = True,
    ) -> "PoolHold":
        """Return a context manager that keeps ``lease`` alive, then releases it.

        See ``PoolHold`` for how a lost lease is signalled.
        """
        interval = lease.policy.lease_ttl_seconds * renew_fraction
        return PoolHold(self, lease, interval, interrupt)

    async def occupancy(self, top: int = 10) -> Occupancy:
        """Return global use and the ``top`` busiest callers (SCANs Redis).

        Meant for a status page, not the request path.
        """
        instance_in_use, _ = self._local.usage(0)
        try:
            in_use, busiest = await self._remote_usage(top)
        except _UNREACHABLE:
            return Occupancy(None, (), instance_in_use, redis_available=False)
        return Occupancy(in_use, busiest, instance_in_use, redis_available=True)

    def retry_after(self, scope: Scope, policy: PoolPolicy) -> float:
        """Estimate seconds until a slot of ``scope`` frees (see the EWMA)."""
        slots = policy.global_max if scope == "global" else policy.per_user_max
        return self._durations.retry_after(slots, policy.lease_ttl_seconds)

    async def _acquire_remote(
        self, lease_id: str, caller: str, policy: PoolPolicy
    ) -> Lease:
        keys = self._keys(caller)
        args = (lease_id, policy.global_max, policy.per_user_max, policy.ttl_ms)
        reply = await _ACQUIRE.run(keys, args, self._redis(), self._count_acquire)
        self._health.answered()
        if int(reply[0]) != 1:
            self._reject(_scope(reply[1]), policy)
        self._local.track(lease_id, caller, policy.lease_ttl_seconds)
        return Lease(lease_id, caller, policy, self._clock(), remote=True)

    def _acquire_local(self, lease_id: str, caller: str, policy: PoolPolicy) -> Lease:
        self.counters.fallback_acquires += 1
        scope = self._local.try_acquire(lease_id, caller, policy)
        if scope is not None:
            self._reject(scope, policy)
        return Lease(lease_id, caller, policy, self._clock(), remote=False)

    def _reject(self, scope: Scope, policy: PoolPolicy) -> NoReturn:
        self.counters.rejected += 1
        logger.debug("pool: full (%s)", scope)
        raise PoolFull(scope, self.retry_after(scope, policy))

    async def _renew_remote(self, lease: Lease) -> bool | None:
        """Return whether Redis still holds the lease, ``None`` if unknown."""
        if not self._health.should_try():
            return None
        keys = self._keys(lease.caller)
        args = (lease.id, lease.policy.ttl_ms)
        try:
            alive = await _RENEW.run(keys, args, self._redis(), self._count_renew)
        except _UNREACHABLE as exc:
            # A cancelled renewal (the stream ended) is no Redis outage: do
            # not mark Redis down, which would skip the release that follows.
            raise_if_cancelling(exc)
            self._unreachable(exc)
            return None
        self._health.answered()
        return int(alive) == 1

    async def _release_remote(self, lease: Lease) -> bool:
        if not self._health.should_try():
            return False
        keys = self._keys(lease.caller)
        try:
            removed = await _RELEASE.run(
                keys, (lease.id,), self._redis(), self._count_release
            )
        except _UNREACHABLE as exc:
            self._unreachable(exc)
            return False
        self._health.answered()
        return int(removed) == 1

    async def _remote_usage(self, top: int) -> tuple[int, tuple[CallerUsage, ...]]:
        client = self._redis()
        floor = f"({redis_client.time_ms(await client.time())}"
        in_use = await client.zcount(global_key(), floor, "+inf")
        user_prefix = redis_client.key(HASH_TAG, "user", "")
        user_keys = [
            k async for k in client.scan_iter(match=_glob_escape(user_prefix) + "*")
        ]
        async with client.pipeline(transaction=False) as pipe:
            for user_key in user_keys:
                pipe.zcount(user_key, floor, "+inf")
            counts = await pipe.execute()
        pairs = [
            (int(n), k.decode()[len(user_prefix) :])
            for n, k in zip(counts, user_keys, strict=True)
            if int(n) > 0
        ]
        busiest = heapq.nlargest(top, pairs)
        return int(in_use), tuple(CallerUsage(c, n) for n, c in busiest)

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> "asyncio.Task[_T]":
        """Start ``work`` as a task that lives on if its awaiter is cancelled."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _release_orphan(self, attempt: "asyncio.Future[Lease]") -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            return
        self._spawn(self.release(attempt.result()))

    def _unreachable(self, exc: BaseException) -> None:
        self.counters.redis_errors += 1
        self._health.failed(exc)

    def _keys(self, caller: str) -> tuple[str, str]:
        return global_key(), redis_client.key(HASH_TAG, "user", caller)

    def _count_acquire(self) -> None:
        self.counters.acquire_round_trips += 1

    def _count_renew(self) -> None:
        self.counters.renew_round_trips += 1

    def _count_release(self) -> None:
        self.counters.release_round_trips += 1


class PoolHold:
    """Keep a lease alive while the body runs; release it on every exit.

    A background task renews the lease every ``renew_every`` seconds. When a
    renewal finds the lease gone, ``lost`` is set and, with ``interrupt``
    (the default), the task that entered the hold is cancelled and the hold
    exits with ``LeaseLost`` instead of ``CancelledError``: a streaming
    consumer catches ``LeaseLost`` and ends the stream with an ``error``
    event ``lease_lost``. A cancellation from elsewhere still propagates as
    ``CancelledError``. If the body finished normally before the cancel
    landed, the hold exits normally with ``lost`` set.

    With ``interrupt=False`` nothing is cancelled: check ``lost`` or call
    ``raise_if_lost()`` between items. Use that form inside an async
    generator whose consumer may run other code between items, since a
    cancellation aimed at the consumer's task would land outside the body.

    The release runs to its end even if the exit is cancelled again; that
    cancellation is re-raised after it.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        lease: Lease,
        renew_every: float,
        interrupt: bool,
    ) -> None:
        self.lease = lease
        self.lost = asyncio.Event()
        self._pool = pool
        self._renew_every = renew_every
        self._interrupt = interrupt
        self._task: asyncio.Task[Any] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._in_body = False
        self._interrupted = False

    def raise_if_lost(self) -> None:
        """Raise ``LeaseLost`` if a renewal found the lease gone."""
        if self.lost.is_set():
            raise LeaseLost("connection pool lease lost")

    async def __aenter__(self) -> "PoolHold":
        self._task = asyncio.current_task()
        self._renewer = asyncio.create_task(self._renew_loop())
        self._in_body = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._in_body = False
        if self._renewer is not None:
            self._renewer.cancel()
        # A cancel we requested but that landed only after the body ended
        # is caught here too, and dropped below: the body finished.
        cancelled = await run_to_end(self._cleanup)
        if self._ours_alone():
            if exc_type is asyncio.CancelledError:
                raise LeaseLost("connection pool lease lost") from exc
            return False
        if cancelled is not None:
            raise cancelled
        return False

    def _ours_alone(self) -> bool:
        """Return whether the only pending cancellation is the one we made."""
        if not self._interrupted or self._task is None:
            return False
        return self._task.uncancel() == 0

    async def _cleanup(self) -> None:
        if self._renewer is not None:
            await cancel_and_wait(self._renewer)
        await self._pool.release(self.lease)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            renewed = await self._pool.renew(self.lease)
            raise_if_cancelling()
            if not renewed:
                self._on_lost()
                return

    def _on_lost(self) -> None:
        logger.debug("pool: lease of %s lost while held", self.lease.caller)
        self._pool.counters.leases_lost += 1
        self.lost.set()
        if self._interrupt and self._in_body and self._task is not None:
            self._interrupted = True
            self._task.cancel()


def global_key() -> str:
    """The sorted set of every live lease, scored by expiry (Redis ms)."""
    return redis_client.key(HASH_TAG, "global")


def global_in_use(client: Any) -> int:
    """Count live leases fleet-wide with a sync client (metrics scrapes)."""
    floor = f"({redis_client.time_ms(client.time())}"
    return int(client.zcount(global_key(), floor, "+inf"))


def _scope(raw: bytes | str) -> Scope:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return "per_user" if text == "per_user" else "global"


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
