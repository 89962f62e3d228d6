"""The breaker across processes, across restarts and without Redis."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from llm.errors import ProviderServerError
from resilience.circuit_breaker import AsyncCircuitBreaker, BreakerPolicy, CircuitOpen
from resilience.retry_strategy import Retrier, RetryPolicy
from tests.redis_plugin import redis_server
from tests.resilience.test_circuit_breaker import FakeClock, captured, fail, succeed

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0

WORKER = """
import asyncio, sys, time
import django
django.setup()
from resilience.circuit_breaker import AsyncCircuitBreaker, BreakerPolicy, CircuitOpen

mode, now, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
policy = BreakerPolicy(failure_threshold=4, failure_rate_percent=0, half_open_probes=2)

async def one(breaker):
    try:
        await breaker.acquire()
    except CircuitOpen:
        return 0
    return 1

async def main():
    breaker = AsyncCircuitBreaker("fleet", policy, clock=lambda: now)
    await breaker.state()  # connect before the start line
    time.sleep(max(0.0, start_at - time.time()))
    if mode == "fail":
        for _ in range(2):
            await breaker.record_failure(await breaker.acquire())
        print(0)
    else:
        print(sum(await asyncio.gather(*(one(breaker) for _ in range(25)))))

asyncio.run(main())
"""


def run_workers(mode: str, now: float, count: int = 2) -> list[int]:
    """Run ``count`` worker processes that start their calls together."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "streamsvc.settings"}
    start_at = str(time.time() + 2.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, mode, str(now), start_at],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    outputs = [proc.communicate(timeout=30) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    return [int(out.strip()) for out, _ in outputs]


def test_failures_in_two_processes_open_it_and_a_burst_gets_exactly_2_probes(
    redis: Any,
) -> None:
    run_workers("fail", NOW)
    policy = BreakerPolicy(failure_threshold=4, failure_rate_percent=0)

    async def check() -> None:
        with pytest.raises(CircuitOpen):
            await AsyncCircuitBreaker("fleet", policy, clock=lambda: NOW).acquire()

    asyncio.run(check())
    assert sum(run_workers("burst", NOW + 30)) == 2


async def always_503() -> None:
    raise ProviderServerError("503", status=503)


async def test_c19_both_providers_open_and_half_open_on_time_after_a_restart(
    redis: Any,
) -> None:
    policy = BreakerPolicy(
        failure_threshold=3, failure_rate_percent=0, recovery_timeout_seconds=0.6
    )
    retrier = Retrier(RetryPolicy(max_attempts=1))
    for _ in range(3):  # each request falls back from "first" to "second"
        for name in ("first", "second"):
            with pytest.raises(ProviderServerError):
                await retrier.open(always_503, AsyncCircuitBreaker(name, policy))
    opened = time.monotonic()

    # "Restart every process": new objects, empty caches, a long cache bound.
    restarted = AsyncCircuitBreaker("first", policy, cache_seconds=60)
    assert (await AsyncCircuitBreaker("second", policy).state()).state == "open"
    with pytest.raises(CircuitOpen):
        await restarted.acquire()
    while True:
        try:
            permit = await restarted.acquire()
            break
        except CircuitOpen:
            await asyncio.sleep(0.01)

    waited = time.monotonic() - opened
    assert permit.probe
    assert 0.5 <= waited < 0.6 + 0.15


@contextmanager
def redis_stopped() -> Iterator[None]:
    server = redis_server()
    server.stop()
    try:
        yield
    finally:
        server.start()


@contextmanager
def redis_frozen() -> Iterator[None]:
    """Freeze the server: it keeps its socket but answers nothing (C21)."""
    process = redis_server().process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def policy3() -> BreakerPolicy:
    return BreakerPolicy(failure_threshold=3, failure_rate_percent=0)


async def test_c21_a_stopped_redis_falls_back_to_a_local_breaker_and_back(
    redis: Any,
) -> None:
    clock = FakeClock()
    breaker = AsyncCircuitBreaker("p1", policy3(), clock=clock, cache_seconds=0)
    await succeed(breaker)
    with captured() as log:
        with redis_stopped():
            started = time.monotonic()
            await fail(breaker, 3)
            with pytest.raises(CircuitOpen):
                await breaker.acquire()
            state = await breaker.state()
            assert (state.backend, state.state) == ("local", "open")
            assert time.monotonic() - started < 1.0

        assert (await breaker.state()).backend == "local"  # retried once a second
        clock.advance(1.0)
        state = await breaker.state()
        assert (state.backend, state.state) == ("redis", "closed")

    assert [m for m in log.warnings() if "redis" in m] == [
        "breaker p1: redis unreachable (ConnectionError), using a local breaker",
        "breaker p1: redis is back, using the shared breaker",
    ]


async def test_c21_a_frozen_redis_is_answered_locally_within_the_timeout(
    redis: Any,
) -> None:
    clock = FakeClock()
    breaker = AsyncCircuitBreaker("p1", policy3(), clock=clock, cache_seconds=0)
    await succeed(breaker)
    with captured() as log:
        with redis_frozen():
            started = time.monotonic()
            for _ in range(10):
                await breaker.record_success(await breaker.acquire())
            elapsed = time.monotonic() - started
        clock.advance(1.0)
        assert (await breaker.state()).backend == "redis"

    assert elapsed < settings.REDIS_TIMEOUT_SECONDS + 0.5
    assert [m.split(" (")[0] for m in log.warnings()] == [
        "breaker p1: redis unreachable",
        "breaker p1: redis is back, using the shared breaker",
    ]
