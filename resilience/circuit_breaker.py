"""A circuit breaker per provider, shared by the whole fleet through Redis.

::

    closed ──(threshold or rate)──▶ open ──(recovery time)──▶ half_open
      ▲                              ▲                          │
      └────(all probes succeed)──────┼───────(any failure)──────┘
    forced_open / forced_closed: set by an operator; left by a reset or
    by forcing the other

Every transition runs in one Lua script (``lua/breaker_transition.lua``)
that reads Redis's clock (``TIME``), so every API instance and worker sees
the same state and the same open time. Half-open admits exactly
``half_open_probes`` calls across the fleet: the slot claim is part of the
script. A probe that neither succeeds nor fails within
``probe_timeout_seconds`` loses its slot, so a crashed worker cannot leave
the breaker stuck half-open.

Outcomes (see ``classify``): a ``TransientError`` (timeouts, connection
errors, 5xx, 429, a stream that breaks after a 200) is a failure. A
``PermanentError`` (400/401/403/404/422) is the caller's problem and counts
as a success: the provider answered (shared/CASES.md C08). Anything that is
not an ``Exception`` (``asyncio.CancelledError``, ``GeneratorExit``,
``KeyboardInterrupt``, ``SystemExit``) is *cancelled*: neither outcome, and a
half-open probe slot is given back at once (C07). Other exceptions count as
failures, as resilience4j records every error by default.

Why the state machine is ours: the ``circuitbreaker`` package keeps its
state in the process with a monotonic clock, which no other process can
share; its ``__exit__`` treats a ``CancelledError`` as a success (it resets
the breaker), and once its recovery time has passed it lets every caller
through instead of a bounded number of probes. We reuse what fits: its
failure-predicate builder (``build_failure_predicate``) for the
``is_failure`` argument, and ``CircuitOpen`` is a ``CircuitBreakerError``, so
code that catches that still works.

Local read cache: the last verdict is kept in the process for at most
``cache_seconds`` (0.5 s), and an open verdict never beyond the remaining
open time (C19), so a transition reaches every instance within a second.
Half-open is never cached: each probe claim goes to Redis. A cached
"closed" lets ``acquire`` admit without a round trip (outcomes always go to
Redis), so an instance may admit calls for up to ``cache_seconds`` after
another one opened the breaker; any outcome it records refreshes the cache.

Redis unreachable (connection error or the client's short timeout, C21):
the breaker falls back to an in-process breaker with the same policy and
logs one WARNING; it tries Redis again once per ``REDIS_RETRY_SECONDS``, not
on every call, and logs one WARNING when Redis is back.

Note: the local fallback starts closed and counts only this process's
calls, so during an outage the fleet-wide probe bound does not hold, and a
provider that was open in Redis is tried again by each process until its own
threshold trips. Outcomes of permits taken before Redis was lost are
recorded locally; their Redis probe slots expire after the probe timeout.
"""

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import redis
import redis.asyncio as aioredis
from circuitbreaker import CircuitBreakerError, build_failure_predicate
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm.errors import PermanentError

from . import redis_client
from .errors import ResilienceError

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger(__name__)

SCRIPT = redis_client.LuaScript.load("breaker_transition.lua", "breaker")
# Buckets per sliding window: the window slides in steps of 1/20 of its length.
WINDOW_BUCKETS = 20
# While Redis is unreachable, try it again this often, not on every call.
REDIS_RETRY_SECONDS = 1.0
CACHE_SECONDS = 0.5
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

Clock = Callable[[], float]
FailurePredicate = Callable[[type[BaseException], BaseException], bool]


@dataclass(frozen=True)
class BreakerPolicy:
    """When a provider's breaker opens and how it recovers.

    ``failure_threshold`` consecutive failures open it; so does a failure
    rate of ``failure_rate_percent`` or more over at least ``minimum_calls``
    calls in the last ``window_seconds``. 0 disables either criterion.
    """

    failure_threshold: int = 5
    failure_rate_percent: float = 50
    window_seconds: float = 30
    minimum_calls: int = 10
    recovery_timeout_seconds: float = 30
    half_open_probes: int = 1
    probe_timeout_seconds: float = 30

    def __post_init__(self) -> None:
        if self.half_open_probes < 1:
            raise ValueError("half_open_probes must be at least 1")
        if self.window_seconds <= 0 or self.probe_timeout_seconds <= 0:
            raise ValueError("window_seconds and probe_timeout_seconds must be > 0")
        numbers = (self.failure_threshold, self.failure_rate_percent)
        if min(*numbers, self.minimum_calls, self.recovery_timeout_seconds) < 0:
            raise ValueError("breaker policy values must not be negative")

    def script_args(self) -> list[int | float]:
        """Return ARGV[4:] of the transition script."""
        window_ms = _ms(self.window_seconds)
        return [
            self.failure_threshold,
            self.failure_rate_percent,
            window_ms,
            self.minimum_calls,
            _ms(self.recovery_timeout_seconds),
            self.half_open_probes,
            _ms(self.probe_timeout_seconds),
            max(1, math.ceil(window_ms / WINDOW_BUCKETS)),
        ]


class CircuitOpen(ResilienceError, CircuitBreakerError):
    """The provider's breaker is open: fail fast, come back in ``retry_after``.

    ``retry_after`` is the time until a probe can next be admitted, or None
    when an operator forced the breaker open.
    """

    code = "provider_unavailable"
    status = 503

    def __init__(self, provider: str, retry_after: float | None) -> None:
        message = f"provider {provider} is unavailable (circuit open)"
        # Both bases take different first arguments; set what each reads.
        Exception.__init__(self, message)
        self.message = message
        self.retry_after = retry_after
        self.provider = provider
        self._circuit_breaker = None

    def __str__(self) -> str:
        return self.message


class Outcome(Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"


def _provider_failure(exc_type: type[BaseException], exc: BaseException) -> bool:
    return not issubclass(exc_type, PermanentError)


def classify(
    exc: BaseException | None, is_failure: FailurePredicate = _provider_failure
) -> Outcome:
    """Return what a call that ended with ``exc`` (None: no error) counts as.

    Non-``Exception`` errors are checked first and are always CANCELLED, so
    no predicate can turn a cancellation into a success or failure (C07).
    """
    if exc is None:
        return Outcome.SUCCESS
    if not isinstance(exc, Exception):
        return Outcome.CANCELLED
    return Outcome.FAILURE if is_failure(type(exc), exc) else Outcome.SUCCESS


@dataclass(frozen=True)
class Permit:
    """The right to make one call; give it back with one ``record_*``."""

    provider: str
    token: str
    probe: bool = False


@dataclass(frozen=True)
class BreakerState:
    """A breaker as the status page shows it; times are epoch seconds."""

    provider: str
    state: str
    failures: int
    window_calls: int
    window_failures: int
    probes_in_flight: int
    opened_at: float | None
    next_probe_at: float | None
    backend: str = "redis"


@dataclass(frozen=True)
class _Result:
    """One transition's answer, from the script or the local machine."""

    verdict: str
    state: str
    consecutive: int
    opened_at_ms: int
    next_probe_ms: int
    now_ms: int
    changed: bool
    window_calls: int
    window_failures: int
    in_flight: int

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> "_Result":
        text = [v.decode() if isinstance(v, bytes) else v for v in raw]
        numbers = [int(v) for v in text[2:]]
        return cls(
            text[0],
            text[1],
            numbers[0],
            numbers[1],
            numbers[2],
            numbers[3],
            bool(numbers[4]),
            *numbers[5:],
        )

    def retry_after(self) -> float | None:
        if self.next_probe_ms < 0:
            return None
        return max(0.0, (self.next_probe_ms - self.now_ms) / 1000)

    def as_state(self, provider: str, backend: str) -> BreakerState:
        next_probe = None if self.next_probe_ms < 0 else self.next_probe_ms / 1000
        return BreakerState(
            provider=provider,
            state=self.state,
            failures=self.consecutive,
            window_calls=self.window_calls,
            window_failures=self.window_failures,
            probes_in_flight=self.in_flight,
            opened_at=self.opened_at_ms / 1000 if self.opened_at_ms else None,
            next_probe_at=next_probe if self.next_probe_ms else None,
            backend=backend,
        )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _keys(provider: str) -> list[str]:
    base = redis_client.key("breaker", provider)
    return [base, f"{base}:probes", f"{base}:window"]


def _script_args(
    op: str, now: float | None, token: str, policy: BreakerPolicy
) -> list[Any]:
    return [op, "" if now is None else _ms(now), token, *policy.script_args()]


class LocalMachine:
    """The same state machine as the Lua script, in this process only.

    The fallback while Redis is unreachable. It follows the script step by
    step; the contract tests run the same behaviours against both.
    """

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state = "closed"
        self.consecutive = 0
        self.opened_at = 0
        self.successes = 0
        self.probes: dict[str, int] = {}
        self.window: dict[int, list[int]] = {}
        self._trip_counts: tuple[int, int] | None = None

    def apply(self, op: str, now: float, token: str) -> _Result:
        """Run ``op`` at ``now`` (seconds) and return the script's answer."""
        now_ms = _ms(now)
        before = self.state
        self._refresh(now_ms)
        verdict = self._dispatch(op, now_ms, token)
        return self._result(verdict, now_ms, self.state != before)

    def _refresh(self, now: int) -> None:
        recovery = _ms(self.policy.recovery_timeout_seconds)
        if self.state == "open" and now >= self.opened_at + recovery:
            self.state, self.successes = "half_open", 0
            self.probes.clear()
        if self.state == "half_open":
            self.probes = {t: exp for t, exp in self.probes.items() if exp > now}

    def _dispatch(self, op: str, now: int, token: str) -> str:
        handler = getattr(self, f"_on_{op}", None)
        if handler is None:
            raise ValueError(f"unknown breaker op {op}")
        return str(handler(now, token) or "ok")

    def _on_acquire(self, now: int, token: str) -> str:
        if self.state in ("closed", "forced_closed"):
            return "admit"
        if self.state != "half_open":
            return "reject"
        if self.successes + len(self.probes) >= self.policy.half_open_probes:
            return "reject"
        self.probes[token] = now + _ms(self.policy.probe_timeout_seconds)
        return "probe"

    def _on_success(self, now: int, token: str) -> None:
        if self.state == "closed":
            self.consecutive = 0
            self._count(now, failed=False)
        elif self.state == "half_open" and token in self.probes:
            del self.probes[token]
            self.successes += 1
            if self.successes >= self.policy.half_open_probes:
                self._close()

    def _on_failure(self, now: int, token: str) -> None:
        if self.state == "closed":
            self.consecutive += 1
            self._count(now, failed=True)
            if self._should_trip(now):
                self._trip(now)
        elif self.state == "half_open":
            self.consecutive += 1
            self._trip(now)

    def _on_cancelled(self, now: int, token: str) -> None:
        self.probes.pop(token, None)

    def _on_state(self, now: int, token: str) -> None:
        return None

    def _on_force_open(self, now: int, token: str) -> None:
        self.state, self.opened_at = "forced_open", now
        self.probes.clear()

    def _on_force_closed(self, now: int, token: str) -> None:
        self._close()
        self.state = "forced_closed"

    def _on_reset(self, now: int, token: str) -> None:
        self._close()
        self.opened_at = 0

    def _close(self) -> None:
        self.state, self.consecutive, self.successes = "closed", 0, 0
        self.probes.clear()
        self.window.clear()

    def _trip(self, now: int) -> None:
        self.state, self.opened_at, self.successes = "open", now, 0
        self.probes.clear()
        self.window.clear()

    def _bucket_ms(self) -> int:
        return int(self.policy.script_args()[-1])

    def _count(self, now: int, failed: bool) -> None:
        counts = self.window.setdefault(now // self._bucket_ms(), [0, 0])
        counts[0] += 1
        counts[1] += int(failed)

    def _window_counts(self, now: int) -> tuple[int, int]:
        size = self._bucket_ms()
        oldest = now // size - math.ceil(_ms(self.policy.window_seconds) / size) + 1
        self.window = {b: c for b, c in self.window.items() if b >= oldest}
        return sum(c[0] for c in self.window.values()), sum(
            c[1] for c in self.window.values()
        )

    def _should_trip(self, now: int) -> bool:
        policy = self.policy
        calls, fails = self._window_counts(now)
        self._trip_counts = (calls, fails)
        if policy.failure_threshold and self.consecutive >= policy.failure_threshold:
            return True
        return (
            policy.failure_rate_percent > 0
            and calls >= max(1, policy.minimum_calls)
            and fails * 100 >= policy.failure_rate_percent * calls
        )

    def _next_probe(self, verdict: str, now: int) -> int:
        if self.state == "open":
            return self.opened_at + _ms(self.policy.recovery_timeout_seconds)
        if self.state == "forced_open":
            return -1
        if self.state == "half_open" and verdict == "reject":
            return min(self.probes.values(), default=now)
        return 0

    def _result(self, verdict: str, now: int, changed: bool) -> _Result:
        calls, fails = self._trip_counts or self._window_counts(now)
        self._trip_counts = None
        in_flight = len(self.probes) if self.state == "half_open" else 0
        return _Result(
            verdict,
            self.state,
            self.consecutive,
            self.opened_at,
            self._next_probe(verdict, now),
            now,
            changed,
            calls,
            fails,
            in_flight,
        )


@dataclass
class _Cached:
    admit: bool
    until: float
    reopen_at: float | None


class AsyncCircuitBreaker:
    """The breaker of one provider, for the asyncio stream path.

    Take a permit with ``acquire`` before each provider call and give it
    back with exactly one of ``record_success``, ``record_failure``,
    ``record_cancelled`` (or ``record(permit, exc)``, which classifies),
    or wrap the call in ``async with breaker.guard():``.

    ``clock`` overrides Redis's ``TIME`` in the script and drives the local
    cache and fallback (tests only); None uses Redis's clock for state and
    ``time.monotonic`` for the cache. ``redis`` defaults to the running
    loop's client. ``is_failure`` takes anything
    ``circuitbreaker.build_failure_predicate`` accepts (exception types or a
    ``(type, exc) -> bool`` predicate).
    """

    def __init__(
        self,
        provider: str,
        policy: BreakerPolicy | None = None,
        *,
        redis: aioredis.Redis | None = None,
        clock: Clock | None = None,
        cache_seconds: float = CACHE_SECONDS,
        is_failure: Any = _provider_failure,
    ) -> None:
        self.provider = provider
        self.policy = policy or BreakerPolicy()
        self._redis = redis
        self._clock = clock
        self._local_clock = clock or time.monotonic
        self._cache_seconds = cache_seconds
        self._is_failure: FailurePredicate = build_failure_predicate(is_failure)
        self._keys = _keys(provider)
        self._local = LocalMachine(self.policy)
        self._cache: _Cached | None = None
        self._redis_down = False
        self._retry_redis_at = 0.0

    async def acquire(self) -> Permit:
        """Return a permit for one call, or raise ``CircuitOpen``."""
        cached = self._cached()
        if cached is not None:
            if cached.admit:
                return Permit(self.provider, "")
            raise CircuitOpen(self.provider, self._cached_retry_after(cached))
        token = uuid.uuid4().hex
        result = await self._apply("acquire", token)
        if result.verdict == "reject":
            raise CircuitOpen(self.provider, result.retry_after())
        return Permit(self.provider, token, probe=result.verdict == "probe")

    async def record(self, permit: Permit, exc: BaseException | None) -> Outcome:
        """Record the outcome of a call that ended with ``exc`` (None: fine)."""
        outcome = classify(exc, self._is_failure)
        await self._record(permit, outcome)
        return outcome

    async def record_success(self, permit: Permit) -> None:
        """Record that the call succeeded (or was refused by the caller's fault)."""
        await self._record(permit, Outcome.SUCCESS)

    async def record_failure(self, permit: Permit) -> None:
        """Record that the provider failed this call."""
        await self._record(permit, Outcome.FAILURE)

    async def record_cancelled(self, permit: Permit) -> None:
        """Record that the call was abandoned: free its probe slot, count nothing."""
        await self._record(permit, Outcome.CANCELLED)

    def known_open(self) -> float | None:
        """Return seconds until a probe if the local cache says open, else None.

        Costs no Redis round trip: admission uses it to refuse a request whose
        every provider is known to be open. A cold cache answers None.
        """
        cached = self._cached()
        if cached is None or cached.admit:
            return None
        wait = self._cached_retry_after(cached)
        # Forced open has no probe time: suggest one recovery period rather
        # than invite a retry every second.
        return self.policy.recovery_timeout_seconds if wait is None else wait

    async def aknown_open(self) -> float | None:
        """Like ``known_open``, but read Redis once when the cache is cold.

        So admission refuses with 503 whenever every provider is open, not
        only once this instance has seen it: at most one round trip per
        provider per ``cache_seconds``.
        """
        if self._cached() is None:
            await self._apply("state", "")
        return self.known_open()

    def guard(self) -> "BreakerGuard":
        """Return ``async with`` guard: acquire on enter, classify on exit."""
        return BreakerGuard(self)

    def __call__(
        self, func: Callable[P, Awaitable[T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so each call runs inside ``guard()``.

        The ``circuitbreaker`` package's decorator shape: a call while the
        breaker is open raises ``CircuitOpen`` (a ``CircuitBreakerError``)
        without running the function.
        """

        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            async with self.guard():
                return await func(*args, **kwargs)

        return guarded

    async def state(self) -> BreakerState:
        """Return the current state (Redis's, or the local fallback's)."""
        result = await self._apply("state", "")
        backend = "local" if self._redis_down else "redis"
        return result.as_state(self.provider, backend)

    async def force_open(self) -> BreakerState:
        """Open the breaker fleet-wide until ``force_closed`` or ``reset``."""
        return await self._admin("force_open")

    async def force_closed(self) -> BreakerState:
        """Keep the breaker closed fleet-wide, whatever fails, until ``reset``."""
        return await self._admin("force_closed")

    async def reset(self) -> BreakerState:
        """Forget all counts and close the breaker fleet-wide."""
        return await self._admin("reset")

    async def _admin(self, op: str) -> BreakerState:
        try:
            result = await self._run_redis(op, "")
        except UNREACHABLE as exc:
            raise _unreachable(self.provider) from exc
        self._cache = None
        return result.as_state(self.provider, "redis")

    async def _record(self, permit: Permit, outcome: Outcome) -> None:
        if outcome is Outcome.CANCELLED and not permit.probe:
            return
        await self._apply(outcome.value, permit.token)

    async def _apply(self, op: str, token: str) -> _Result:
        if self._redis_usable():
            try:
                result = await self._run_redis(op, token)
            except UNREACHABLE as exc:
                self._lost_redis(exc)
            else:
                self._found_redis()
                return self._seen(result, "redis")
        now = self._clock() if self._clock else time.time()
        return self._seen(self._local.apply(op, now, token), "local")

    async def _run_redis(self, op: str, token: str) -> _Result:
        client = self._redis or redis_client.async_client()
        now = self._clock() if self._clock else None
        args = _script_args(op, now, token, self.policy)
        return _Result.parse(await SCRIPT.run(self._keys, args, client))

    def _seen(self, result: _Result, backend: str) -> _Result:
        if result.changed:
            _log_transition(self.provider, result, backend)
        self._remember(result)
        return result

    def _remember(self, result: _Result) -> None:
        now = self._local_clock()
        if result.state in ("closed", "forced_closed"):
            self._cache = _Cached(True, now + self._cache_seconds, None)
        elif result.state in ("open", "forced_open"):
            wait = result.retry_after()
            ttl = self._cache_seconds if wait is None else wait
            reopen = None if wait is None else now + wait
            self._cache = _Cached(False, now + min(self._cache_seconds, ttl), reopen)
        else:
            self._cache = None

    def _cached(self) -> _Cached | None:
        cached = self._cache
        if cached is None or self._local_clock() >= cached.until:
            return None
        return cached

    def _cached_retry_after(self, cached: _Cached) -> float | None:
        if cached.reopen_at is None:
            return None
        return max(0.0, cached.reopen_at - self._local_clock())

    def _redis_usable(self) -> bool:
        return not self._redis_down or self._local_clock() >= self._retry_redis_at

    def _lost_redis(self, exc: BaseException) -> None:
        self._retry_redis_at = self._local_clock() + REDIS_RETRY_SECONDS
        if not self._redis_down:
            self._redis_down = True
            logger.warning(
                "breaker %s: redis unreachable (%s), using a local breaker",
                self.provider,
                type(exc).__name__,
            )

    def _found_redis(self) -> None:
        if self._redis_down:
            self._redis_down = False
            logger.warning(
                "breaker %s: redis is back, using the shared breaker", self.provider
            )


class BreakerGuard:
    """``async with`` a breaker: the permit on enter, the outcome on exit.

    A timeout must be raised inside the guard (as a ``TransientError``); an
    ``asyncio.timeout`` around it cancels the task, which the guard can only
    see as a cancellation.
    """

    def __init__(self, breaker: AsyncCircuitBreaker) -> None:
        self.breaker = breaker
        self.permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self.permit = await self.breaker.acquire()
        return self.permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.permit is not None:
            await self.breaker.record(self.permit, exc)


class CircuitBreaker:
    """The synchronous admin side of a provider's breaker (Django admin).

    Runs the same script as ``AsyncCircuitBreaker``; it never takes permits.
    Raises ``ResilienceError`` when Redis is unreachable.
    """

    def __init__(
        self,
        provider: str,
        policy: BreakerPolicy | None = None,
        *,
        redis: redis.Redis | None = None,
    ) -> None:
        self.provider = provider
        self.policy = policy or BreakerPolicy()
        self._redis = redis
        self._keys = _keys(provider)

    def state(self) -> BreakerState:
        """Return the breaker's shared state."""
        return self._run("state")

    def force_open(self) -> BreakerState:
        """Open the breaker fleet-wide until ``force_closed`` or ``reset``."""
        return self._run("force_open")

    def force_closed(self) -> BreakerState:
        """Keep the breaker closed fleet-wide until ``reset``."""
        return self._run("force_closed")

    def reset(self) -> BreakerState:
        """Forget all counts and close the breaker fleet-wide."""
        return self._run("reset")

    def _run(self, op: str) -> BreakerState:
        client = self._redis or redis_client.sync_client()
        try:
            args = _script_args(op, None, "", self.policy)
            result = _Result.parse(SCRIPT.run_sync(self._keys, args, client))
        except UNREACHABLE as exc:
            raise _unreachable(self.provider) from exc
        if result.changed:
            _log_transition(self.provider, result, "redis")
        return result.as_state(self.provider, "redis")


def _unreachable(provider: str) -> ResilienceError:
    return ResilienceError(f"breaker {provider}: redis unreachable")


def _log_transition(provider: str, result: _Result, backend: str) -> None:
    where = "" if backend == "redis" else " (local fallback)"
    _keep_transition(provider, result.state, backend)
    if result.state == "open":
        logger.warning(
            "breaker %s: open after %d failures (%d of %d calls in the window)%s",
            provider,
            result.consecutive,
            result.window_failures,
            result.window_calls,
            where,
        )
    elif result.state == "half_open":
        logger.warning("breaker %s: half-open, probing%s", provider, where)
    else:
        logger.warning("breaker %s: %s%s", provider, result.state, where)


def _keep_transition(provider: str, state: str, backend: str) -> None:
    """Add the transition to the status page's log, off the event loop."""
    from .stats import record_transition

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        record_transition(provider, state, backend)
        return
    loop.run_in_executor(None, record_transition, provider, state, backend)


__all__ = [
    "AsyncCircuitBreaker",
    "BreakerGuard",
    "BreakerPolicy",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "LocalMachine",
    "Outcome",
    "Permit",
    "classify",
]
