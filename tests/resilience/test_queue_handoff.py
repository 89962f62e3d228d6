"""Layer 3 handoff against a real Redis and a real `rqworker` process."""

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from channels.layers import get_channel_layer
from rq.job import Job
from rq.results import Result

from llm.base import ChatRequest, Message
from llm.models import Provider
from llm.simulated import SimulatedProvider
from resilience import queue_request_handler as handler
from resilience.pipeline import stream_events
from resilience.queue_request_handler import JobPayload, QueueSettings
from tests.conftest import ROOT, live_env, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def worker(transactional_db: Any, redis: Any) -> Iterator[subprocess.Popen[bytes]]:
    env = live_env(DJANGO_SETTINGS_MODULE="streamsvc.settings")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "rqworker", "streams"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_until(lambda: bool(redis.keys("rq:worker:*")), timeout=20)
    yield process
    process.terminate()
    process.wait(10)


def payload(text: str = "queued hello", **extra: Any) -> JobPayload:
    values: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "caller": "ip:127.0.0.1",
        "messages": [{"role": "user", "content": text}],
        "model": None,
        "max_tokens": None,
        "provider": None,
        "max_wait_seconds": 30.0,
        "job_timeout_seconds": 60.0,
        **extra,
    }
    return JobPayload(**values)


async def follow(job: JobPayload, policy: QueueSettings | None = None) -> list[Any]:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(job.group, channel)
    ticket = await handler.submit(job, policy or QueueSettings(), time.monotonic)
    follower = handler.Follower(ticket, layer, channel)
    return [(e.name, e.data) async for e in follower.events()]


async def test_a_queued_request_streams_the_same_text_as_the_direct_path(
    worker: Any,
) -> None:
    options = {"ttft_ms": 0, "length": 12, "tokens_per_second": 200}
    await Provider.objects.aupdate_or_create(
        name="simulated", defaults={"kind": "simulated", "options": options}
    )
    job = payload()
    got = await follow(job)

    from llm.registry import ProviderConfig
    from resilience.circuit_breaker import AsyncCircuitBreaker
    from resilience.policies import ProviderEntry

    direct = ProviderEntry(
        ProviderConfig("simulated", "simulated", 0, True, options),
        SimulatedProvider("simulated", options),
        AsyncCircuitBreaker("direct-reference"),
    )
    request = ChatRequest((Message("user", "queued hello"),))
    expected = [(e.name, e.data) async for e in stream_events(request, [direct], "x")]
    assert got[0] == ("queued", {"request_id": job.request_id, "position": 1})
    assert [n for n, _ in got[1:]] == [n for n, _ in expected]
    text = "".join(d["text"] for n, d in got if n == "token")
    assert text == "".join(d["text"] for n, d in expected if n == "token")
    assert got[1][1]["request_id"] == job.request_id
    assert got[-1] == expected[-1]


async def set_simulated(**options: Any) -> None:
    await Provider.objects.aupdate_or_create(
        name="simulated", defaults={"kind": "simulated", "options": options}
    )


async def start_following(
    job: JobPayload, policy: QueueSettings | None = None
) -> handler.Follower:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(job.group, channel)
    ticket = await handler.submit(job, policy or QueueSettings(), time.monotonic)
    return handler.Follower(ticket, layer, channel)


async def test_positions_move_up_in_order_while_waiting(worker: Any) -> None:
    import asyncio

    await set_simulated(ttft_ms=0, length=6, tokens_per_second=4)
    followers = [await start_following(payload(f"p{i}")) for i in range(3)]
    assert [f.ticket.position for f in followers] == [1, 2, 3]

    async def names(follower: handler.Follower) -> list[Any]:
        return [(e.name, e.data) async for e in follower.events()]

    results = await asyncio.gather(*(names(f) for f in followers))
    last = results[2]
    positions = [d["position"] for n, d in last if n == "queued"]
    assert positions[0] == 3
    assert positions == sorted(positions, reverse=True)
    assert len(positions) >= 2
    assert all(r[-1][0] == "done" for r in results)


async def test_queue_depth_and_per_caller_caps_refuse_with_retry_after(
    redis: Any,
) -> None:
    policy = QueueSettings(max_depth=2, per_user_max=1)
    layer = get_channel_layer()
    first = payload(caller="user:1")
    await handler.submit(first, policy, time.monotonic)
    with pytest.raises(handler.QueueFull, match="per_user") as caught:
        await handler.submit(payload(caller="user:1"), policy, time.monotonic)
    assert caught.value.retry_after_seconds is not None
    assert caught.value.retry_after_seconds >= 1
    await handler.submit(payload(caller="user:2"), policy, time.monotonic)
    with pytest.raises(handler.QueueFull, match="global"):
        await handler.submit(payload(caller="user:3"), policy, time.monotonic)
    assert layer is not None


async def test_a_client_leaving_while_queued_removes_its_job(
    redis: Any, transactional_db: Any
) -> None:
    job = payload()
    await handler.submit(job, QueueSettings(), time.monotonic)
    assert await handler.position(job.request_id) == 1
    assert redis.lrange("rq:queue:streams", 0, -1) == [job.request_id.encode()]
    await handler.withdraw(job)
    assert await handler.position(job.request_id) is None
    assert redis.lrange("rq:queue:streams", 0, -1) == []


async def test_a_client_leaving_while_streaming_stops_the_worker_within_a_second(
    worker: Any, redis: Any
) -> None:
    await set_simulated(ttft_ms=0, length=400, tokens_per_second=20)
    job = payload()
    follower = await start_following(job)
    stream = follower.events()
    async for event in stream:
        if event.name == "token":
            break
    await stream.aclose()  # type: ignore[attr-defined]
    left_at = time.monotonic()
    await handler.withdraw(job)
    key = handler.heartbeat_key(job.request_id)
    assert wait_until(lambda: not redis.exists(key), timeout=5)
    assert time.monotonic() - left_at < 2.5
    assert wait_until(
        lambda: redis.hget(f"rq:job:{job.request_id}", "status") == b"finished"
    )


def children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as handle:
        return [int(child) for child in handle.read().split()]


def failure_reason(redis: Any, request_id: str) -> str | None:
    """Return the reason RQ shows for a failed job (its latest failed result)."""
    result = Job.fetch(request_id, connection=redis).latest_result()
    if result is None or result.type != Result.Type.FAILED:
        return None
    return result.exc_string


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        # The worker sees its work-horse die and records why itself.
        ("horse", "Work-horse terminated unexpectedly"),
        # Nobody is left but the follower, which marks the job lost.
        ("whole worker", "worker_lost"),
    ],
)
async def test_a_killed_worker_ends_the_stream_with_worker_lost(
    worker: subprocess.Popen[bytes], redis: Any, target: str, reason: str
) -> None:
    import os
    import signal

    await set_simulated(ttft_ms=0, length=400, tokens_per_second=10)
    job = payload()
    follower = await start_following(job)
    got: list[tuple[str, Any]] = []
    killed_at = 0.0
    async for event in follower.events():
        got.append((event.name, event.data))
        if event.name == "token" and not killed_at:
            horses = children(worker.pid)
            assert horses, "the job runs in a forked work-horse"
            victims = horses if target == "horse" else [worker.pid, *horses]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
    assert got[-1][0] == "error"
    assert got[-1][1]["code"] == "worker_lost"
    assert time.monotonic() - killed_at < 10
    assert wait_until(
        lambda: redis.hget(f"rq:job:{job.request_id}", "status") == b"failed"
    )
    failed = handler.rq_queue().failed_job_registry
    assert job.request_id in failed.get_job_ids()
    recorded = wait_until(lambda: failure_reason(redis, job.request_id) is not None, 5)
    assert recorded
    assert reason in (failure_reason(redis, job.request_id) or "")


async def started_ticket(redis: Any) -> tuple[handler.Follower, JobPayload, Any]:
    """A follower for a job 'already running', played by the test itself."""
    job = payload()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(job.group, channel)
    redis.set(handler.heartbeat_key(job.request_id), "running", px=5000)
    ticket = handler.Ticket(job, 1, time.monotonic())
    return handler.Follower(ticket, layer, channel), job, layer


def journal(redis: Any, job: JobPayload, seq: int, batch: list[list[Any]]) -> None:
    import json

    redis.xadd(
        handler.journal_key(job.request_id), {"seq": seq, "events": json.dumps(batch)}
    )


START = ["start", {"request_id": "r", "provider": "p", "model": "m"}]
DONE = ["done", {"finish_reason": "stop", "usage": {}}]


async def test_a_batch_the_channel_layer_dropped_is_filled_from_the_journal(
    redis: Any,
) -> None:
    follower, job, layer = await started_ticket(redis)
    journal(redis, job, 1, [START, ["token", {"text": "a"}]])
    journal(redis, job, 2, [["token", {"text": "b"}], DONE])
    await layer.group_send(
        job.group,
        {"type": "stream.batch", "seq": 2, "events": [["token", {"text": "b"}], DONE]},
    )
    got = [(e.name, e.data) async for e in follower.events()]
    assert [n for n, _ in got] == ["queued", "start", "token", "token", "done"]
    assert "".join(d["text"] for n, d in got if n == "token") == "ab"


async def test_a_lost_tail_is_read_from_the_journal(redis: Any) -> None:
    follower, job, _ = await started_ticket(redis)
    journal(redis, job, 1, [START, ["token", {"text": "z"}], DONE])
    got = [e.name async for e in follower.events()]
    assert got == ["queued", "start", "token", "done"]


async def test_a_gap_the_journal_cannot_fill_ends_with_an_error(redis: Any) -> None:
    follower, job, layer = await started_ticket(redis)
    await layer.group_send(
        job.group,
        {"type": "stream.batch", "seq": 2, "events": [["token", {"text": "b"}]]},
    )
    got = [(e.name, e.data) async for e in follower.events()]
    assert [n for n, _ in got] == ["queued", "error"]
    assert got[-1][1]["code"] == "internal_error"


async def test_duplicate_batches_are_delivered_once(redis: Any) -> None:
    follower, job, layer = await started_ticket(redis)
    batch = {"type": "stream.batch", "seq": 1, "events": [START]}
    await layer.group_send(job.group, batch)
    await layer.group_send(job.group, batch)
    await layer.group_send(
        job.group, {"type": "stream.batch", "seq": 2, "events": [DONE]}
    )
    got = [e.name async for e in follower.events()]
    assert got == ["queued", "start", "done"]


async def test_redis_unreachable_makes_the_queue_unavailable(redis: Any) -> None:
    from tests.redis_plugin import redis_server

    server = redis_server()
    server.stop()
    try:
        with pytest.raises(handler.QueueUnavailable):
            await handler.submit(payload(), QueueSettings(), time.monotonic)
    finally:
        server.start()


@pytest.mark.timeout(240)
async def test_c04_two_hundred_jobs_on_one_worker_keep_redis_connections_flat(
    transactional_db: Any, redis: Any, tmp_path: Any
) -> None:
    await set_simulated(ttft_ms=0, length=3, tokens_per_second=1000)
    log = tmp_path / "worker.log"
    env = live_env(DJANGO_SETTINGS_MODULE="streamsvc.settings")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "rqworker", "streams"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(lambda: bool(redis.keys("rq:worker:*")), timeout=20)
        samples = []
        for index in range(200):
            job = payload(f"job {index}")
            got = await follow(job)
            assert got[-1][0] == "done", got[-1]
            assert [n for n, _ in got].count("token") == 3
            key = f"rq:job:{job.request_id}"
            assert wait_until(lambda k=key: redis.hget(k, "status") == b"finished")
            samples.append(redis.info("clients")["connected_clients"])
    finally:
        process.terminate()
        process.wait(10)
    settled = samples[10:]
    # Connections of earlier tests may close meanwhile, so a fall is not a
    # leak; a leak is a rise from any earlier sample.
    rise = max(later - min(settled[: i + 1]) for i, later in enumerate(settled))
    assert rise <= 4, samples
    text = log.read_text()
    assert "Event loop is closed" not in text
    assert "attached to a different loop" not in text
    assert "Traceback" not in text


async def test_the_journal_is_read_from_where_the_last_read_ended(redis: Any) -> None:
    # A follower checks the journal every half second while a job runs:
    # each check reads only what the worker added since, not the whole log.
    job = payload()
    journal(redis, job, 1, [START])
    first, last = await handler.read_journal(job.request_id)
    assert list(first) == [1]
    journal(redis, job, 2, [["token", {"text": "x"}]])
    journal(redis, job, 3, [DONE])
    second, newer = await handler.read_journal(job.request_id, last)
    assert list(second) == [2, 3]
    nothing, same = await handler.read_journal(job.request_id, newer)
    assert nothing == {} and same == newer


def test_rq_gives_a_long_generation_the_policys_time_not_its_180_s(redis: Any) -> None:
    job = payload(job_timeout_seconds=900.0)
    handler._enqueue(job)
    enqueued = Job.fetch(job.request_id, connection=redis)
    # Our deadline (900 s) ends the stream with an event; RQ's own timeout
    # is the backstop just behind it, never its 180 s default.
    assert enqueued.timeout == 930
