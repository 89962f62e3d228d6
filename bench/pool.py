"""Measure what a pool lease costs a stream, against a bare Redis round trip.

Run with ``python -m bench.pool``. It starts a private Redis, then reports
acquire+release latency (p50/p99) next to a PING measured in the same run,
so the ratio means something on a noisy machine, and the Redis round trips
one stream pays: acquire, renewals for a stream of a given length, release.
"""

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SAMPLES = 2000
STREAM_SECONDS = 60.0
LEASE_TTL_SECONDS = 30.0
CONCURRENCY = 50
CONCURRENT_SECONDS = 2.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def timed(work: Callable[[], Awaitable[Any]], samples: int) -> list[float]:
    """Return each call's wall time in microseconds."""
    costs = []
    for _ in range(samples):
        started = time.perf_counter()
        await work()
        costs.append((time.perf_counter() - started) * 1e6)
    return costs


def line(name: str, costs: list[float], baseline: float) -> str:
    p50, p99 = percentile(costs, 0.5), percentile(costs, 0.99)
    return f"{name:<28} p50 {p50:7.0f} us  p99 {p99:7.0f} us  {p50 / baseline:4.1f}x"


async def measure() -> None:
    from resilience import redis_client
    from resilience.connection_pool_manager import (
        AsyncConnectionPool,
        PoolCounters,
        PoolPolicy,
    )

    client = redis_client.async_client()
    pool = AsyncConnectionPool()
    policy = PoolPolicy(1000, 1000, LEASE_TTL_SECONDS)

    async def acquire_release() -> None:
        await pool.release(await pool.acquire("bench", policy))

    await timed(client.ping, 200)
    await timed(acquire_release, 200)
    pings = await timed(client.ping, SAMPLES)
    pool.counters = PoolCounters()
    pairs = await timed(acquire_release, SAMPLES)
    lease = await pool.acquire("bench", policy)
    renewals = await timed(lambda: pool.renew(lease), SAMPLES)
    await pool.release(lease)

    baseline = statistics.median(pings)
    print(f"samples per row: {SAMPLES}; ratio = p50 / PING p50")
    print(line("PING (baseline)", pings, baseline))
    print(line("acquire + release", pairs, baseline))
    print(line("renew", renewals, baseline))
    await round_trips(pool)
    await concurrent(pool, policy)


async def round_trips(pool: Any) -> None:
    counters = pool.counters
    per_acquire = counters.acquire_round_trips / counters.acquires
    per_release = counters.release_round_trips / counters.releases
    renew_every = LEASE_TTL_SECONDS / 3
    renewals = int(STREAM_SECONDS // renew_every)
    print(
        f"round trips: {per_acquire:.2f} per acquire, {per_release:.2f} per "
        f"release, 1 per renewal (every {renew_every:.0f} s at TTL "
        f"{LEASE_TTL_SECONDS:.0f} s)"
    )
    print(
        f"a {STREAM_SECONDS:.0f} s stream: 1 + {renewals} + 1 = "
        f"{2 + renewals} round trips"
    )
    await observed_hold(pool)


async def observed_hold(pool: Any) -> None:
    """Hold one short-TTL lease and count the renewals really sent."""
    from resilience.connection_pool_manager import PoolPolicy

    policy = PoolPolicy(10, 10, 0.3)
    before = pool.counters.renew_round_trips
    async with pool.hold(await pool.acquire("hold", policy)):
        await asyncio.sleep(1.05)
    sent = pool.counters.renew_round_trips - before
    print(f"observed: a 1.05 s hold at TTL 0.3 s sent {sent} renewals (about 10)")


async def concurrent(pool: Any, policy: Any) -> None:
    """Run CONCURRENCY tasks of acquire+release for CONCURRENT_SECONDS."""
    done = 0
    deadline = time.perf_counter() + CONCURRENT_SECONDS

    async def worker(caller: str) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await pool.release(await pool.acquire(caller, policy))
            done += 1

    await asyncio.gather(*(worker(f"c{i}") for i in range(CONCURRENCY)))
    rate = done / CONCURRENT_SECONDS
    print(f"{CONCURRENCY} concurrent tasks, one process: {rate:,.0f} acquire+release/s")


def main() -> None:
    from streamsvc.embedded_redis import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", persist=False)
        server.start()
        try:
            os.environ["REDIS_URL"] = server.url
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamsvc.settings")
            import django

            django.setup()
            asyncio.run(measure())
        finally:
            server.stop()


if __name__ == "__main__":
    main()
