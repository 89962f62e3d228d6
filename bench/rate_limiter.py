"""Benchmark the rate limiter with its local lease cache on and off.

Run: ``.venv/bin/python -m bench.rate_limiter`` (about 15 s). It starts a
private Redis, then for each scenario and each mode runs ``PROCESSES``
processes, each with its own limiter, against one shared "global" bucket:

* steady: each process paced at ``STEADY_PER_PROCESS`` decisions/s, below
  the bucket's rate, so every request should be admitted;
* overload: each process as fast as it can, well above the rate, so
  admitted vs allowed shows whether leasing over-admits.

"allowed" is what one exact bucket would admit over the run:
``capacity + rate * window``, the window from the first process's start
to the last one's end.
"""

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

PROCESSES = 3
SECONDS = 2.5
MAX_DECISIONS = 200_000
STEADY_PER_PROCESS = 1000.0
SCENARIOS = {
    # name: (capacity, refill per second, paced decisions/s per process)
    "steady": (4000.0, 4000.0, STEADY_PER_PROCESS),
    "overload": (1000.0, 2000.0, 0.0),
}


@dataclass
class Result:
    started: float
    ended: float
    decisions: int
    admitted: int
    local: int
    round_trips: int
    latencies: list[float]


@dataclass
class Summary:
    rate: float
    local_share: float
    admitted: int
    allowed: float
    p50_ms: float
    p99_ms: float

    @property
    def over(self) -> float:
        return max(0.0, self.admitted - self.allowed)


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamsvc.settings")
    import django

    django.setup()


def _worker(
    local_cache: bool,
    scenario: str,
    subject: str,
    ready: Any,
    go: Event,
    results: Any,
) -> None:
    _setup_django()
    results.put(asyncio.run(_drive(local_cache, scenario, subject, ready, go)))


async def _drive(
    local_cache: bool, scenario: str, subject: str, ready: Any, go: Event
) -> Result:
    from resilience import redis_client
    from resilience.rate_limiter import AsyncRateLimiter, BucketPolicy, BucketRef

    capacity, rate, paced = SCENARIOS[scenario]
    ref = BucketRef(BucketPolicy("bench", "global", capacity, rate), subject)
    limiter = AsyncRateLimiter(local_cache=local_cache)
    await redis_client.async_client().ping()
    ready.put(os.getpid())
    await asyncio.to_thread(go.wait)

    started = time.time()
    latencies, admitted = await _loop(limiter, ref, paced)
    return Result(
        started=started,
        ended=time.time(),
        decisions=limiter.stats.decisions,
        admitted=admitted,
        local=limiter.stats.local_decisions,
        round_trips=limiter.stats.redis_round_trips,
        latencies=latencies,
    )


async def _loop(limiter: Any, ref: Any, paced: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    admitted = 0
    interval = 1 / paced if paced else 0.0
    deadline = time.perf_counter() + SECONDS
    due = time.perf_counter()
    while len(latencies) < MAX_DECISIONS:
        now = time.perf_counter()
        if now >= deadline:
            break
        if interval and due > now:
            await asyncio.sleep(due - now)
        due += interval
        begun = time.perf_counter()
        decision = await limiter.admit([ref])
        latencies.append(time.perf_counter() - begun)
        admitted += decision.allowed
    return latencies, admitted


def _run(local_cache: bool, scenario: str) -> Summary:
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    subject = f"{scenario}-{uuid.uuid4().hex[:8]}"
    args = (local_cache, scenario, subject, ready, go, results)
    workers = [context.Process(target=_worker, args=args) for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=30)
    go.set()
    reports: list[Result] = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
    return _summarize(reports, scenario)


def _summarize(reports: list[Result], scenario: str) -> Summary:
    capacity, rate, _paced = SCENARIOS[scenario]
    window = max(r.ended for r in reports) - min(r.started for r in reports)
    decisions = sum(r.decisions for r in reports)
    latencies = sorted(x for r in reports for x in r.latencies)
    cuts = statistics.quantiles(latencies, n=100)
    return Summary(
        rate=decisions / window,
        local_share=sum(r.local for r in reports) / decisions,
        admitted=sum(r.admitted for r in reports),
        allowed=capacity + rate * window,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
    )


def _print(scenario: str, on: Summary, off: Summary) -> None:
    print(f"\n{scenario}  ({PROCESSES} processes x {SECONDS} s)")
    header = "metric", "cache ON", "cache OFF", "ON/OFF"
    print(f"  {header[0]:<22}{header[1]:>12}{header[2]:>12}{header[3]:>9}")
    rows = [
        ("decisions/s", on.rate, off.rate, "{:.0f}"),
        ("decided without Redis", on.local_share, off.local_share, "{:.1%}"),
        ("admitted", on.admitted, off.admitted, "{:.0f}"),
        ("allowed (exact bucket)", on.allowed, off.allowed, "{:.0f}"),
        ("over-admitted", on.over, off.over, "{:.0f}"),
        ("p50 latency ms", on.p50_ms, off.p50_ms, "{:.3f}"),
        ("p99 latency ms", on.p99_ms, off.p99_ms, "{:.3f}"),
    ]
    for name, a, b, fmt in rows:
        ratio = f"{a / b:.2f}" if b else "-"
        print(f"  {name:<22}{fmt.format(a):>12}{fmt.format(b):>12}{ratio:>9}")


def main() -> None:
    """Start a private Redis, run every scenario with the cache on and off."""
    from streamsvc.embedded_redis import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", persist=False)
        server.start()
        try:
            os.environ["REDIS_URL"] = server.url
            _setup_django()
            for scenario in SCENARIOS:
                _print(scenario, _run(True, scenario), _run(False, scenario))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
