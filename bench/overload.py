"""Overload benchmark: a burst of 3x the pool size, direct and queued.

Starts its own Redis, database, daphne and RQ workers on loopback, sends a
burst of ``3 * pool`` concurrent streams against the simulated provider and
prints, from one run: requests completed and dropped, time to first token
(p50/p99) for direct and queued requests, and the measured queue wait next
to the theoretical minimum (queued requests are served by the workers, so
the k-th in line cannot start before ``floor((k-1) / workers)`` stream
durations). Run: ``.venv/bin/python -m bench.overload``.
"""

import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvc.embedded_redis import EmbeddedRedis, free_port  # noqa: E402

POOL = 4
WORKERS = 2
BURST = 3 * POOL
TOKENS = 20
TOKENS_PER_SECOND = 50.0
TTFT_MS = 100


def policies() -> dict[str, Any]:
    options = {"ttft_ms": TTFT_MS, "length": TOKENS,
               "tokens_per_second": TOKENS_PER_SECOND}  # fmt: skip
    return {
        "providers": [{"name": "simulated", "kind": "simulated", "order": 0,
                       "enabled": True, "options": options}],
        "pool": {"global_max": POOL, "per_user_max": POOL, "lease_ttl_seconds": 30},
        "queue": {"enabled": True, "max_depth": 100, "per_user_max": 100,
                  "max_wait_seconds": 120, "job_timeout_seconds": 120},
        "rate_limits": [],
    }  # fmt: skip


def manage(env: dict[str, str], *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, input=stdin,
        text=True, check=True, capture_output=True,
    )  # fmt: skip


async def one(client: httpx.AsyncClient, index: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": f"burst {index}"}]}
    sent = time.monotonic()
    result: dict[str, Any] = {"queued": False, "ttft": None, "end": None}
    async with client.stream("POST", "/api/v1/chat/stream", json=body) as response:
        if response.status_code != 200:
            result["end"] = f"http {response.status_code}"
            return result
        async for line in response.aiter_lines():
            if line.startswith("event: queued"):
                result["queued"] = True
            elif line.startswith("event: start"):
                result["started"] = time.monotonic() - sent
            elif line.startswith("event: token") and result["ttft"] is None:
                result["ttft"] = time.monotonic() - sent
            elif line.startswith(("event: done", "event: error")):
                result["end"] = line.split(": ", 1)[1]
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def report(results: list[dict[str, Any]]) -> None:
    done = [r for r in results if r["end"] == "done"]
    direct = [r["ttft"] for r in done if not r["queued"]]
    queued = [r["ttft"] for r in done if r["queued"]]
    duration = TTFT_MS / 1000 + (TOKENS - 1) / TOKENS_PER_SECOND
    minimum = [
        math.floor(k / WORKERS) * duration + TTFT_MS / 1000 for k in range(len(queued))
    ]
    print(f"burst {BURST} streams, pool {POOL}, workers {WORKERS}")
    print(f"completed {len(done)}  dropped {len(results) - len(done)}")
    print(f"direct  n={len(direct):2d}  TTFT p50 {percentile(direct, .5):.3f} s  "
          f"p99 {percentile(direct, .99):.3f} s")  # fmt: skip
    print(f"queued  n={len(queued):2d}  TTFT p50 {percentile(queued, .5):.3f} s  "
          f"p99 {percentile(queued, .99):.3f} s")  # fmt: skip
    if queued:
        measured = sum(queued) / len(queued)
        ideal = sum(minimum) / len(minimum)
        print(f"queued mean TTFT {measured:.3f} s vs theoretical minimum "
              f"{ideal:.3f} s (ratio {measured / ideal:.2f})")  # fmt: skip


async def burst(url: str) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=BURST * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(BURST)))


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    redis = EmbeddedRedis(workdir / "redis", persist=False)
    redis.start()
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "STREAMSVC_VAR_DIR": str(workdir),
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "streamsvc.settings",
    }
    children: list[subprocess.Popen[bytes]] = []
    try:
        manage(env, "migrate", "-v", "0")
        manage(env, "policies", "import", "-", stdin=json.dumps(policies()))
        port = free_port()
        daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                  "streamsvc.asgi:application"]  # fmt: skip
        quiet: Any = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        children.append(subprocess.Popen(daphne, cwd=ROOT, env=env, **quiet))
        for _ in range(WORKERS):
            worker = [sys.executable, "manage.py", "rqworker", "streams"]
            children.append(subprocess.Popen(worker, cwd=ROOT, env=env, **quiet))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1.5)  # let the workers register
        report(asyncio.run(burst(url)))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        redis.stop()


if __name__ == "__main__":
    main()
