"""shared/CASES.md C09: one bucket, four processes, one hundred requests.

Each process is a separate interpreter with its own limiter (local cache on)
and its own connections; they fire together on a signal from the test.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis as redis_lib

from resilience.rate_limiter import BucketPolicy, BucketRef

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
PER_PROCESS = 25

WORKER = """
import asyncio, json, sys, time
from resilience import redis_client
from resilience.rate_limiter import AsyncRateLimiter, BucketPolicy, BucketRef

async def main():
    ref = BucketRef(BucketPolicy("c09", "global", 10, 1), "global")
    limiter = AsyncRateLimiter()
    await redis_client.async_client().ping()
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    burst = [limiter.admit([ref]) for _ in range(int(sys.argv[1]))]
    decisions = await asyncio.gather(*burst)
    print(json.dumps({
        "started": started,
        "ended": time.time(),
        "admitted": sum(d.allowed for d in decisions),
        "remaining": [d.remaining for d in decisions if d.allowed],
    }), flush=True)

asyncio.run(main())
"""


def start_worker() -> subprocess.Popen[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "streamsvc.settings"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(PER_PROCESS)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def watch_tokens(
    redis: redis_lib.Redis, key: str, stop: threading.Event, seen: list[float]
) -> None:
    while not stop.is_set():
        raw = redis.hget(key, "t")
        if raw is not None:
            seen.append(float(raw))


@pytest.mark.timeout(60)
def test_c09_four_processes_admit_at_most_the_capacity_plus_refill(
    redis: redis_lib.Redis,
) -> None:
    ref = BucketRef(BucketPolicy("c09", "global", 10, 1), "global")
    workers = [start_worker() for _ in range(PROCESSES)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        seen: list[float] = []
        stop = threading.Event()
        watcher = threading.Thread(
            target=watch_tokens, args=(redis, ref.redis_key, stop, seen)
        )
        watcher.start()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        reports = [json.loads(worker.communicate(timeout=30)[0]) for worker in workers]
    finally:
        stop.set()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()

    watcher.join()
    window = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    admitted = sum(r["admitted"] for r in reports)
    # Fewer than 10 is expected, within the README's bound: tokens leased by
    # a process whose whole burst was already in flight stay unspent until
    # the lease expires, at most one lease (here 1 token) per process.
    lease = 1  # min(20, capacity / 10)
    assert 10 - PROCESSES * lease <= admitted <= 10 + int(window * 1), reports
    assert seen and min(seen) >= 0
    assert float(redis.hget(ref.redis_key, "t") or 0) >= 0
    for report in reports:
        remaining = report["remaining"]
        assert all(0 <= value < 10 for value in remaining)
