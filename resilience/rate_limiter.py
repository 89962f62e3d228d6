"""Token buckets in Redis, with tokens leased to each instance in batches.

A request names one or more buckets (``BucketRef``) and is admitted only if
every one of them gives it ``cost`` tokens; a rejected request takes nothing
from any bucket. The decision is one Lua script (``lua/token_bucket.lua``)
that reads Redis's own clock (``TIME``), refills, decides and takes in one
atomic step (shared/CASES.md C09).

Leasing. When a request reaches Redis and is admitted, the script also
leases the instance up to ``min(lease_size, lease_fraction * capacity)``
whole spare tokens of each bucket, for ``lease_seconds``. Later requests
spend them in-process with no round trip. A denial is remembered as "empty
until T" (T on the injected monotonic clock), so the same bucket is denied
again locally until T. The next round trip hands unspent tokens back in the
same atomic step; tokens of a lease that outlived its local lifetime (90 % of
``lease_seconds``, so it ends before Redis's copy does) are discarded and
Redis frees their room when its copy expires.

The bound. Redis keeps ``tokens + outstanding leases <= capacity`` and
refills only into that room. Let ``v`` be the tokens in Redis plus the unspent
leased tokens of the fleet: ``v <= capacity``, refill raises ``v`` by at most
``rate * dt``, leasing and handing back move tokens without changing ``v``,
and each admission lowers it by ``cost``. So over any window of ``w``
seconds the fleet admits at most::

    capacity + refill_per_second * w          (over-admission: 0)

exactly as one bucket would. The price is under-admission: up to
``N_instances * L`` tokens (``L = min(lease_size, lease_fraction *
capacity)``) may sit unspent in leases, and leased tokens already spent keep
their room until the instance's next round trip or the lease's expiry, at
most ``lease_seconds`` later. A bucket smaller than ``1 / lease_fraction``
tokens is never leased and is decided in Redis every time.

Note: the bound rests on Redis's clock. ``TIME`` is wall-clock time, so a
forward jump of Redis's clock both refills early and ends leases early in
Redis (while instances may still spend them): a jump of ``j`` seconds can
admit up to ``rate * j`` plus the unspent leases extra. A backward jump only
delays refill.

RateLimit numbers. ``remaining`` is counted after this request and treats
every leased token, ours included, as spent. A Redis answer gives the
bucket's tokens left; a local decision reports that figure minus what this
instance spent locally since (tokens that the figure already excluded, so
it double-counts on purpose). It is therefore non-increasing for one
instance within a burst, rising only when a round trip sees real refill.
Note: it is as old as the instance's last round trip (at most one lease
lifetime); other instances may have spent tokens since.

Redis Cluster. One script call touches every bucket of the request, which
is what makes "all or nothing" atomic, so all of them must live in one hash
slot. Shared buckets ("global") cannot carry a per-request hash tag; we
chose atomicity: on a Cluster, give ``REDIS_KEY_PREFIX`` a hash tag (e.g.
``{rl}``) so every bucket lands in one slot, at the cost of sharding.

Redis unreachable (``RedisError``, ``OSError``, timeouts; the client has a
short socket timeout). Each policy says what to do: ``fail_open`` falls back
to an in-process bucket per key at the same capacity and rate (so the fleet
admits up to ``N_instances`` times the limit), ``fail_closed`` raises
``RateLimiterUnavailable``. A request naming any fail_closed bucket fails
closed. Leased tokens still held are spent first. While down, Redis is tried
again at most every ``retry_seconds``, so a paused Redis costs one timeout
per interval, not one per request.

``admit`` returns a ``Decision``; callers that prefer an exception raise
``RateLimited(decision)``, which carries the 429 and its ``Retry-After``.
"""

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import redis_client
from .errors import ResilienceError

logger = logging.getLogger(__name__)

SCOPES = frozenset({"global", "user", "api_key", "ip"})
FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"
SCRIPT = redis_client.LuaScript.load("token_bucket.lua", "rate_limiter")
# The local copy of a lease ends this much earlier than Redis's copy, so the
# instance never spends a token whose room Redis already gave back.
LOCAL_LEASE_SHARE = 0.9
# Past this many buckets held in memory, idle ones are forgotten.
MAX_LOCAL_BUCKETS = 10_000


@dataclass(frozen=True)
class BucketPolicy:
    """The limit of one kind of bucket, as plain data (mapped from DB rows)."""

    name: str
    scope: str
    capacity: float
    refill_per_second: float
    on_redis_down: str = FAIL_OPEN

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"bucket {self.name}: unknown scope {self.scope!r}")
        if self.capacity <= 0 or self.refill_per_second <= 0:
            raise ValueError(f"bucket {self.name}: capacity and rate must be > 0")
        if self.on_redis_down not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(
                f"bucket {self.name}: on_redis_down must be {FAIL_OPEN!r} or "
                f"{FAIL_CLOSED!r}, not {self.on_redis_down!r}"
            )


@dataclass(frozen=True)
class BucketRef:
    """One bucket of a policy, for one subject ("global", "user:42", …)."""

    policy: BucketPolicy
    subject: str

    @property
    def redis_key(self) -> str:
        return redis_client.key("rl", self.policy.name, self.subject)


@dataclass(frozen=True)
class Decision:
    """The answer to one ``admit`` call.

    ``limit``, ``remaining``, ``reset`` and ``policy`` describe the most
    restrictive bucket: the one that waits longest when denied, the one
    with the fewest tokens left when admitted. ``retry_after`` is the time
    until every bucket can give the request its tokens (0 when admitted);
    ``reset`` the time until that bucket is full again. ``local`` means no
    Redis round trip decided it; ``fallback`` that Redis was unreachable and
    an in-process bucket decided.
    """

    allowed: bool
    retry_after: float
    limit: int
    remaining: int
    reset: float
    policy: str
    local: bool
    fallback: bool = False

    @property
    def retry_after_seconds(self) -> int:
        """Return ``Retry-After``: the refill time rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after))

    @property
    def reset_seconds(self) -> int:
        """Return ``RateLimit-Reset`` in whole seconds, rounded up."""
        return max(0, math.ceil(self.reset))


class RateLimited(ResilienceError):
    """The request was denied by a bucket; carries the ``Decision``."""

    code = "rate_limited"
    status = 429

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"rate limit {decision.policy} exceeded", decision.retry_after)
        self.decision = decision


class RateLimiterUnavailable(ResilienceError):
    """Redis is unreachable and a bucket's policy is fail_closed."""

    code = "rate_limiter_unavailable"
    status = 503


@dataclass
class LimiterStats:
    """Plain counters for the metrics layer."""

    decisions: int = 0
    local_decisions: int = 0
    redis_round_trips: int = 0
    fallback_decisions: int = 0
    redis_failures: int = 0


@dataclass
class _Outcome:
    """One bucket's part of a decision, before picking the restrictive one."""

    policy: BucketPolicy
    remaining: float
    retry_after: float
    reset: float

    def restrictive_order(self) -> tuple[float, float, float]:
        return (-self.retry_after, self.remaining, self.policy.capacity)


@dataclass
class _LocalBucket:
    """What this instance knows of one Redis bucket between round trips."""

    lease: float = 0.0
    lease_gen: str = ""
    lease_until: float = float("-inf")
    known_tokens: float = 0.0
    spent_since: float = 0.0
    full_at: float = float("-inf")
    empty_until: float = float("-inf")
    empty_cost: float = 0.0

    def usable_lease(self, now: float) -> float:
        if now >= self.lease_until:
            self.lease = 0.0
        return self.lease

    def denies(self, cost: float, now: float) -> bool:
        empty = now < self.empty_until and cost >= self.empty_cost
        return empty and self.usable_lease(now) < cost

    def idle(self, now: float) -> bool:
        return self.usable_lease(now) == 0 and now >= self.empty_until

    def outcome(self, policy: BucketPolicy, cost: float, now: float) -> _Outcome:
        remaining = max(0.0, self.known_tokens - self.spent_since)
        rate = policy.refill_per_second
        reset = max(0.0, self.full_at - now) + self.spent_since / rate
        reset = min(reset, policy.capacity / rate)
        retry = self.empty_until - now if self.denies(cost, now) else 0.0
        return _Outcome(policy, remaining, retry, reset)


class _FallbackBucket:
    """An in-process token bucket, used while Redis is unreachable."""

    def __init__(self, policy: BucketPolicy, now: float) -> None:
        self.policy = policy
        self.tokens = policy.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        rate = self.policy.refill_per_second
        self.tokens = min(self.policy.capacity, self.tokens + elapsed * rate)
        self.updated = now

    def outcome(self, cost: float) -> _Outcome:
        rate = self.policy.refill_per_second
        retry = max(0.0, cost - self.tokens) / rate
        reset = (self.policy.capacity - self.tokens) / rate
        return _Outcome(self.policy, self.tokens, retry, reset)


class AsyncRateLimiter:
    """Admit requests against Redis token buckets, leasing tokens locally.

    One instance per process (or per event loop) is the intended use; each
    instance holds its own leases under a random id. ``local_cache=False``
    sends every decision to Redis (the benchmark's baseline).

    Note: round trips are not coalesced. Requests of one instance that miss
    the local cache while a round trip for the same bucket is in flight each
    make their own (they are decided exactly, but take no lease, since
    Redis grants one instance one lease per bucket at a time).
    """

    def __init__(
        self,
        *,
        local_cache: bool = True,
        lease_size: float = 20,
        lease_fraction: float = 0.1,
        lease_seconds: float = 1.0,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        redis: Callable[[], aioredis.Redis] = redis_client.async_client,
    ) -> None:
        self.local_cache = local_cache
        self.lease_size = lease_size
        self.lease_fraction = lease_fraction
        self.lease_seconds = lease_seconds
        self.retry_seconds = retry_seconds
        self.stats = LimiterStats()
        self._clock = clock
        self._redis = redis
        self._id = uuid.uuid4().hex[:16]
        self._generation = 0
        self._local: dict[str, _LocalBucket] = {}
        self._fallback: dict[str, _FallbackBucket] = {}
        self._down_until: float | None = None

    async def admit(self, buckets: Sequence[BucketRef], cost: float = 1) -> Decision:
        """Return whether a request costing ``cost`` may go ahead.

        Admit only if every bucket has ``cost`` tokens, and then take them
        from all; deny without taking anything otherwise. Raise
        ``RateLimiterUnavailable`` when Redis is unreachable and a bucket is
        fail_closed, and ``ValueError`` for a cost no bucket could ever give.
        """
        self._validate(buckets, cost)
        self.stats.decisions += 1
        decision = self._decide_locally(buckets, cost) if self.local_cache else None
        if decision is None:
            decision = await self._decide_remotely(buckets, cost)
        if decision.local:
            self.stats.local_decisions += 1
        logger.debug(
            "rate limit %s: allowed=%s remaining=%d local=%s",
            decision.policy,
            decision.allowed,
            decision.remaining,
            decision.local,
        )
        return decision

    @property
    def redis_down(self) -> bool:
        """Return whether the last attempt to reach Redis failed."""
        return self._down_until is not None

    def _validate(self, buckets: Sequence[BucketRef], cost: float) -> None:
        if not buckets:
            raise ValueError("admit needs at least one bucket")
        if cost <= 0:
            raise ValueError(f"cost must be > 0, not {cost}")
        for ref in buckets:
            if cost > ref.policy.capacity:
                raise ValueError(
                    f"bucket {ref.policy.name}: cost {cost} exceeds capacity "
                    f"{ref.policy.capacity}"
                )

    def _decide_locally(
        self, buckets: Sequence[BucketRef], cost: float
    ) -> Decision | None:
        now = self._clock()
        states = [self._local.get(ref.redis_key) for ref in buckets]
        denying = [
            state.outcome(ref.policy, cost, now)
            for ref, state in zip(buckets, states, strict=True)
            if state is not None and state.denies(cost, now)
        ]
        if denying:
            return _combine(denying, allowed=False, local=True)
        known = [state for state in states if state is not None]
        if len(known) < len(states):
            return None
        if all(state.usable_lease(now) >= cost for state in known):
            return self._spend_lease(buckets, known, cost, now)
        return None

    def _spend_lease(
        self,
        buckets: Sequence[BucketRef],
        states: list[_LocalBucket],
        cost: float,
        now: float,
    ) -> Decision:
        outcomes = []
        for ref, state in zip(buckets, states, strict=True):
            state.lease -= cost
            state.spent_since += cost
            outcomes.append(state.outcome(ref.policy, cost, now))
        return _combine(outcomes, allowed=True, local=True)

    async def _decide_remotely(
        self, buckets: Sequence[BucketRef], cost: float
    ) -> Decision:
        now = self._clock()
        if self._down_until is not None and now < self._down_until:
            return self._decide_offline(buckets, cost, now)
        if self._down_until is not None:
            # Only this request probes; the others keep the fallback meanwhile.
            self._down_until = now + self.retry_seconds

        handed_back = self._hand_back(buckets)
        self._generation += 1
        generation = str(self._generation)
        try:
            reply = await self._run_script(buckets, cost, generation, handed_back)
        except (RedisError, OSError) as exc:
            self._lost(exc, buckets, handed_back)
            return self._decide_offline(buckets, cost, self._clock())
        self._recovered()
        self._prune(now)
        return self._record(buckets, cost, now, generation, reply)

    def _hand_back(self, buckets: Sequence[BucketRef]) -> list[tuple[str, float]]:
        now = self._clock()
        handed: list[tuple[str, float]] = []
        for ref in buckets:
            state = self._local.get(ref.redis_key)
            if state is None:
                handed.append(("", 0.0))
                continue
            handed.append((state.lease_gen, state.usable_lease(now)))
            state.lease = 0.0
            state.lease_gen = ""
        return handed

    async def _run_script(
        self,
        buckets: Sequence[BucketRef],
        cost: float,
        generation: str,
        handed_back: list[tuple[str, float]],
    ) -> list[Any]:
        lifetime_ms = round(self.lease_seconds * 1000)
        args = [self._id, repr(cost), str(lifetime_ms), generation]
        for ref, (gen, unspent) in zip(buckets, handed_back, strict=True):
            policy = ref.policy
            want = self._lease_wanted(policy)
            numbers = (policy.capacity, policy.refill_per_second, want)
            args += [*map(repr, numbers), gen, repr(unspent)]
        keys = [ref.redis_key for ref in buckets]
        self.stats.redis_round_trips += 1
        return await self._eval(keys, args)

    def _lease_wanted(self, policy: BucketPolicy) -> float:
        if not self.local_cache:
            return 0
        return math.floor(min(self.lease_size, self.lease_fraction * policy.capacity))

    async def _eval(self, keys: list[str], args: list[str]) -> list[Any]:
        return list(await SCRIPT.run(keys, args, self._redis()))

    def _record(
        self,
        buckets: Sequence[BucketRef],
        cost: float,
        sent_at: float,
        generation: str,
        reply: list[Any],
    ) -> Decision:
        allowed = reply[0] == b"1"
        outcomes = []
        for index, ref in enumerate(buckets):
            fields = [float(value) for value in reply[1 + 4 * index : 5 + 4 * index]]
            tokens, _granted, wait_ms, full_ms = fields
            if self.local_cache:
                state = self._local.setdefault(ref.redis_key, _LocalBucket())
                self._remember(state, cost, sent_at, generation, fields)
            wait = wait_ms / 1000 if not allowed else 0.0
            outcomes.append(_Outcome(ref.policy, tokens, wait, full_ms / 1000))
        return _combine(outcomes, allowed=allowed, local=False)

    def _remember(
        self,
        state: _LocalBucket,
        cost: float,
        sent_at: float,
        generation: str,
        fields: list[float],
    ) -> None:
        """Keep one bucket's Redis answer for later local decisions.

        Times are taken from ``sent_at`` (before Redis read its clock), so the
        local lease ends and "empty until" lifts no later than Redis's.
        """
        tokens, granted, wait_ms, full_ms = fields
        state.known_tokens = tokens
        state.spent_since = 0.0
        state.full_at = sent_at + full_ms / 1000
        if granted > 0:
            state.lease = granted
            state.lease_gen = generation
            state.lease_until = sent_at + self.lease_seconds * LOCAL_LEASE_SHARE
        if wait_ms > 0:
            state.empty_until = sent_at + wait_ms / 1000
            state.empty_cost = cost
        else:
            state.empty_until = float("-inf")

    def _decide_offline(
        self, buckets: Sequence[BucketRef], cost: float, now: float
    ) -> Decision:
        closed = [r for r in buckets if r.policy.on_redis_down == FAIL_CLOSED]
        if closed:
            raise RateLimiterUnavailable(
                f"rate limiter unavailable for {closed[0].policy.name}",
                retry_after=self.retry_seconds,
            )
        self.stats.fallback_decisions += 1
        fallbacks = [self._fallback_bucket(ref, now) for ref in buckets]
        for bucket in fallbacks:
            bucket.refill(now)
        allowed = all(bucket.tokens >= cost for bucket in fallbacks)
        if allowed:
            for bucket in fallbacks:
                bucket.tokens -= cost
        outcomes = [bucket.outcome(cost) for bucket in fallbacks]
        if allowed:
            for outcome in outcomes:
                outcome.retry_after = 0.0
        return _combine(outcomes, allowed=allowed, local=True, fallback=True)

    def _fallback_bucket(self, ref: BucketRef, now: float) -> _FallbackBucket:
        bucket = self._fallback.get(ref.redis_key)
        if bucket is None or bucket.policy != ref.policy:
            bucket = self._fallback[ref.redis_key] = _FallbackBucket(ref.policy, now)
        return bucket

    def _lost(
        self,
        exc: BaseException,
        buckets: Sequence[BucketRef],
        handed_back: list[tuple[str, float]],
    ) -> None:
        # The script may have run and only its answer been lost, so the
        # tokens handed back are not restored: that could spend them twice.
        # Their generation is, so a later call can settle them as spent.
        for ref, (gen, _unspent) in zip(buckets, handed_back, strict=True):
            state = self._local.get(ref.redis_key)
            if state is not None and not state.lease_gen:
                state.lease_gen = gen
        self.stats.redis_failures += 1
        if self._down_until is None:
            logger.warning(
                "rate limiter: Redis unreachable, deciding per policy "
                "(fail_open: in-process buckets) (%s: %s)",
                type(exc).__name__,
                exc,
            )
        self._down_until = self._clock() + self.retry_seconds

    def _prune(self, now: float) -> None:
        # Per-user and per-ip buckets come and go; forget the idle ones so
        # the cache stays bounded.
        if len(self._local) > MAX_LOCAL_BUCKETS:
            idle = [key for key, state in self._local.items() if state.idle(now)]
            for key in idle:
                del self._local[key]
        if len(self._fallback) > MAX_LOCAL_BUCKETS:
            self._fallback.clear()

    def _recovered(self) -> None:
        if self._down_until is None:
            return
        logger.warning("rate limiter: Redis reachable again, buckets shared again")
        self._down_until = None
        self._fallback.clear()


def _combine(
    outcomes: list[_Outcome], *, allowed: bool, local: bool, fallback: bool = False
) -> Decision:
    """Return the decision described by the most restrictive bucket."""
    worst = min(outcomes, key=_Outcome.restrictive_order)
    retry = max(outcome.retry_after for outcome in outcomes) if not allowed else 0.0
    return Decision(
        allowed=allowed,
        retry_after=retry,
        limit=math.floor(worst.policy.capacity),
        remaining=math.floor(max(0.0, worst.remaining)),
        reset=worst.reset,
        policy=worst.policy.name,
        local=local,
        fallback=fallback,
    )
