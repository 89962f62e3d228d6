"""Retries before the first item: timing by an injected clock, no sleeps."""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.conf import settings

from llm.base import Finish, TextDelta
from llm.errors import (
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderStreamError,
)
from resilience.circuit_breaker import AsyncCircuitBreaker, BreakerPolicy, CircuitOpen
from resilience.retry_strategy import Retrier, RetryPolicy
from tests.resilience.test_circuit_breaker import FakeClock, fail


class FakeTime:
    """A clock and a sleep that moves it: every wait is recorded, none is real."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)


class Upstream:
    """An attempt that fails with the queued errors, then answers ``value``."""

    def __init__(self, *errors: BaseException, value: str = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def breaker(redis: Any, fake: FakeTime) -> AsyncIterator[AsyncCircuitBreaker]:
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    policy = BreakerPolicy(failure_threshold=10, failure_rate_percent=0)
    yield AsyncCircuitBreaker("p1", policy, redis=client, clock=fake.clock)
    await client.aclose()


def retrier(fake: FakeTime, random: Callable[[], float] = lambda: 1.0, **policy: Any):
    return Retrier(
        RetryPolicy(**policy), sleep=fake.sleep, random=random, clock=fake.clock
    )


def server_error() -> ProviderServerError:
    return ProviderServerError("503", status=503)


async def test_waits_follow_full_jitter_under_the_exponential_cap(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    draws = iter([1.0, 0.5, 1.0, 0.25, 1.0])
    upstream = Upstream(*(server_error() for _ in range(5)))
    run = retrier(fake, lambda: next(draws), max_attempts=6, max_total_seconds=99)

    opened = await run.open(upstream, breaker)

    assert opened.value == "ok" and upstream.calls == 6
    # caps 0.5, 1, 2, 4, 8 (max_delay), times the draws
    assert fake.sleeps == [0.5, 0.5, 2.0, 1.0, 8.0]


async def test_zero_draws_retry_at_once_and_the_last_error_ends_it(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    upstream = Upstream(*(server_error() for _ in range(3)))
    with pytest.raises(ProviderServerError):
        await retrier(fake, lambda: 0.0).open(upstream, breaker)

    assert upstream.calls == 3 and fake.sleeps == [0.0, 0.0]
    assert (await breaker.state()).failures == 3


async def test_no_wait_ends_past_the_total_budget(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    upstream = Upstream(*(server_error() for _ in range(9)))
    run = retrier(fake, max_attempts=10, max_delay_seconds=100, max_total_seconds=10)

    with pytest.raises(ProviderServerError):
        await run.open(upstream, breaker)

    assert fake.sleeps == [0.5, 1.0, 2.0, 4.0]  # the next 8 s would end at 15.5
    assert sum(fake.sleeps) <= 10


async def test_c14_retry_after_replaces_the_backoff(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    upstream = Upstream(ProviderRateLimited("429", status=429, retry_after=3.25))
    opened = await retrier(fake).open(upstream, breaker)

    assert opened.value == "ok" and fake.sleeps == [3.25]


async def test_c14_a_retry_after_beyond_the_budget_fails_at_once(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    limited = ProviderRateLimited("429", status=429, retry_after=30)
    upstream = Upstream(limited)
    with pytest.raises(ProviderRateLimited) as caught:
        await retrier(fake, max_total_seconds=20).open(upstream, breaker)

    assert caught.value is limited
    assert upstream.calls == 1 and fake.sleeps == []


async def test_c08_twenty_rejections_are_not_retried_and_leave_it_closed(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    run = retrier(fake)
    for _ in range(20):
        upstream = Upstream(ProviderRejected("bad request", status=400))
        with pytest.raises(ProviderRejected):
            await run.open(upstream, breaker)
        assert upstream.calls == 1

    assert fake.sleeps == []
    state = await breaker.state()
    assert (state.state, state.failures) == ("closed", 0)
    assert (await run.open(Upstream(), breaker)).value == "ok"


async def test_c18_cancelled_in_a_backoff_sleep_stops_at_once(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    sleeping = asyncio.Event()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            sleeping.set()
            await asyncio.Event().wait()

    upstream = Upstream(*(server_error() for _ in range(3)))
    run = Retrier(
        RetryPolicy(max_attempts=4, base_delay_seconds=1, max_total_seconds=60),
        sleep=sleep,
        random=lambda: 1.0,
        clock=fake.clock,
    )
    task = asyncio.create_task(run.open(upstream, breaker))
    await asyncio.wait_for(sleeping.wait(), 1)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert waits == [1.0, 2.0]
    assert upstream.calls == 2
    assert (await breaker.state()).failures == 2


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit]
)
async def test_c18_cancellations_are_never_retried_whatever_the_predicate(
    fake: FakeTime, breaker: AsyncCircuitBreaker, exc: type[BaseException]
) -> None:
    upstream = Upstream(exc())
    run = Retrier(
        RetryPolicy(), sleep=fake.sleep, clock=fake.clock, retryable=lambda e: True
    )
    with pytest.raises(exc):
        await run.open(upstream, breaker)

    assert upstream.calls == 1 and fake.sleeps == []
    assert (await breaker.state()).failures == 0


async def test_an_open_breaker_ends_the_retries(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    await fail(breaker, 8)
    upstream = Upstream(*(server_error() for _ in range(5)))

    with pytest.raises(CircuitOpen):
        await retrier(fake, max_attempts=5, max_total_seconds=99).open(
            upstream, breaker
        )
    assert upstream.calls == 2  # the tenth failure opened it


def items(*parts: Any) -> Callable[[], AsyncIterator[Any]]:
    """Return a stream factory; each call replays ``parts`` (raising errors)."""
    opened: list[int] = []

    async def stream() -> AsyncIterator[Any]:
        opened.append(1)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
            yield part

    stream.opened = opened  # type: ignore[attr-defined]
    return stream


def is_finish(item: Any) -> bool:
    return isinstance(item, Finish)


async def test_stream_retries_the_first_item_then_relays_the_rest(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    failures = [server_error()]

    async def stream() -> AsyncIterator[Any]:
        if failures:
            raise failures.pop()
        yield TextDelta("a")
        yield TextDelta("b")
        yield Finish("stop")

    relay = retrier(fake).stream(stream, breaker, is_end=is_finish)
    async with aclosing(relay):  # type: ignore[type-var]
        got = [item async for item in relay]

    assert got == [TextDelta("a"), TextDelta("b"), Finish("stop")]
    assert fake.sleeps == [0.5]
    state = await breaker.state()
    assert (state.failures, state.window_failures, state.window_calls) == (0, 1, 2)


async def test_c12_an_error_after_the_first_item_is_a_failure_not_retried(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    factory = items(TextDelta("a"), ProviderStreamError("boom"))
    relay = retrier(fake).stream(factory, breaker, is_end=is_finish)
    got: list[Any] = []
    with pytest.raises(ProviderStreamError):
        async for item in relay:
            got.append(item)

    assert got == [TextDelta("a")]
    assert len(factory.opened) == 1 and fake.sleeps == []  # type: ignore[attr-defined]
    assert (await breaker.state()).failures == 1


async def test_c12_an_end_without_the_end_item_counts_a_failure(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    relay = retrier(fake).stream(items(TextDelta("a")), breaker, is_end=is_finish)
    assert [item async for item in relay] == [TextDelta("a")]

    assert (await breaker.state()).failures == 1


async def test_c07_a_probe_stream_dropped_after_its_first_byte(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    await fail(breaker, 10)
    fake.clock.advance(30)
    factory = items(TextDelta("a"), ProviderStreamError("still failing"))
    relay = retrier(fake).stream(factory, breaker, is_end=is_finish)

    async with aclosing(relay):  # type: ignore[type-var]
        assert await anext(relay) == TextDelta("a")  # then the client leaves

    state = await breaker.state()
    assert state.state == "half_open" and state.probes_in_flight == 0
    probe = await breaker.acquire()  # slot freed on cancel, no wait needed
    assert probe.probe
    await breaker.record_failure(probe)
    assert (await breaker.state()).state == "open"


async def test_a_consumer_closing_right_after_the_end_item_is_a_success(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    await fail(breaker, 10)
    fake.clock.advance(30)
    factory = items(TextDelta("a"), Finish("stop"), TextDelta("never"))
    relay = retrier(fake).stream(factory, breaker, is_end=is_finish)

    async with aclosing(relay):  # type: ignore[type-var]
        async for item in relay:
            if isinstance(item, Finish):
                break

    assert (await breaker.state()).state == "closed"


async def test_a_silent_upstream_times_out_and_is_retried(
    fake: FakeTime, breaker: AsyncCircuitBreaker
) -> None:
    hangs = [True]

    async def stream() -> AsyncIterator[Any]:
        if hangs.pop() if hangs else False:
            await asyncio.Event().wait()
        yield Finish("stop")

    relay = retrier(fake).stream(stream, breaker, is_end=is_finish, item_timeout=0.05)
    assert [item async for item in relay] == [Finish("stop")]
    assert (await breaker.state()).window_failures == 1
