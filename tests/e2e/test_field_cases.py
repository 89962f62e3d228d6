"""Field cases (shared/CASES.md) that need the whole service running."""

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from resilience.models import ApiKey
from tests.conftest import LiveServer, wait_until
from tests.sse_client import chat, stream

pytestmark = pytest.mark.timeout(90)

Configure = Callable[..., None]


def test_c20_a_slow_database_lookup_does_not_stall_other_streams(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {
            "name": "simulated",
            "options": {"ttft_ms": 0, "length": 30, "tokens_per_second": 20},
        }
    )
    user = get_user_model().objects.create_user("slowpoke")
    _, raw = ApiKey.issue(user)

    # A running stream whose token rate we watch.
    times: list[float] = []

    def watch() -> None:
        body = {"messages": [{"role": "user", "content": "steady"}]}
        with httpx.stream(
            "POST", daphne.url + "/api/v1/chat/stream", json=body, timeout=30
        ) as response:
            for line in response.iter_lines():
                if line.startswith("event: token"):
                    times.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)

    # Lock the database so the key lookup (a cache miss) blocks for seconds.
    db = sqlite3.connect(settings.DATABASES["default"]["NAME"], timeout=1)
    db.execute("BEGIN EXCLUSIVE")
    slow_result: dict[str, Any] = {}

    def slow_caller() -> None:
        started = time.monotonic()
        slow_result["stream"] = stream(
            daphne.url, chat("slow"), headers={"Authorization": f"Bearer {raw}"}
        )
        slow_result["seconds"] = time.monotonic() - started

    slow = threading.Thread(target=slow_caller)
    slow.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        other = stream(daphne.url, chat("other", max_tokens=2))
        other_latency = time.monotonic() - started
        time.sleep(1.0)
    finally:
        db.rollback()
        db.close()
    slow.join(30)
    watcher.join(30)

    assert other.last()[0] == "done"
    assert other_latency < 1.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 30
    assert max(gaps) < 0.5, gaps
    assert slow_result["stream"].last()[0] == "done"
    assert slow_result["seconds"] > 1.0


def test_c21_a_redis_that_stops_answering_is_handled_per_policy(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    from resilience.connection_pool_manager import HASH_TAG
    from resilience.redis_client import key

    providers(
        {"name": "simulated",
         "options": {"ttft_ms": 0, "length": 40, "tokens_per_second": 10}},
        rate_limits=[{"name": "c21-open", "scope": "ip", "capacity": 100,
                      "refill_per_second": 50}],
    )  # fmt: skip
    results: list[Any] = []
    first_byte: list[float] = []

    def run(text: str) -> None:
        started = time.monotonic()
        with httpx.stream(
            "POST", daphne.url + "/api/v1/chat/stream", json=chat(text), timeout=30
        ) as response:
            first_byte.append(time.monotonic() - started)
            body = response.read()
        results.append((response.status_code, body))

    running = [threading.Thread(target=run, args=(f"early {i}",)) for i in range(3)]
    for thread in running:
        thread.start()
    time.sleep(0.5)

    redis.execute_command("CLIENT", "PAUSE", "3000")
    paused_at = time.monotonic()
    during = [threading.Thread(target=run, args=(f"paused {i}",)) for i in range(4)]
    for thread in during:
        thread.start()
        time.sleep(0.2)
    for thread in running + during:
        thread.join(40)

    assert time.monotonic() - paused_at < 35
    assert len(results) == 7
    assert all(status == 200 for status, _ in results), results
    assert all(
        body.rstrip().split(b"\n\n")[-1].count(b"event: done") == 1
        for _, body in results
    ), [b[-200:] for _, b in results]
    # Each answered within the Redis timeout (0.5 s) plus generous slack.
    assert max(first_byte) < 3.0, first_byte

    # Normal service within seconds of the pause ending, nothing leaked.
    after = stream(daphne.url, chat("after", max_tokens=2))
    assert after.last()[0] == "done"
    assert wait_until(lambda: redis.zcard(key(HASH_TAG, "global")) == 0, 10)
