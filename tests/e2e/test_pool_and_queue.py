"""Layers 2 and 3 end to end: real daphne, real Redis, real rqworkers."""

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from resilience.connection_pool_manager import HASH_TAG
from resilience.redis_client import key
from tests.conftest import LiveServer, wait_until
from tests.sse_client import StreamResult, chat, stream

pytestmark = pytest.mark.timeout(120)

Configure = Callable[..., None]
SLOW = {"ttft_ms": 0, "length": 40, "tokens_per_second": 20}
FAST = {"ttft_ms": 0, "length": 8, "tokens_per_second": 200}


def in_background(
    url: str, body: dict[str, Any], **kw: Any
) -> tuple[threading.Thread, dict[str, StreamResult]]:
    box: dict[str, StreamResult] = {}

    def run() -> None:
        box["result"] = stream(url, body, **kw)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def pool_in_use(redis: Any) -> int:
    return int(redis.zcard(key(HASH_TAG, "global")))


def test_a_full_pool_without_the_queue_answers_pool_full(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
        queue={"enabled": False},
    )
    holder, box = in_background(daphne.url, chat("first"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    refused = stream(daphne.url, chat("second"))
    assert refused.status == 503
    assert refused.body["error"]["code"] == "pool_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.body["error"]["retry_after"] == int(refused.headers["retry-after"])
    holder.join(30)
    assert box["result"].last()[0] == "done"
    assert wait_until(lambda: pool_in_use(redis) == 0, 2)


def test_overflow_is_queued_and_streams_the_same_text_as_the_direct_path(
    daphne: LiveServer, providers: Configure, workers: Any, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": FAST},
        pool={"global_max": 1, "per_user_max": 1},
    )
    direct = stream(daphne.url, chat("the same question"))
    assert direct.names()[0] == "start"

    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
    )
    workers(1)
    holder, _ = in_background(daphne.url, chat("hold the slot"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    queued = stream(daphne.url, chat("the same question", max_tokens=8))
    holder.join(30)

    assert queued.status == 200
    assert queued.names()[0] == "queued"
    assert queued.events[0][1]["position"] == 1
    request_id = queued.events[0][1]["request_id"]
    start = queued.events[queued.names().index("start")][1]
    assert start["request_id"] == request_id
    assert queued.last()[0] == "done"
    assert queued.text() == direct.text()
    assert queued.ids == list(range(1, len(queued.ids) + 1))


def test_positions_arrive_in_order(
    daphne: LiveServer, providers: Configure, workers: Any, redis: Any
) -> None:
    providers(
        {
            "name": "simulated",
            "options": {"ttft_ms": 0, "length": 10, "tokens_per_second": 10},
        },
        pool={"global_max": 1, "per_user_max": 1},
    )
    workers(1)
    holder, _ = in_background(daphne.url, chat("holder"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    waiting = []
    for index in range(3):
        thread, box = in_background(daphne.url, chat(f"q{index}"))
        waiting.append((thread, box))
        time.sleep(0.3)
    for thread, _ in waiting:
        thread.join(60)
    holder.join(30)
    last = waiting[-1][1]["result"]
    positions = [d["position"] for n, d in last.events if n == "queued"]
    assert positions[0] >= 2
    assert positions == sorted(positions, reverse=True)
    assert len(set(positions)) == len(positions)
    assert all(box["result"].last()[0] == "done" for _, box in waiting)


def test_a_full_queue_answers_queue_full_with_retry_after(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
        queue={"max_depth": 1, "per_user_max": 1, "max_wait_seconds": 4},
    )
    holder, _ = in_background(daphne.url, chat("holder"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    waiter, box = in_background(daphne.url, chat("waiter"))
    assert wait_until(lambda: redis.llen("rq:queue:streams") == 1)
    refused = stream(daphne.url, chat("third"))
    assert refused.status == 503
    assert refused.body["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    waiter.join(15)
    holder.join(30)
    assert box["result"].last()[1]["code"] == "queue_timeout"


def test_a_client_leaving_the_queue_removes_its_job(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
    )
    holder, _ = in_background(daphne.url, chat("holder"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    left = stream(daphne.url, chat("leaves"), stop_after=1)
    assert left.names() == ["queued"]
    assert wait_until(lambda: redis.llen("rq:queue:streams") == 0, 5)
    assert wait_until(lambda: redis.zcard(key("queue", "{q}", "waiting")) == 0, 5)
    holder.join(30)


def test_waiting_past_the_maximum_ends_with_queue_timeout(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
        queue={"max_wait_seconds": 1},
    )
    holder, _ = in_background(daphne.url, chat("holder"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    timed_out = stream(daphne.url, chat("patient"))
    assert timed_out.names()[0] == "queued"
    assert timed_out.last()[0] == "error"
    assert timed_out.last()[1]["code"] == "queue_timeout"
    assert redis.llen("rq:queue:streams") == 0
    holder.join(30)


def test_a_disconnect_releases_the_lease_at_once(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers({"name": "simulated", "options": SLOW})
    partial = stream(daphne.url, chat(), stop_after=2)
    assert partial.names() == ["start", "token"]
    assert wait_until(lambda: pool_in_use(redis) == 0, 1.5)


def test_a_lost_lease_ends_the_stream_with_lease_lost(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": {**SLOW, "length": 200}},
        pool={"lease_ttl_seconds": 1.5},
    )
    thread, box = in_background(daphne.url, chat())
    assert wait_until(lambda: pool_in_use(redis) == 1)
    for name in redis.scan_iter(match=key(HASH_TAG, "*")):
        redis.delete(name)
    thread.join(20)
    result = box["result"]
    assert result.last()[0] == "error"
    assert result.last()[1]["code"] == "lease_lost"
    assert "done" not in result.names()


def test_bad_requests_take_no_pool_slot(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers({"name": "simulated"})
    response = httpx.post(
        daphne.url + "/api/v1/chat/stream",
        content=b"{",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert pool_in_use(redis) == 0


def read_until_terminal(url: str, body: dict[str, Any]) -> tuple[list[Any], float]:
    """Read events until the first done/error; return them and when it came."""
    from tests.sse_client import StreamResult, collect

    with (
        httpx.Client(base_url=url, timeout=30) as client,
        client.stream("POST", "/api/v1/chat/stream", json=body) as response,
    ):
        result = StreamResult(response.status_code, response.headers)
        for piece in response.iter_raw():
            collect(response, result, piece)
            if result.events and result.events[-1][0] in ("done", "error"):
                return result.events, time.monotonic()
    return result.events, time.monotonic()


def test_c21_a_queued_stream_ends_with_queue_unavailable_when_redis_stops(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": {**SLOW, "length": 400}},
        pool={"global_max": 1, "per_user_max": 1},
    )
    holder, _ = in_background(daphne.url, chat("holder", max_tokens=200))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    box: dict[str, Any] = {}

    def wait_in_line() -> None:
        box["events"], box["ended"] = read_until_terminal(daphne.url, chat("w"))

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    assert wait_until(lambda: redis.zcard(key("queue", "{q}", "waiting")) == 1)

    paused_at = time.monotonic()
    redis.execute_command("CLIENT", "PAUSE", "12000")
    waiter.join(30)

    names = [name for name, _ in box["events"]]
    assert names[0] == "queued"
    assert box["events"][-1] == (
        "error",
        {"code": "queue_unavailable", "message": "lost contact with the queue "
         "(Redis)", "retry_after": None},
    )  # fmt: skip
    # Ended during the pause, not after it: no silent wait on a dead Redis.
    assert box["ended"] - paused_at < 11
    # Once Redis answers again the job is withdrawn and nothing is left over.
    assert wait_until(lambda: redis.zcard(key("queue", "{q}", "waiting")) == 0, 15)
    assert wait_until(lambda: redis.llen("rq:queue:streams") == 0, 5)
    holder.join(40)


def test_c21_with_redis_paused_a_full_pool_answers_queue_unavailable(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
    )
    redis.execute_command("CLIENT", "PAUSE", "8000")
    paused_at = time.monotonic()
    # The pool falls back to this instance's own count, which the holder fills.
    streaming = threading.Event()
    box: dict[str, Any] = {}

    def hold() -> None:
        with httpx.stream(
            "POST",
            daphne.url + "/api/v1/chat/stream",
            json=chat("holder", max_tokens=200),
            timeout=30,
        ) as response:
            body = b""
            for piece in response.iter_raw():
                body += piece
                if b"event: token" in body:
                    streaming.set()
            box["body"] = body

    holder = threading.Thread(target=hold)
    holder.start()
    assert streaming.wait(6), "the holder streams while Redis is paused"
    asked_at = time.monotonic()
    refused = stream(daphne.url, chat("overflow"))
    assert refused.status == 503
    assert refused.body["error"]["code"] == "queue_unavailable"
    assert time.monotonic() - asked_at < 3
    assert time.monotonic() - paused_at < 8
    holder.join(40)
    assert box["body"].rstrip().endswith(b"}") and b"event: done" in box["body"]


def test_c02_a_request_waiting_in_line_gets_heartbeats(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
        queue={"max_wait_seconds": 2.5},
    )
    holder, _ = in_background(daphne.url, chat("holder"))
    assert wait_until(lambda: pool_in_use(redis) == 1)
    waited = stream(daphne.url, chat("patient"))
    assert waited.names() == ["queued", "error"]
    # The live server beats every 0.5 s while nothing else is sent.
    between = waited.raw.split(b"event: queued")[1].split(b"event: error")[0]
    assert between.count(b": ping\n\n") >= 3
    holder.join(30)


LONG = {"ttft_ms": 0, "length": 400, "tokens_per_second": 20}


def queue_behind_a_holder(
    daphne: LiveServer, providers: Configure, redis: Any
) -> threading.Thread:
    """Fill the pool of one with a stream that leaves after a few seconds."""
    providers(
        {"name": "simulated", "options": LONG},
        pool={"global_max": 1, "per_user_max": 1},
    )
    holder, _ = in_background(daphne.url, chat("holder"), stop_after=80)
    assert wait_until(lambda: pool_in_use(redis) == 1)
    return holder


def test_a_client_leaving_while_a_worker_streams_stops_the_job_within_a_second(
    daphne: LiveServer, providers: Configure, workers: Any, redis: Any
) -> None:
    workers(1)
    holder = queue_behind_a_holder(daphne, providers, redis)
    left = stream(daphne.url, chat("leaves mid-answer"), stop_at="token")
    left_at = time.monotonic()
    assert left.names()[0] == "queued"
    assert left.names()[-1] == "token"
    request_id = left.events[0][1]["request_id"]
    # The job's heartbeat goes when the worker stops streaming for nobody
    # (20 s of answer were left); 1 s is the target, the rest is slack.
    assert wait_until(lambda: not redis.exists(key("queue", "hb", request_id)), 10)
    assert time.monotonic() - left_at < 3
    job = f"rq:job:{request_id}"
    assert wait_until(lambda: redis.hget(job, "status") == b"finished", 10)
    from rq.job import Job

    assert Job.fetch(request_id, connection=redis).return_value() == {
        "outcome": "cancelled"
    }
    holder.join(30)


def test_a_worker_killed_mid_stream_ends_the_stream_with_worker_lost(
    daphne: LiveServer, providers: Configure, workers: Any, redis: Any
) -> None:
    import os
    import signal

    (worker,) = workers(1)
    holder = queue_behind_a_holder(daphne, providers, redis)
    killed: list[float] = []

    def kill_at_first_token(name: str, data: dict[str, Any]) -> None:
        if name == "token" and not killed:
            with open(f"/proc/{worker.pid}/task/{worker.pid}/children") as f:
                horses = [int(pid) for pid in f.read().split()]
            assert horses, "the job runs in a forked work-horse"
            for pid in (worker.pid, *horses):
                os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())

    lost = stream(daphne.url, chat("cut off"), on_event=kill_at_first_token)
    assert killed
    assert lost.names()[0] == "queued"
    assert lost.last()[0] == "error"
    assert lost.last()[1]["code"] == "worker_lost"
    assert time.monotonic() - killed[0] < 10
    request_id = lost.events[0][1]["request_id"]
    assert redis.hget(f"rq:job:{request_id}", "status") == b"failed"
    holder.join(30)


@pytest.mark.timeout(180)
def test_many_streams_cut_at_random_points_leave_the_pool_empty(
    daphne: LiveServer, providers: Configure, redis: Any
) -> None:
    # Scaled down from the 1,000 (this runs in CI on 2 cores): real
    # HTTP streams, each closed by its client at a random point, before the
    # headers, mid-answer or not at all.
    import asyncio
    import random

    providers(
        {"name": "simulated",
         "options": {"ttft_ms": 0, "length": 40, "tokens_per_second": 80}},
        pool={"global_max": 200, "per_user_max": 200},
    )  # fmt: skip
    rng = random.Random(20261204)
    plans = [rng.choice([0, 1, 2, 5, 10, 20, None]) for _ in range(120)]
    peak: list[int] = []

    async def one(client: httpx.AsyncClient, index: int, chunks: int | None) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        body = chat(f"stream {index}")
        async with client.stream("POST", "/api/v1/chat/stream", json=body) as r:
            if chunks == 0:
                return  # leave as soon as the headers are in
            seen = 0
            async for _ in r.aiter_raw():
                seen += 1
                if chunks is not None and seen >= chunks:
                    return  # leave mid-answer

    async def run() -> None:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=daphne.url, timeout=60, limits=limits
        ) as client:
            tasks = [one(client, i, plan) for i, plan in enumerate(plans)]
            watcher = asyncio.ensure_future(watch())
            await asyncio.gather(*tasks)
            watcher.cancel()

    async def watch() -> None:
        while True:
            peak.append(pool_in_use(redis))
            await asyncio.sleep(0.05)

    asyncio.run(run())
    last_left = time.monotonic()
    assert max(peak) > 1  # the streams did overlap
    assert wait_until(lambda: pool_in_use(redis) == 0, 5)
    # 1 s is the contract; the rest is slack for a loaded machine.
    assert time.monotonic() - last_left < 3
    pool_sets = [k for k in redis.keys(key(HASH_TAG, "*")) if redis.type(k) == b"zset"]
    assert sum(redis.zcard(k) for k in pool_sets) == 0  # per-caller sets too
