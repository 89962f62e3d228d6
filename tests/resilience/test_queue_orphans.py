"""A queued job whose client is gone is not run for nobody."""

import asyncio
import time
from dataclasses import asdict
from typing import Any

from resilience.queue_consumer_worker import run_stream_job
from resilience.queue_request_handler import (
    JobPayload,
    QueueSettings,
    heartbeat_key,
    submit,
    waiting_key,
)


def payload(request_id: str) -> JobPayload:
    return JobPayload(
        request_id=request_id,
        caller="ip:192.0.2.1",
        messages=[{"role": "user", "content": "hi"}],
        model=None,
        max_tokens=3,
        provider=None,
        max_wait_seconds=30,
        job_timeout_seconds=30,
    )


def test_a_job_whose_reservation_went_stale_is_not_run(
    redis: Any, transactional_db: Any
) -> None:
    job = payload("orphan-1")
    asyncio.run(submit(job, QueueSettings(), time.monotonic))
    # The reservation expires when the API instance holding the client died.
    redis.zrem(waiting_key(), job.request_id)
    assert run_stream_job(asdict(job)) == {"outcome": "cancelled"}
    assert not redis.exists(heartbeat_key(job.request_id))


def test_a_job_still_in_line_runs(redis: Any, transactional_db: Any) -> None:
    job = payload("in-line-1")
    asyncio.run(submit(job, QueueSettings(), time.monotonic))
    assert run_stream_job(asdict(job))["outcome"] != "cancelled"
    assert redis.zcard(waiting_key()) == 0
