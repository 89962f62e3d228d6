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
from tests.conftest import LiveServer
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
