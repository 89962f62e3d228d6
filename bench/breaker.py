"""Benchmark: failing fast on an open breaker vs a call it admits.

Run with ``.venv/bin/python -m bench.breaker``. Starts a private Redis,
then times, in one run and one event loop:

* admitted: ``acquire`` + ``record_success`` around a trivial call, closed;
* open (cached): ``acquire`` raising ``CircuitOpen`` from the local cache;
* open (Redis): the same with the cache off, one script call each.

Then, over HTTP, alternating request by request between two daphne
processes that differ only in their Redis key prefix: on one the provider's
breaker is closed (a one-token answer from the simulated provider, read to
its ``done``), on the other it is open (the 503 ``provider_unavailable``,
read whole).
"""

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROUNDS = 5000
WARMUP = 200
HTTP_ROUNDS = 300


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


def _http(workdir: Path) -> dict[str, list[float]]:
    """Time admitted and fail-fast requests through a real daphne."""
    import httpx
    from django.conf import settings

    from bench.overload import ROOT, manage
    from resilience.circuit_breaker import CircuitBreaker
    from streamsvc.embedded_redis import free_port

    env = {**os.environ, "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
           "STREAMSVC_VAR_DIR": str(workdir), "LOG_LEVEL": "WARNING"}  # fmt: skip
    fast = {"ttft_ms": 0, "length": 1, "tokens_per_second": 1000}
    policies = {
        "providers": [{"name": "sim", "kind": "simulated", "order": 0,
                       "enabled": True, "options": fast}],
        "rate_limits": [],
    }  # fmt: skip
    manage(env, "migrate", "-v", "0")
    manage(env, "policies", "import", "-", stdin=json.dumps(policies))
    cases = {"HTTP admitted, to done": ("closed", 200),
             "HTTP breaker open, 503": ("open", 503)}  # fmt: skip
    settings.REDIS_KEY_PREFIX = "open"
    CircuitBreaker("sim").force_open()
    servers: dict[str, tuple[subprocess.Popen[bytes], httpx.Client]] = {}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for prefix, _ in cases.values():
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                 "streamsvc.asgi:application"],
                cwd=ROOT, env={**env, "REDIS_KEY_PREFIX": prefix},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            servers[prefix] = (process, httpx.Client(base_url=url, timeout=10))
        for _, client in servers.values():
            _wait_ready(client)
        body = {"messages": [{"role": "user", "content": "hi"}]}
        for index in range(HTTP_ROUNDS + 20):
            for name, (prefix, status) in cases.items():
                client = servers[prefix][1]
                started = time.perf_counter()
                response = client.post("/api/v1/chat/stream", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != status:
                    raise RuntimeError(f"{name}: got {response.status_code}")
                if status == 200 and b"event: done" not in response.content:
                    raise RuntimeError("the admitted stream did not end in done")
                if index >= 20:  # the first rounds warm up
                    samples[name].append(elapsed)
    finally:
        for process, client in servers.values():
            client.close()
            process.terminate()
            process.wait(10)
    return samples


def _wait_ready(client: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("daphne did not start")


def _report_http(results: dict[str, list[float]]) -> None:
    print(f"\n{HTTP_ROUNDS} HTTP requests each, alternating")
    print(f"{'case':32} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name, samples in results.items():
        p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
        mean = statistics.fmean(samples)
        print(f"{name:32} {p50 * 1e3:9.2f} {p99 * 1e3:9.2f} {mean * 1e3:9.2f}")
    admitted, rejected = results.values()
    ratio = _percentile(admitted, 0.5) / _percentile(rejected, 0.5)
    print(f"p50 admitted / open: {ratio:.1f}x")


def main() -> None:
    """Start Redis, set up Django, run the cases and print them."""
    from streamsvc.embedded_redis import EmbeddedRedis

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    server = EmbeddedRedis(workdir / "redis", persist=False)
    server.start()
    try:
        os.environ["REDIS_URL"] = server.url
        os.environ["DJANGO_SETTINGS_MODULE"] = "streamsvc.settings"
        os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'db.sqlite3'}"
        import django

        django.setup()
        print(f"{ROUNDS} rounds each, Redis {server.url}")
        _report(asyncio.run(_run()))
        _report_http(_http(workdir))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
