"""shared/CASES.md C21 for the rate limiter: Redis stopped or paused.

The session's Redis is stopped (or paused) inside each test and always
restarted in a ``finally``. A stopped server refuses connections at once; a
paused one accepts and does not answer, so only the client's socket timeout
(``REDIS_TIMEOUT_SECONDS``) ends the wait.
"""

import logging
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib
from django.conf import settings

from resilience import redis_client
from resilience.rate_limiter import (
    FAIL_CLOSED,
    AsyncRateLimiter,
    BucketPolicy,
    BucketRef,
    RateLimiterUnavailable,
)
from tests.redis_plugin import redis_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Records(logging.Handler):
    """Collect the limiter's log records (works without pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == logging.WARNING]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("resilience.rate_limiter")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def stopped_redis(redis: redis_lib.Redis) -> Iterator[None]:
    server = redis_server()
    server.stop()
    try:
        yield
    finally:
        if server.process is None or server.process.poll() is not None:
            server.start()
        redis_client.reset_clients()


def ref(capacity: float, rate: float, on_down: str = "fail_open") -> BucketRef:
    policy = BucketPolicy("down", "user", capacity, rate, on_redis_down=on_down)
    return BucketRef(policy, "user:9")


@pytest.mark.timeout(30)
async def test_fail_open_admits_at_the_local_rate_and_recovers(
    stopped_redis: None, records: Records
) -> None:
    clock = FakeClock()
    bucket = ref(3, 1)
    limiter = AsyncRateLimiter(clock=clock, retry_seconds=1.0)

    burst = [await limiter.admit([bucket]) for _ in range(5)]
    clock.advance(0.5)
    refilled = await limiter.admit([bucket])
    clock.advance(0.5)
    later = await limiter.admit([bucket])

    assert [d.allowed for d in burst] == [True, True, True, False, False]
    assert all(d.fallback and d.local for d in burst)
    assert burst[3].retry_after == pytest.approx(1.0)
    assert burst[3].retry_after_seconds == 1
    assert not refilled.allowed
    assert later.allowed
    assert limiter.redis_down
    assert limiter.stats.redis_failures == 2  # once per retry interval
    assert len(records.warnings()) == 1
    assert "unreachable" in records.warnings()[0]

    redis_server().start()
    clock.advance(1.0)
    back = await limiter.admit([bucket])

    assert back.allowed and not back.fallback and not back.local
    assert not limiter.redis_down
    assert len(records.warnings()) == 2
    assert "reachable again" in records.warnings()[1]


@pytest.mark.timeout(30)
async def test_fail_closed_raises_unavailable_with_a_503(
    stopped_redis: None, records: Records
) -> None:
    clock = FakeClock()
    limiter = AsyncRateLimiter(clock=clock)
    closed = ref(3, 1, FAIL_CLOSED)
    open_ = BucketRef(BucketPolicy("open", "global", 3, 1), "global")

    for _ in range(3):
        with pytest.raises(RateLimiterUnavailable) as caught:
            await limiter.admit([open_, closed])

    assert caught.value.code == "rate_limiter_unavailable"
    assert caught.value.status == 503
    assert caught.value.retry_after_seconds == 1
    assert len(records.warnings()) == 1
    assert (await limiter.admit([open_])).fallback


@pytest.mark.timeout(30)
async def test_c21_a_paused_redis_costs_one_timeout_per_interval(
    redis: redis_lib.Redis, records: Records
) -> None:
    bucket = ref(100, 100)
    limiter = AsyncRateLimiter(retry_seconds=0.3)
    limit = float(settings.REDIS_TIMEOUT_SECONDS) + 1.0
    other = redis_lib.Redis.from_url(settings.REDIS_URL)

    other.execute_command("CLIENT", "PAUSE", 2000)
    try:
        started = time.monotonic()
        first = await limiter.admit([bucket])
        first_took = time.monotonic() - started
        started = time.monotonic()
        rest = [await limiter.admit([bucket]) for _ in range(20)]
        rest_took = time.monotonic() - started
    finally:
        other.execute_command("CLIENT", "UNPAUSE")
        other.close()

    assert first.allowed and first.fallback
    assert first_took < limit
    assert all(d.allowed for d in rest)
    assert rest_took < 0.2
    time.sleep(0.35)
    back = await limiter.admit([bucket])
    assert not back.fallback
    warnings = records.warnings()
    assert len(warnings) == 2
    assert "unreachable" in warnings[0] and "reachable again" in warnings[1]
