"""Benchmark: failing fast on an open breaker vs a call it admits.

Run with ``.venv/bin/python -m bench.breaker``. Starts a private Redis,
then times, in one run and one event loop:

* admitted: ``acquire`` + ``record_success`` around a trivial call, closed;
* open (cached): ``acquire`` raising ``CircuitOpen`` from the local cache;
* open (Redis): the same with the cache off, one script call each.
"""

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROUNDS = 5000
WARMUP = 200


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _time(call: Callable[[], Awaitable[None]], rounds: int) -> list[float]:
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def _run() -> dict[str, list[float]]:
    from resilience.circuit_breaker import (
        AsyncCircuitBreaker,
        BreakerPolicy,
        CircuitOpen,
    )

    policy = BreakerPolicy(recovery_timeout_seconds=3600)
    closed = AsyncCircuitBreaker("bench-closed", policy)
    cached = AsyncCircuitBreaker("bench-open", policy)
    uncached = AsyncCircuitBreaker("bench-open", policy, cache_seconds=0)
    await cached.force_open()

    async def trivial() -> None:
        return None

    async def admitted() -> None:
        permit = await closed.acquire()
        await trivial()
        await closed.record_success(permit)

    def rejected(breaker: Any) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            try:
                await breaker.acquire()
            except CircuitOpen:
                return
            raise RuntimeError("the breaker should be open")

        return call

    return {
        "admitted (acquire + success)": await _time(admitted, ROUNDS),
        "open, local cache": await _time(rejected(cached), ROUNDS),
        "open, cache off (Redis)": await _time(rejected(uncached), ROUNDS),
    }


def _report(results: dict[str, list[float]]) -> None:
    print(f"{'case':32} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}")
    for name, samples in results.items():
        p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
        mean = statistics.fmean(samples)
        print(f"{name:32} {p50 * 1e6:9.1f} {p99 * 1e6:9.1f} {mean * 1e6:9.1f}")
    base = _percentile(results["admitted (acquire + success)"], 0.5)
    for name in ("open, local cache", "open, cache off (Redis)"):
        ratio = base / _percentile(results[name], 0.5)
        print(f"p50 admitted / {name}: {ratio:.1f}x")


def main() -> None:
    """Start Redis, set up Django, run the three cases and print them."""
    from streamsvc.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-")), persist=False)
    server.start()
    try:
        os.environ["REDIS_URL"] = server.url
        os.environ["DJANGO_SETTINGS_MODULE"] = "streamsvc.settings"
        import django

        django.setup()
        print(f"{ROUNDS} rounds each, Redis {server.url}")
        _report(asyncio.run(_run()))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
