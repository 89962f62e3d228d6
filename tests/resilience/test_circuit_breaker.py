"""The breaker's contract, run against Redis and against the local fallback.

Times come from an injected clock that the Lua script also uses, so
recovery and probe timeouts pass without sleeping.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from circuitbreaker import CircuitBreakerError
from django.conf import settings

from llm.errors import ProviderRejected, ProviderServerError
from resilience.circuit_breaker import (
    AsyncCircuitBreaker,
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpen,
    Outcome,
    classify,
)
from streamsvc.embedded_redis import free_port

LOGGER = "resilience.circuit_breaker"
MakeBreaker = Callable[..., AsyncCircuitBreaker]


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


@contextmanager
def captured(name: str = LOGGER) -> Iterator[ListHandler]:
    """Collect a logger's records (the suite runs with ``-p no:logging``)."""
    logger = logging.getLogger(name)
    handler = ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def fail(breaker: AsyncCircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        await breaker.record_failure(await breaker.acquire())


async def succeed(breaker: AsyncCircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        await breaker.record_success(await breaker.acquire())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def aclient(redis: Any) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def dead_client() -> AsyncIterator[aioredis.Redis]:
    """A client of a port nobody listens on: every call fails to connect."""
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)
    yield client
    await client.aclose()


@pytest.fixture(params=["redis", "local"])
def make_breaker(
    request: pytest.FixtureRequest,
    clock: FakeClock,
    aclient: aioredis.Redis,
    dead_client: aioredis.Redis,
) -> MakeBreaker:
    client = aclient if request.param == "redis" else dead_client

    def make(provider: str = "p1", **policy: Any) -> AsyncCircuitBreaker:
        defaults: dict[str, Any] = {"failure_threshold": 3, "failure_rate_percent": 0}
        cache_seconds = policy.pop("cache_seconds", 0.5)
        return AsyncCircuitBreaker(
            provider,
            BreakerPolicy(**{**defaults, **policy}),
            redis=client,
            clock=clock,
            cache_seconds=cache_seconds,
        )

    return make


async def open_breaker(make: MakeBreaker, **policy: Any) -> AsyncCircuitBreaker:
    breaker = make(**policy)
    await fail(breaker, breaker.policy.failure_threshold)
    return breaker


class TestContract:
    """Behaviours both the shared breaker and its local fallback keep."""

    async def test_opens_after_threshold_failures_and_fails_fast(
        self, make_breaker: MakeBreaker
    ) -> None:
        breaker = make_breaker(recovery_timeout_seconds=30)
        await fail(breaker, 2)
        assert (await breaker.state()).state == "closed"
        await fail(breaker)

        with pytest.raises(CircuitOpen) as caught:
            await breaker.acquire()
        assert caught.value.retry_after == pytest.approx(30)
        assert caught.value.code == "provider_unavailable"
        assert caught.value.status == 503
        assert caught.value.provider == "p1"
        assert isinstance(caught.value, CircuitBreakerError)
        state = await breaker.state()
        assert (state.state, state.failures) == ("open", 3)

    async def test_a_success_resets_the_consecutive_count(
        self, make_breaker: MakeBreaker
    ) -> None:
        breaker = make_breaker()
        await fail(breaker, 2)
        await succeed(breaker)
        await fail(breaker, 2)
        assert (await breaker.state()).state == "closed"

    async def test_opens_on_failure_rate_once_minimum_calls_are_reached(
        self, make_breaker: MakeBreaker
    ) -> None:
        breaker = make_breaker(
            failure_threshold=0, failure_rate_percent=50, minimum_calls=10
        )
        for _ in range(4):
            await fail(breaker)
            await succeed(breaker)
        await succeed(breaker)
        assert (await breaker.state()).state == "closed"  # 9 calls, 4 failed

        await fail(breaker)  # 10 calls, 5 failed: 50 %
        state = await breaker.state()
        assert state.state == "open"

    async def test_failure_rate_forgets_calls_older_than_the_window(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = make_breaker(
            failure_threshold=0, minimum_calls=10, failure_rate_percent=50
        )
        await fail(breaker, 9)  # below minimum_calls: still closed
        clock.advance(31)
        await fail(breaker)  # counted with the old nine, this would open it

        state = await breaker.state()
        assert (state.state, state.window_calls, state.window_failures) == (
            "closed",
            1,
            1,
        )

    async def test_half_open_admits_exactly_the_probes_after_recovery(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = await open_breaker(
            make_breaker, half_open_probes=2, probe_timeout_seconds=10
        )
        clock.advance(29.9)
        with pytest.raises(CircuitOpen):
            await breaker.acquire()
        clock.advance(0.1)

        results = [await _try(breaker) for _ in range(5)]
        probes = [r for r in results if not isinstance(r, CircuitOpen)]
        assert len(probes) == 2 and all(p.probe for p in probes)
        assert results[-1].retry_after == pytest.approx(10)

    async def test_probes_that_all_succeed_close_it(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = await open_breaker(make_breaker, half_open_probes=2)
        clock.advance(30)
        first, second = await breaker.acquire(), await breaker.acquire()
        await breaker.record_success(first)
        assert (await breaker.state()).state == "half_open"
        await breaker.record_success(second)

        state = await breaker.state()
        assert (state.state, state.failures) == ("closed", 0)
        await succeed(breaker, 5)

    async def test_a_failing_probe_reopens_it_for_a_full_recovery_time(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = await open_breaker(make_breaker, recovery_timeout_seconds=30)
        clock.advance(40)
        await fail(breaker)

        with pytest.raises(CircuitOpen) as caught:
            await breaker.acquire()
        assert caught.value.retry_after == pytest.approx(30)

    async def test_c07_a_cancelled_probe_frees_its_slot_and_closes_nothing(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = await open_breaker(make_breaker)
        clock.advance(30)
        with pytest.raises(asyncio.CancelledError):
            async with breaker.guard():
                raise asyncio.CancelledError

        assert (await breaker.state()).state == "half_open"
        probe = await breaker.acquire()
        assert probe.probe

    async def test_c07_a_probe_past_its_timeout_frees_its_slot(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = await open_breaker(make_breaker, probe_timeout_seconds=5)
        clock.advance(30)
        lost = await breaker.acquire()  # its holder dies without recording
        with pytest.raises(CircuitOpen):
            await breaker.acquire()
        clock.advance(5)

        assert (await breaker.acquire()).probe
        await breaker.record_success(lost)  # too late: the slot is gone
        assert (await breaker.state()).state == "half_open"

    async def test_the_decorator_guards_each_call_and_fails_fast_when_open(
        self, make_breaker: MakeBreaker
    ) -> None:
        breaker = make_breaker(failure_threshold=2)
        calls: list[str] = []

        @breaker
        async def call(answer: str) -> str:
            calls.append(answer)
            if answer == "boom":
                raise ProviderServerError("upstream 502", status=502)
            return answer

        assert await call("ok") == "ok"
        for _ in range(2):
            with pytest.raises(ProviderServerError):
                await call("boom")
        with pytest.raises(CircuitBreakerError):  # the package's error shape
            await call("never runs")
        assert calls == ["ok", "boom", "boom"]
        assert call.__name__ == "call"

    async def test_c08_client_errors_do_not_count(
        self, make_breaker: MakeBreaker
    ) -> None:
        breaker = make_breaker()
        for _ in range(20):
            with pytest.raises(ProviderRejected):
                async with breaker.guard():
                    raise ProviderRejected("bad request", status=400)

        state = await breaker.state()
        assert (state.state, state.failures) == ("closed", 0)

    @pytest.mark.parametrize(
        "exc", [asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit]
    )
    async def test_c07_cancellations_count_neither_way(
        self, make_breaker: MakeBreaker, exc: type[BaseException]
    ) -> None:
        breaker = make_breaker()
        await fail(breaker, 2)
        with pytest.raises(exc):
            async with breaker.guard():
                raise exc

        assert (await breaker.state()).failures == 2

    async def test_c19_open_is_cached_no_longer_than_the_remaining_open_time(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = await open_breaker(
            make_breaker, recovery_timeout_seconds=2, cache_seconds=60
        )
        with pytest.raises(CircuitOpen):
            await breaker.acquire()
        clock.advance(2)

        assert (await breaker.acquire()).probe

    async def test_each_transition_is_logged_once_at_warning(
        self, make_breaker: MakeBreaker, clock: FakeClock
    ) -> None:
        breaker = make_breaker()
        with captured() as log:
            await fail(breaker, 3)
            for _ in range(3):
                await _try(breaker)
            clock.advance(30)
            await succeed(breaker)

        messages = [m for m in log.warnings() if "redis" not in m]
        assert messages[0].startswith("breaker p1: open after 3 failures")
        assert [m.split(":")[1].split()[0] for m in messages] == [
            "open",
            "half-open,",
            "closed",
        ]


async def _try(breaker: AsyncCircuitBreaker) -> Any:
    try:
        return await breaker.acquire()
    except CircuitOpen as exc:
        return exc


def test_classify_puts_cancellation_before_any_predicate() -> None:
    def always(exc_type: type[BaseException], exc: BaseException) -> bool:
        return True

    assert classify(asyncio.CancelledError(), always) is Outcome.CANCELLED
    assert classify(ProviderRejected("no")) is Outcome.SUCCESS
    assert classify(ProviderServerError("503")) is Outcome.FAILURE
    assert classify(None) is Outcome.SUCCESS


class TestShared:
    """Behaviours that need the state in Redis."""

    async def test_failures_from_two_instances_open_it_for_both(
        self, aclient: aioredis.Redis, clock: FakeClock
    ) -> None:
        policy = BreakerPolicy(failure_threshold=4, failure_rate_percent=0)
        first = AsyncCircuitBreaker("p1", policy, redis=aclient, clock=clock)
        second = AsyncCircuitBreaker("p1", policy, redis=aclient, clock=clock)
        await fail(first, 2)
        await fail(second, 2)
        with pytest.raises(CircuitOpen):
            await second.acquire()
        clock.advance(0.5)  # the longest a local "closed" verdict is kept

        for breaker in (first, second):
            with pytest.raises(CircuitOpen):
                await breaker.acquire()

    async def test_a_burst_of_50_across_instances_gets_exactly_2_probes(
        self, redis: Any, clock: FakeClock
    ) -> None:
        policy = BreakerPolicy(
            failure_threshold=1, failure_rate_percent=0, half_open_probes=2
        )
        clients = [aioredis.Redis.from_url(settings.REDIS_URL) for _ in range(3)]
        breakers = [
            AsyncCircuitBreaker("p1", policy, redis=c, clock=clock) for c in clients
        ]
        await fail(breakers[0])
        clock.advance(30)
        try:
            results = await asyncio.gather(*(_try(breakers[i % 3]) for i in range(50)))
        finally:
            for client in clients:
                await client.aclose()

        assert sum(not isinstance(r, CircuitOpen) for r in results) == 2

    async def test_force_open_closed_and_reset_reach_another_instance_within_1s(
        self, aclient: aioredis.Redis
    ) -> None:
        admin = CircuitBreaker("p1")
        worker = AsyncCircuitBreaker("p1", redis=aclient)
        await succeed(worker)  # the worker now caches "closed"

        admin.force_open()
        assert await _until(lambda r: isinstance(r, CircuitOpen), worker)
        assert (await worker.state()).state == "forced_open"
        admin.force_closed()
        assert await _until(lambda r: not isinstance(r, CircuitOpen), worker)
        await fail(worker, 10)
        assert (await worker.state()).state == "forced_closed"

        await worker.force_open()
        admin.reset()
        assert await _until(lambda r: not isinstance(r, CircuitOpen), worker)
        assert admin.state().state == "closed"

    async def test_the_sync_admin_reads_the_same_state(
        self, aclient: aioredis.Redis, clock: FakeClock
    ) -> None:
        breaker = AsyncCircuitBreaker("p1", redis=aclient)
        await fail(breaker, 5)

        shown = CircuitBreaker("p1").state()
        assert shown == await breaker.state()
        assert shown.state == "open" and shown.failures == 5
        assert shown.opened_at is not None and shown.next_probe_at is not None
        assert shown.next_probe_at - shown.opened_at == pytest.approx(30)


async def _until(
    check: Callable[[Any], bool], breaker: AsyncCircuitBreaker, within: float = 1.0
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if check(await _try(breaker)):
            return True
        await asyncio.sleep(0.02)
    return False
