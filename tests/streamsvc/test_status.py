"""The live status page is for staff only, and its feed reports the queue."""

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from resilience import status
from resilience.circuit_breaker import CircuitBreaker
from resilience.stats import StatsBuffer, history
from tests.conftest import LiveServer
from tests.sse_client import chat, stream


@pytest.mark.django_db
def test_status_page_redirects_anonymous_and_refuses_non_staff(redis: Any) -> None:
    anonymous = Client().get("/status/")
    assert anonymous.status_code == 302
    assert "/admin/login/" in anonymous["Location"]
    user = get_user_model().objects.create_user("joe", password="pw-joe-123")
    client = Client()
    client.force_login(user)
    assert client.get("/status/").status_code == 302


@pytest.mark.django_db
def test_staff_see_the_status_page_and_the_admin_links_to_it(redis: Any) -> None:
    staff = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    client = Client()
    client.force_login(staff)
    page = client.get("/status/")
    assert page.status_code == 200
    assert b"/status/events" in client.get("/static/streamsvc/status.js").getvalue()
    index = client.get("/admin/").content
    assert b'href="/status/"' in index
    assert b'href="/admin/django_rq/dashboard/"' in index


@pytest.mark.timeout(60)
def test_the_feed_is_staff_only_and_streams_snapshots(
    daphne: LiveServer, transactional_db: Any, redis: Any
) -> None:
    assert httpx.get(daphne.url + "/status/events").status_code == 403
    staff = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    client = Client()
    client.force_login(staff)
    cookie = client.cookies["sessionid"].value
    with httpx.stream(
        "GET", daphne.url + "/status/events", cookies={"sessionid": cookie}, timeout=10
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = json.loads(line[6:])
                break
    assert set(data["queue"]) == {
        "depth",
        "oldest_wait_seconds",
        "workers",
        "busy_workers",
    }
    assert "series" in data["history"]


def staff_cookie() -> str:
    staff = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    client = Client()
    client.force_login(staff)
    return client.cookies["sessionid"].value


def snapshots(url: str, cookie: str) -> Iterator[dict[str, Any]]:
    with httpx.stream(
        "GET", url + "/status/events", cookies={"sessionid": cookie}, timeout=10
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


@pytest.mark.timeout(60)
def test_the_feed_shows_pool_occupancy_breakers_and_level_history(
    daphne: LiveServer, providers: Any, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "length": 200,
                                          "tokens_per_second": 20}},
        {"name": "backup"},
        pool={"global_max": 3, "per_user_max": 2},
    )  # fmt: skip
    CircuitBreaker("backup").force_open()
    holder = threading.Thread(target=stream, args=(daphne.url, chat()))
    holder.start()
    cookie = staff_cookie()
    seen = []
    for data in snapshots(daphne.url, cookie):
        seen.append(data)
        if len(seen) >= 2 and data["pool"]["in_use"] == 1:
            break
    holder.join(30)

    last = seen[-1]
    assert last["pool"]["global_max"] == 3
    assert last["pool"]["busiest"] == [{"caller": "ip:127.0.0.1", "in_use": 1}]
    states = {b["provider"]: b["state"] for b in last["breakers"]}
    assert states == {"simulated": "closed", "backup": "forced_open"}
    recorded = [s for s in last["history"]["series"] if "pool_in_use" in s]
    assert recorded and recorded[-1]["pool_in_use"] == 1
    assert "ttft_series" in last["history"]


async def test_counts_reach_the_shared_history(redis: Any) -> None:
    clock = [1_000_000.0]
    buffer = StatsBuffer(clock=lambda: clock[0])
    buffer.count("admitted", 3)
    buffer.ttft(0.25)
    await buffer.flush()
    clock[0] += 1
    data = history(clock[0], seconds=5)
    assert data["series"][-1]["admitted"] == 3
    assert data["ttft"]["p50"] == 0.25
    assert data["ttft_series"][-1]["p50"] == 0.25


def test_snapshot_reports_queue_depth(redis: Any) -> None:
    from resilience.queue_request_handler import waiting_key

    redis.zadd(waiting_key(), {"a": 1, "b": 2})
    assert status.queue_status()["depth"] == 2


async def test_the_last_counts_of_a_burst_reach_redis_without_more_traffic(
    redis: Any,
) -> None:
    import asyncio
    import time

    buffer = StatsBuffer()
    buffer.count("admitted")  # flushes at once (first of its second)
    await asyncio.sleep(0.05)
    buffer.count("admitted", 4)  # too soon: held, then flushed by a timer
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        total = sum(int(row["admitted"]) for row in
                    history(time.time() + 1, seconds=10)["series"]
                    if "admitted" in row)  # fmt: skip
        if total == 5:
            break
        await asyncio.sleep(0.1)
    assert total == 5


def test_workers_alive_leaves_out_a_worker_not_heard_from(redis: Any) -> None:
    # RQ keeps a killed worker's key for minutes; only recent beats count.
    from datetime import UTC, datetime, timedelta

    from django.conf import settings
    from rq.utils import utcformat

    from resilience import redis_client
    from resilience.queue_consumer_worker import StreamWorker
    from resilience.queue_request_handler import WORKER_ALIVE_SECONDS, rq_queue

    # (A Worker object raises its connection's socket timeout: the test's
    # own client, not the service's.)
    live = StreamWorker([rq_queue()], connection=redis, name="live")
    dead = StreamWorker([rq_queue()], connection=redis, name="dead")
    for worker in (live, dead):
        worker.register_birth()
    silent_since = datetime.now(UTC) - timedelta(seconds=WORKER_ALIVE_SECONDS + 5)
    redis.hset(dead.key, "last_heartbeat", utcformat(silent_since))
    assert len(redis.keys("rq:worker:*")) == 2
    assert status.queue_status()["workers"] == 1
    # Reading them leaves the service's short Redis timeout alone.
    kwargs = redis_client.sync_client().connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == settings.REDIS_TIMEOUT_SECONDS


def test_manage_py_rqworker_runs_a_worker_that_beats_every_ten_seconds() -> None:
    from django_rq.workers import get_worker

    from resilience.queue_consumer_worker import StreamWorker
    from resilience.queue_request_handler import WORKER_BEAT_SECONDS

    # As `manage.py rqworker streams` builds it (worker_ttl 420 by default).
    worker = get_worker("streams", worker_ttl=420)
    assert isinstance(worker, StreamWorker)
    assert worker.dequeue_timeout == WORKER_BEAT_SECONDS == 10
    assert worker.job_monitoring_interval == WORKER_BEAT_SECONDS
