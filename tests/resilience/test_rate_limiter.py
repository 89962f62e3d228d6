"""shared/CASES.md C09, C14, C15: token buckets, leases and limit numbers.

Every test runs against the session's real Redis. Bucket state lives on
Redis's clock; the limiter's own clock (leases, "empty until") is injected
where the test needs to move it.
"""

import asyncio
import math
import time

import pytest
import redis as redis_lib

from resilience.rate_limiter import (
    AsyncRateLimiter,
    BucketPolicy,
    BucketRef,
    Decision,
    RateLimited,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bucket(
    name: str, capacity: float, rate: float, subject: str = "global"
) -> BucketRef:
    scope = subject.split(":")[0] if ":" in subject else "global"
    return BucketRef(BucketPolicy(name, scope, capacity, rate), subject)


def redis_tokens(redis: redis_lib.Redis, ref: BucketRef) -> float:
    raw = redis.hget(ref.redis_key, "t")
    return float(raw) if raw is not None else ref.policy.capacity


def outstanding_leases(redis: redis_lib.Redis, ref: BucketRef) -> float:
    fields = redis.hgetall(ref.redis_key)
    return sum(float(v) for k, v in fields.items() if k.startswith(b"o:"))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("local_cache", [True, False])
async def test_c15_remaining_never_rises_and_agrees_with_the_denial(
    redis: redis_lib.Redis, local_cache: bool
) -> None:
    ref = bucket("c15", 5, 0.2, "user:42")
    limiter = AsyncRateLimiter(local_cache=local_cache)

    admitted = [await limiter.admit([ref]) for _ in range(5)]
    sixth = await limiter.admit([ref])

    assert all(d.allowed for d in admitted)
    assert [d.limit for d in admitted] == [5] * 5
    remaining = [d.remaining for d in admitted]
    assert remaining == sorted(remaining, reverse=True)
    assert remaining[-1] == 0
    assert not sixth.allowed
    assert sixth.policy == "c15"
    assert sixth.remaining == 0
    assert sixth.retry_after == pytest.approx(5.0, abs=0.1)
    assert sixth.retry_after_seconds == 5
    assert sixth.reset == pytest.approx(admitted[-1].reset, abs=0.1)
    assert sixth.retry_after <= sixth.reset


@pytest.mark.timeout(20)
@pytest.mark.parametrize("local_cache", [True, False])
async def test_c14_retry_after_is_the_refill_time_rounded_up(
    redis: redis_lib.Redis, local_cache: bool
) -> None:
    ref = bucket("c14", 1, 0.5)
    limiter = AsyncRateLimiter(local_cache=local_cache)

    first = await limiter.admit([ref])
    denied = await limiter.admit([ref])

    assert first.allowed and first.retry_after == 0
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(2.0, abs=0.1)
    assert denied.retry_after_seconds == 2
    error = RateLimited(denied)
    assert (error.code, error.status) == ("rate_limited", 429)
    assert error.retry_after_seconds == 2
    assert error.decision is denied


@pytest.mark.timeout(20)
@pytest.mark.parametrize("local_cache", [True, False])
async def test_a_request_denied_by_one_bucket_takes_nothing_from_another(
    redis: redis_lib.Redis, local_cache: bool
) -> None:
    wide = bucket("wide", 10, 0.01, "user:1")
    narrow = bucket("narrow", 1, 0.01, "ip:10.0.0.1")
    limiter = AsyncRateLimiter(local_cache=local_cache)

    assert (await limiter.admit([wide, narrow])).allowed
    before = redis_tokens(redis, wide) + outstanding_leases(redis, wide)
    denied = [await limiter.admit([wide, narrow]) for _ in range(3)]
    after = redis_tokens(redis, wide) + outstanding_leases(redis, wide)

    assert not any(d.allowed for d in denied)
    assert {d.policy for d in denied} == {"narrow"}
    assert after >= before
    # Alone, the wide bucket still has the nine tokens the denials left it.
    alone = [await AsyncRateLimiter(local_cache=False).admit([wide]) for _ in range(9)]
    assert sum(d.allowed for d in alone) >= 9 - 1


@pytest.mark.timeout(20)
async def test_empty_until_t_denies_without_a_round_trip(
    redis: redis_lib.Redis,
) -> None:
    clock = FakeClock()
    ref = bucket("empty", 1, 0.5)
    limiter = AsyncRateLimiter(clock=clock)

    assert (await limiter.admit([ref])).allowed
    trips = limiter.stats.redis_round_trips
    denials = []
    for _ in range(10):
        clock.advance(0.15)
        denials.append(await limiter.admit([ref]))

    assert limiter.stats.redis_round_trips == trips
    assert all(not d.allowed and d.local for d in denials)
    retry = [d.retry_after for d in denials]
    assert retry == sorted(retry, reverse=True)
    assert retry[-1] == pytest.approx(2.0 - 1.5, abs=0.05)

    clock.advance(0.6)
    await limiter.admit([ref])
    assert limiter.stats.redis_round_trips == trips + 1


@pytest.mark.timeout(20)
async def test_steady_load_below_the_rate_is_decided_locally_nine_times_in_ten(
    redis: redis_lib.Redis,
) -> None:
    clock = FakeClock()
    ref = bucket("steady", 1000, 1000)
    limiter = AsyncRateLimiter(clock=clock)

    decisions = []
    for _ in range(1000):
        decisions.append(await limiter.admit([ref]))
        clock.advance(0.002)

    assert all(d.allowed for d in decisions)
    assert limiter.stats.decisions == 1000
    assert limiter.stats.local_decisions >= 900
    assert limiter.stats.redis_round_trips <= 100


@pytest.mark.timeout(20)
async def test_an_expired_lease_is_not_spent(redis: redis_lib.Redis) -> None:
    clock = FakeClock()
    ref = bucket("expiry", 1000, 1000)
    limiter = AsyncRateLimiter(clock=clock, lease_seconds=1.0)

    await limiter.admit([ref])
    await limiter.admit([ref])
    trips = limiter.stats.redis_round_trips
    clock.advance(0.95)
    decision = await limiter.admit([ref])

    assert not decision.local
    assert limiter.stats.redis_round_trips == trips + 1


@pytest.mark.timeout(20)
async def test_unspent_leased_tokens_go_back_to_the_bucket(
    redis: redis_lib.Redis,
) -> None:
    ref = bucket("handback", 100, 0.001)
    other = bucket("other", 1, 0.001, "user:7")
    limiter = AsyncRateLimiter(lease_size=10)

    await limiter.admit([ref])
    assert outstanding_leases(redis, ref) == 10
    # Needs Redis for the other bucket, so the lease on the first goes back.
    await limiter.admit([ref, other])

    assert redis_tokens(redis, ref) + outstanding_leases(redis, ref) == (
        pytest.approx(98, abs=0.01)
    )


@pytest.mark.timeout(30)
async def test_c09_three_instances_never_admit_more_than_one_bucket_would(
    redis: redis_lib.Redis,
) -> None:
    capacity, rate = 30.0, 20.0
    ref = bucket("fleet", capacity, rate)
    limiters = [AsyncRateLimiter(lease_size=5, lease_fraction=0.2) for _ in range(3)]
    times: list[float] = []
    lowest = [math.inf]

    async def drive(limiter: AsyncRateLimiter, deadline: float) -> None:
        while time.monotonic() < deadline:
            if (await limiter.admit([ref])).allowed:
                times.append(time.monotonic())
            await asyncio.sleep(0.001)

    async def watch(deadline: float) -> None:
        while time.monotonic() < deadline:
            lowest[0] = min(lowest[0], redis_tokens(redis, ref))
            used = redis_tokens(redis, ref) + outstanding_leases(redis, ref)
            assert used <= capacity + 1e-6
            await asyncio.sleep(0.005)

    start = time.monotonic()
    deadline = start + 1.5
    await asyncio.gather(*(drive(lim, deadline) for lim in limiters), watch(deadline))
    elapsed = time.monotonic() - start

    assert lowest[0] >= 0
    assert len(times) <= capacity + rate * elapsed + 1e-6
    # Any half-second window, too: a refilled bucket plus half a second's rate.
    for first in times:
        window = [t for t in times if first <= t <= first + 0.5]
        assert len(window) <= capacity + rate * 0.5 + 1
    # Under-admission is bounded too: leases hold at most 3 * 5 tokens.
    assert len(times) >= capacity + rate * 1.5 - 3 * 5 - 10
    local = sum(lim.stats.local_decisions for lim in limiters)
    assert local > 0


def test_policies_and_costs_are_validated() -> None:
    with pytest.raises(ValueError, match="scope"):
        BucketPolicy("bad", "planet", 1, 1)
    with pytest.raises(ValueError, match="on_redis_down"):
        BucketPolicy("bad", "user", 1, 1, on_redis_down="maybe")
    with pytest.raises(ValueError, match="rate"):
        BucketPolicy("bad", "user", 1, 0)
    limiter = AsyncRateLimiter()
    with pytest.raises(ValueError, match="exceeds capacity"):
        asyncio.run(limiter.admit([bucket("small", 1, 1)], cost=2))


def test_retry_after_seconds_is_at_least_one() -> None:
    decision = Decision(False, 0.2, 5, 0, 3.0, "p", local=False)
    assert decision.retry_after_seconds == 1
    assert Decision(False, 2.01, 5, 0, 3.0, "p", local=False).retry_after_seconds == 3
