"""Layer 3 handoff against a real Redis and a real `rqworker` process."""

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from channels.layers import get_channel_layer

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
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    assert wait_until(lambda: bool(redis.keys("rq:worker:*")), timeout=20)
    yield process
    process.terminate()
    process.wait(10)


def payload(text: str = "queued hello", **extra: Any) -> JobPayload:
    values: dict[str, Any] = {
        "request_id": str(uuid.uuid4()), "caller": "ip:127.0.0.1",
        "messages": [{"role": "user", "content": text}], "model": None,
        "max_tokens": None, "provider": None, "max_wait_seconds": 30.0,
        "job_timeout_seconds": 60.0, **extra,
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

    direct = SimulatedProvider("simulated", options)
    request = ChatRequest((Message("user", "queued hello"),))
    expected = [(e.name, e.data) async for e in stream_events(request, direct, "x")]
    assert got[0] == ("queued", {"request_id": job.request_id, "position": 1})
    assert [n for n, _ in got[1:]] == [n for n, _ in expected]
    text = "".join(d["text"] for n, d in got if n == "token")
    assert text == "".join(d["text"] for n, d in expected if n == "token")
    assert got[1][1]["request_id"] == job.request_id
    assert got[-1] == expected[-1]
