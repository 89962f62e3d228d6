"""The lease pool's contract, run against Redis and the in-process fallback.

The fallback is reached the honest way: through a client whose Redis port
refuses connections. Cross-process limits, crashes and Redis outages are in
``test_connection_pool_cluster.py``.
"""

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from resilience import redis_client
from resilience.connection_pool_manager import (
    AsyncConnectionPool,
    Lease,
    LeaseLost,
    PoolFull,
    PoolPolicy,
)
from streamsvc.embedded_redis import free_port

POLICY = PoolPolicy(global_max=4, per_user_max=2, lease_ttl_seconds=5)


def global_key() -> str:
    return redis_client.key("{pool}", "global")


def user_key(caller: str) -> str:
    return redis_client.key("{pool}", "user", caller)


class Clock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dead_redis() -> Callable[[], aioredis.Redis]:
    """Return a client factory whose server refuses every connection."""
    port = free_port()
    clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}

    def factory() -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = aioredis.Redis(
                port=port, socket_timeout=0.5, socket_connect_timeout=0.5
            )
        return clients[loop]

    return factory


@pytest.fixture(params=["redis", "local"])
def backend(request: pytest.FixtureRequest, redis: redis_lib.Redis) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(backend: str, clock: Clock) -> AsyncConnectionPool:
    if backend == "redis":
        return AsyncConnectionPool(clock=clock)
    return AsyncConnectionPool(redis=dead_redis(), clock=clock)


async def in_use(pool: AsyncConnectionPool) -> int:
    """Return what the backend under test counts (Redis, else this process)."""
    occupancy = await pool.occupancy()
    if occupancy.global_in_use is not None:
        return occupancy.global_in_use
    return occupancy.instance_in_use


async def test_concurrent_acquires_never_exceed_the_global_cap(
    pool: AsyncConnectionPool, backend: str
) -> None:
    policy = PoolPolicy(global_max=10, per_user_max=100, lease_ttl_seconds=5)

    results = await asyncio.gather(
        *(pool.acquire(f"user-{i}", policy) for i in range(40)),
        return_exceptions=True,
    )

    leases = [r for r in results if isinstance(r, Lease)]
    full = [r for r in results if isinstance(r, PoolFull)]
    assert len(leases) == 10
    assert len(full) == 30
    assert {f.scope for f in full} == {"global"}
    assert all(lease.remote == (backend == "redis") for lease in leases)
    assert await in_use(pool) == 10


async def test_a_caller_at_its_cap_does_not_block_another_caller(
    pool: AsyncConnectionPool,
) -> None:
    await pool.acquire("a", POLICY)
    await pool.acquire("a", POLICY)

    with pytest.raises(PoolFull) as full:
        await pool.acquire("a", POLICY)
    lease_b = await pool.acquire("b", POLICY)

    assert full.value.scope == "per_user"
    assert full.value.code == "pool_full"
    assert full.value.status == 503
    assert lease_b.caller == "b"


async def test_a_full_pool_blocks_every_caller(pool: AsyncConnectionPool) -> None:
    for caller in ("a", "a", "b", "b"):
        await pool.acquire(caller, POLICY)

    for caller in ("c", "d"):
        with pytest.raises(PoolFull) as full:
            await pool.acquire(caller, POLICY)
        assert full.value.scope == "global"


async def test_release_frees_exactly_one_slot(pool: AsyncConnectionPool) -> None:
    leases = [await pool.acquire(c, POLICY) for c in ("a", "a", "b", "b")]

    await pool.release(leases[0])

    assert await in_use(pool) == 3
    assert (await pool.acquire("a", POLICY)).caller == "a"


async def test_double_release_does_not_free_another_holders_slot(
    pool: AsyncConnectionPool,
) -> None:
    first = await pool.acquire("a", POLICY)
    await pool.acquire("b", POLICY)
    await pool.release(first)

    await pool.release(first)

    assert await in_use(pool) == 1


async def test_foreign_release_does_not_free_anyones_slot(
    pool: AsyncConnectionPool,
) -> None:
    held = await pool.acquire("a", POLICY)
    forged = Lease("not-a-real-id", "a", POLICY, 0.0, remote=held.remote)
    stolen_id = Lease(held.id, "b", POLICY, 0.0, remote=held.remote)

    await pool.release(forged)
    await pool.release(stolen_id)

    assert await in_use(pool) == 1
    assert await pool.renew(held)


async def test_renew_reports_a_released_lease_gone(pool: AsyncConnectionPool) -> None:
    lease = await pool.acquire("a", POLICY)
    assert await pool.renew(lease)

    await pool.release(lease)

    assert not await pool.renew(lease)
    assert await in_use(pool) == 0


async def test_lease_ids_are_unguessable_tokens(pool: AsyncConnectionPool) -> None:
    policy = PoolPolicy(global_max=50, per_user_max=50, lease_ttl_seconds=5)

    ids = {(await pool.acquire("a", policy)).id for _ in range(50)}

    assert len(ids) == 50
    assert all(len(lease_id) >= 22 for lease_id in ids)


async def test_retry_after_follows_recent_hold_durations(
    pool: AsyncConnectionPool, clock: Clock
) -> None:
    policy = PoolPolicy(global_max=2, per_user_max=2, lease_ttl_seconds=30)
    with pytest.raises(PoolFull):
        for _ in range(3):
            await pool.acquire("a", policy)
    assert pool.retry_after("global", policy) == 30

    for _ in range(2):
        lease = await pool.acquire("b", PoolPolicy(10, 10, 30))
        clock.now += 8.0
        await pool.release(lease)

    with pytest.raises(PoolFull) as full:
        await pool.acquire("c", policy)
    assert full.value.retry_after == pytest.approx(4.0)
    assert full.value.retry_after_seconds == 4


async def test_occupancy_names_the_busiest_callers(
    pool: AsyncConnectionPool, backend: str
) -> None:
    policy = PoolPolicy(global_max=20, per_user_max=5, lease_ttl_seconds=5)
    for caller, count in (("x:{odd}*", 3), ("b", 1), ("c", 2)):
        for _ in range(count):
            await pool.acquire(caller, policy)

    occupancy = await pool.occupancy(top=2)

    assert occupancy.instance_in_use == 6
    if backend == "redis":
        assert occupancy.global_in_use == 6
        assert [(u.caller, u.in_use) for u in occupancy.busiest] == [
            ("x:{odd}*", 3),
            ("c", 2),
        ]
    else:
        assert occupancy.global_in_use is None
        assert not occupancy.redis_available


# Holding: renewal, loss and release on every exit path.


@pytest.mark.timeout(20)
async def test_a_held_lease_outlives_its_ttl(redis: redis_lib.Redis) -> None:
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max=1, per_user_max=1, lease_ttl_seconds=0.6)
    lease = await pool.acquire("a", policy)

    async with pool.hold(lease) as held:
        await asyncio.sleep(1.5)
        assert redis.zscore(global_key(), lease.id) is not None

    assert not held.lost.is_set()
    assert redis.zcard(global_key()) == 0
    assert pool.counters.renew_round_trips >= 3


@pytest.mark.timeout(20)
async def test_a_lease_deleted_behind_the_holders_back_ends_the_hold(
    redis: redis_lib.Redis,
) -> None:
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max=1, per_user_max=1, lease_ttl_seconds=0.9)
    lease = await pool.acquire("a", policy)
    interval = policy.lease_ttl_seconds / 3
    started = time.monotonic()

    with pytest.raises(LeaseLost) as lost:
        async with pool.hold(lease) as held:
            redis.zrem(global_key(), lease.id)
            redis.zrem(user_key("a"), lease.id)
            await asyncio.sleep(30)

    assert time.monotonic() - started < interval + 1.0
    assert held.lost.is_set()
    assert lost.value.code == "lease_lost"
    assert redis.zcard(global_key()) == 0


@pytest.mark.timeout(20)
async def test_a_lost_lease_sets_the_flag_without_interrupting_when_asked(
    redis: redis_lib.Redis,
) -> None:
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max=1, per_user_max=1, lease_ttl_seconds=0.6)
    lease = await pool.acquire("a", policy)

    async with pool.hold(lease, interrupt=False) as held:
        redis.delete(global_key(), user_key("a"))
        await asyncio.wait_for(held.lost.wait(), timeout=2)
        with pytest.raises(LeaseLost):
            held.raise_if_lost()


@pytest.mark.timeout(20)
async def test_an_outside_cancellation_of_a_lost_hold_stays_a_cancellation(
    redis: redis_lib.Redis,
) -> None:
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max=1, per_user_max=1, lease_ttl_seconds=0.3)
    lease = await pool.acquire("a", policy)

    async def body() -> None:
        async with pool.hold(lease):
            redis.delete(global_key(), user_key("a"))
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                # The client leaves at the moment the lease is lost.
                asyncio.current_task().cancel()  # type: ignore[union-attr]
                raise

    task = asyncio.create_task(body())
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_hold_releases_on_normal_exit(pool: AsyncConnectionPool) -> None:
    lease = await pool.acquire("a", POLICY)

    async with pool.hold(lease):
        assert await in_use(pool) == 1

    assert await in_use(pool) == 0


async def test_hold_releases_when_the_body_raises(pool: AsyncConnectionPool) -> None:
    lease = await pool.acquire("a", POLICY)

    with pytest.raises(ZeroDivisionError):
        async with pool.hold(lease):
            _ = 1 / 0

    assert await in_use(pool) == 0


async def test_hold_releases_when_its_task_is_cancelled(
    pool: AsyncConnectionPool,
) -> None:
    entered = asyncio.Event()

    async def stream() -> None:
        lease = await pool.acquire("a", POLICY)
        async with pool.hold(lease):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(stream())
    await entered.wait()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert await in_use(pool) == 0


async def test_hold_releases_when_cancelled_again_during_release(
    redis: redis_lib.Redis,
) -> None:
    pool = AsyncConnectionPool()
    lease = await pool.acquire("a", POLICY)

    async def stream() -> None:
        async with pool.hold(lease):
            await asyncio.sleep(30)

    task = asyncio.create_task(stream())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert redis.zcard(global_key()) == 0


async def test_hold_releases_when_its_generator_is_closed_early(
    pool: AsyncConnectionPool,
) -> None:
    async def tokens() -> AsyncIterator[str]:
        lease = await pool.acquire("a", POLICY)
        async with pool.hold(lease):
            for word in ("one", "two", "three"):
                yield word

    stream = tokens()
    assert await anext(stream) == "one"
    await stream.aclose()

    assert await in_use(pool) == 0


@pytest.mark.timeout(60)
async def test_1000_holds_cancelled_at_random_points_leave_the_pool_empty(
    redis: redis_lib.Redis,
) -> None:
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max=50, per_user_max=20, lease_ttl_seconds=30)
    gate = asyncio.Semaphore(50)
    rng = random.Random(21)

    async def stream(caller: str) -> None:
        lease = await pool.acquire(caller, policy)
        async with pool.hold(lease):
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def one(i: int) -> None:
        async with gate:
            task = asyncio.create_task(stream(f"user-{i % 7}"))
            await asyncio.sleep(rng.uniform(0, 0.012))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, PoolFull):
                await task

    await asyncio.gather(*(one(i) for i in range(1000)))
    finished = time.monotonic()

    while redis.zcard(global_key()) and time.monotonic() - finished < 1.0:
        await asyncio.sleep(0.02)
    assert redis.zcard(global_key()) == 0
    assert not list(redis.scan_iter(match=redis_client.key("{pool}", "user", "*")))
    assert (await pool.occupancy()).instance_in_use == 0


def test_policy_rejects_nonsense() -> None:
    for bad in ((-1, 1, 1.0), (1, -1, 1.0), (1, 1, 0.0)):
        with pytest.raises(ValueError):
            PoolPolicy(*bad)
