"""The lease pool across processes, crashes and Redis outages (C21)."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from django.conf import settings

from resilience import connection_pool_manager, redis_client
from resilience.connection_pool_manager import (
    REDIS_RETRY_SECONDS,
    AsyncConnectionPool,
    PoolFull,
    PoolPolicy,
)
from tests.redis_plugin import redis_server

ROOT = Path(__file__).resolve().parents[2]

# One API instance: waits for "go", tries ACQUIRES at once, prints how many
# it got, holds them (renewing) until stdin closes, then releases them.
WORKER = """
import asyncio, json, sys
import django
django.setup()
from contextlib import AsyncExitStack
from resilience.connection_pool_manager import AsyncConnectionPool, PoolPolicy

async def main(caller, acquires, global_max, per_user_max, ttl):
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max, per_user_max, ttl)
    await pool.occupancy()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    got = await asyncio.gather(
        *(pool.acquire(caller, policy) for _ in range(acquires)),
        return_exceptions=True,
    )
    leases = [lease for lease in got if not isinstance(lease, Exception)]
    print(json.dumps({"granted": len(leases)}), flush=True)
    async with AsyncExitStack() as stack:
        for lease in leases:
            await stack.enter_async_context(pool.hold(lease))
        await asyncio.to_thread(sys.stdin.read)

caller, acquires, global_max, per_user_max, ttl = sys.argv[1:]
asyncio.run(main(caller, int(acquires), int(global_max), int(per_user_max),
                 float(ttl)))
"""


def global_key() -> str:
    return redis_client.key("{pool}", "global")


def spawn(*args: object) -> "subprocess.Popen[str]":
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "streamsvc.settings"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(process: "subprocess.Popen[str]") -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


@pytest.fixture
def workers() -> Iterator[list["subprocess.Popen[str]"]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def run_instances(
    workers: list["subprocess.Popen[str]"], callers: list[str], *policy: object
) -> list[int]:
    """Start one process per caller, fire them together, return their grants."""
    workers.extend(spawn(caller, 20, *policy) for caller in callers)
    assert all(read_line(w) == "ready" for w in workers)
    for process in workers:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    return [json.loads(read_line(w))["granted"] for w in workers]


def close_all(workers: list["subprocess.Popen[str]"]) -> None:
    for process in workers:
        assert process.stdin is not None
        process.stdin.close()
    for process in workers:
        assert process.wait(20) == 0


@pytest.mark.timeout(60)
def test_four_processes_get_exactly_the_global_cap(
    redis: redis_lib.Redis, workers: list["subprocess.Popen[str]"]
) -> None:
    granted = run_instances(workers, ["a", "b", "c", "d"], 10, 100, 2)

    assert sum(granted) == 10
    time.sleep(2.5)
    assert redis.zcard(global_key()) == 10
    close_all(workers)
    assert redis.zcard(global_key()) == 0


@pytest.mark.timeout(60)
def test_four_processes_give_one_caller_exactly_its_cap(
    redis: redis_lib.Redis, workers: list["subprocess.Popen[str]"]
) -> None:
    granted = run_instances(workers, ["same"] * 4, 100, 7, 5)

    assert sum(granted) == 7
    assert redis.zcard(redis_client.key("{pool}", "user", "same")) == 7
    close_all(workers)
    assert redis.zcard(global_key()) == 0


@pytest.mark.timeout(60)
def test_a_holder_killed_with_sigkill_frees_its_slot_within_the_ttl(
    redis: redis_lib.Redis, workers: list["subprocess.Popen[str]"]
) -> None:
    ttl = 1.0
    assert run_instances(workers, ["victim"], 1, 1, ttl) == [1]
    time.sleep(2 * ttl)
    assert redis.zcard(global_key()) == 1

    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(10)
    killed = time.monotonic()

    async def acquire_when_free() -> float:
        pool = AsyncConnectionPool()
        while True:
            try:
                await pool.acquire("next", PoolPolicy(1, 1, ttl))
                return time.monotonic() - killed
            except PoolFull:
                await asyncio.sleep(0.02)

    freed_after = asyncio.run(asyncio.wait_for(acquire_when_free(), 10))
    assert freed_after <= ttl + 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Warnings(logging.Handler):
    """Collect the pool module's WARNING records (caplog is off in CI)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def pool_warnings() -> Iterator[Warnings]:
    handler = Warnings()
    logger = logging.getLogger(connection_pool_manager.__name__)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.mark.timeout(60)
async def test_c21_redis_down_falls_back_to_per_instance_limits_and_recovers(
    redis: redis_lib.Redis, pool_warnings: Warnings
) -> None:
    clock = Clock()
    pool = AsyncConnectionPool(clock=clock)
    policy = PoolPolicy(global_max=3, per_user_max=2, lease_ttl_seconds=5)
    before = await pool.acquire("a", policy)
    server = redis_server()

    server.stop()
    try:
        started = time.monotonic()
        local = [await pool.acquire("b", policy), await pool.acquire("b", policy)]
        with pytest.raises(PoolFull) as full:
            await pool.acquire("c", policy)
        assert full.value.scope == "global"
        with pytest.raises(PoolFull) as full:
            await pool.acquire("b", policy)
        assert full.value.scope == "per_user"
        await pool.release(local[0])
        local.append(await pool.acquire("c", policy))
        await pool.release(before)
        assert await pool.renew(local[1])
        assert time.monotonic() - started < 2.0
        assert not any(lease.remote for lease in local)
        assert pool.counters.acquire_round_trips == 2
    finally:
        server.start()

    clock.now += REDIS_RETRY_SECONDS
    after = await pool.acquire("c", policy)
    for lease in [*local, after]:
        await pool.release(lease)

    assert after.remote
    assert pool_warnings.messages[0].startswith("pool: Redis unreachable")
    assert pool_warnings.messages[1].startswith("pool: Redis reachable again")
    assert len(pool_warnings.messages) == 2
    assert (await pool.occupancy()).instance_in_use == 0


@pytest.mark.timeout(60)
async def test_c21_paused_redis_answers_from_the_fallback_without_hanging(
    redis: redis_lib.Redis, pool_warnings: Warnings
) -> None:
    clock = Clock()
    pool = AsyncConnectionPool(clock=clock)
    policy = PoolPolicy(global_max=5, per_user_max=5, lease_ttl_seconds=1)
    held = await pool.acquire("a", policy)
    timeout = float(settings.REDIS_TIMEOUT_SECONDS)

    redis.execute_command("CLIENT", "PAUSE", 2000)
    paused = time.monotonic()
    first = await asyncio.wait_for(pool.acquire("b", policy), timeout + 2)
    first_took = time.monotonic() - paused
    rest_started = time.monotonic()
    rest = [await pool.acquire("b", policy) for _ in range(3)]
    rest_took = time.monotonic() - rest_started
    await pool.release(held)
    for lease in [first, *rest]:
        await pool.release(lease)

    assert first_took < timeout + 1.0
    assert rest_took < 0.2
    assert not any(lease.remote for lease in [first, *rest])
    assert len(pool_warnings.messages) == 1

    await asyncio.sleep(max(0.0, 2.2 - (time.monotonic() - paused)))
    clock.now += REDIS_RETRY_SECONDS
    back = await pool.acquire("b", policy)
    await pool.release(back)
    assert back.remote
    assert pool_warnings.messages[-1].startswith("pool: Redis reachable again")
    # The lease nobody could release during the pause expires by itself.
    deadline = time.monotonic() + policy.lease_ttl_seconds + 1.0
    while redis.zcard(global_key()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert redis.zcard(global_key()) == 0


@pytest.mark.timeout(30)
async def test_an_acquire_cancelled_in_flight_gives_its_granted_slot_back(
    redis: redis_lib.Redis,
) -> None:
    pool = AsyncConnectionPool()
    policy = PoolPolicy(global_max=5, per_user_max=5, lease_ttl_seconds=30)
    await pool.occupancy()

    # The script is queued behind the pause and granted after the cancel.
    redis.execute_command("CLIENT", "PAUSE", 300)
    attempt = asyncio.create_task(pool.acquire("a", policy))
    await asyncio.sleep(0.05)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt

    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if pool.counters.releases and redis.zcard(global_key()) == 0:
            break
        await asyncio.sleep(0.02)
    assert pool.counters.releases == 1
    assert redis.zcard(global_key()) == 0
