"""Layer 3, consumer side: the RQ job that streams a queued answer back.

``run_stream_job`` is what ``manage.py rqworker streams`` runs. It is a thin
synchronous shell around one event loop for the whole job (shared/CASES.md
C04): the job runs the same ``stream_events`` pipeline as the direct path and
publishes batches of events to the request's group and journal. Every Redis
connection it opens belongs to that loop and is closed before the loop ends,
so 200 jobs in a row leave ``connected_clients`` where it was, and nothing is
ever used from a loop it does not belong to.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis.exceptions import RedisError
from rq import Worker

from llm.base import ChatRequest, Message, Role

from . import conf, events, redis_client
from .events import StreamEvent
from .pipeline import stream_events
from .policies import policy_cache
from .queue_request_handler import (
    HEARTBEAT_EVERY,
    HEARTBEAT_TTL_MS,
    JOURNAL_TTL_SECONDS,
    START,
    WORKER_BEAT_SECONDS,
    JobPayload,
    caller_key,
    cancel_key,
    durations_key,
    encode_batch,
    heartbeat_key,
    journal_key,
    waiting_key,
)
from .streams import cancel_and_wait, raise_if_cancelling, with_heartbeats

logger = logging.getLogger(__name__)

# Tokens are sent in batches this old at most: one message per token would
# cost a Redis round trip each and fill the channel's capacity.
BATCH_SECONDS = 0.04
CANCEL_CHECK_EVERY = 0.25


class StreamWorker(Worker):
    """RQ's forking worker, registering itself every 10 s, busy or idle.

    RQ refreshes a worker's registration when its blocking dequeue times out
    (``worker_ttl`` - 15 s: every 405 s by default) and every
    ``job_monitoring_interval`` (30 s) during a job, and a killed worker
    stays listed until its key expires (up to 8 minutes). With a beat every
    ``WORKER_BEAT_SECONDS`` the status page and the ``queue_full`` wait
    estimate can count only workers heard from recently. ``manage.py
    rqworker`` uses it through ``settings.RQ["WORKER_CLASS"]``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_monitoring_interval = min(
            self.job_monitoring_interval, WORKER_BEAT_SECONDS
        )

    @property
    def dequeue_timeout(self) -> int:
        return min(WORKER_BEAT_SECONDS, super().dequeue_timeout)


def run_stream_job(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point: stream one queued request; return its outcome."""
    job = JobPayload(**payload)
    return asyncio.run(_run(job))


def new_layer() -> RedisChannelLayer:
    """A channel layer of this job's own, closed with the job's loop."""
    config: Any = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    return RedisChannelLayer(**config)


async def _run(job: JobPayload) -> dict[str, Any]:
    layer = new_layer()
    publisher = Publisher(job, layer)
    started = time.monotonic()
    try:
        keys = [waiting_key(), caller_key(job.caller), heartbeat_key(job.request_id),
                cancel_key(job.request_id)]  # fmt: skip
        args = [job.request_id, HEARTBEAT_TTL_MS]
        if not await START.run(keys, args):
            logger.info("queue %s: cancelled before it started", job.request_id)
            return {"outcome": "cancelled"}
        outcome = await _stream(job, publisher)
        await _record_duration(time.monotonic() - started)
        return {"outcome": outcome}
    finally:
        with contextlib.suppress(RedisError, OSError):
            redis_client.count_round_trip("queue")
            await redis_client.async_client().delete(heartbeat_key(job.request_id))
        await layer.close_pools()
        await _close_provider_clients()
        await redis_client.aclose_async_client()


async def _stream(job: JobPayload, publisher: "Publisher") -> str:
    heartbeat = asyncio.ensure_future(_beat(job.request_id))
    runner = asyncio.ensure_future(_publish_events(job, publisher))
    watcher = asyncio.ensure_future(_watch_cancel(job.request_id))
    try:
        done, _ = await asyncio.wait(
            {runner, watcher}, return_when=asyncio.FIRST_COMPLETED
        )
        if runner in done:
            return runner.result()
        logger.info("queue %s: client left, stopping", job.request_id)
        return "cancelled"
    finally:
        await cancel_and_wait(heartbeat, runner, watcher)


async def _publish_events(job: JobPayload, publisher: "Publisher") -> str:
    source = await _events(job)
    async for event in batched(source, BATCH_SECONDS):
        if event is None:
            await publisher.flush()
            continue
        publisher.add(event)
        if event.terminal:
            await publisher.flush()
            return event.name
        if publisher.age() >= BATCH_SECONDS:
            await publisher.flush()
    return "incomplete"


async def _events(job: JobPayload) -> AsyncIterator[StreamEvent]:
    snapshot = await policy_cache.aget()
    entry = (
        snapshot.provider(job.provider)
        if job.provider
        else next(iter(snapshot.enabled_providers()), None)
    )
    if entry is None:
        return _single(events.error("provider_unavailable", "no provider is enabled"))
    # Roles were validated before the job was queued.
    messages = tuple(Message(cast(Role, m["role"]), m["content"]) for m in job.messages)
    request = ChatRequest(
        messages,
        job.model,
        job.max_tokens,
    )
    return _deadline(
        stream_events(
            request,
            snapshot.candidates(entry),
            job.request_id,
            snapshot.retry,
            item_timeout=conf.number("PROVIDER_IDLE_SECONDS"),
        ),
        job.job_timeout_seconds,
    )


async def _single(event: StreamEvent) -> AsyncIterator[StreamEvent]:
    yield event


async def _deadline(
    source: AsyncIterator[StreamEvent], seconds: float
) -> AsyncIterator[StreamEvent]:
    """End the stream with an error event if the job runs past its timeout."""
    deadline = time.monotonic() + seconds
    iterator = aiter(source)
    started = False
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                event = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            # Before any text the provider never answered in time; after,
            # the answer was cut short (the README's two codes).
            code = "upstream_error" if started else "provider_unavailable"
            yield events.error(code, "the answer took longer than the job timeout")
            return
        started = started or event.name == events.TOKEN
        yield event


def batched(
    source: AsyncIterator[StreamEvent], seconds: float
) -> AsyncIterator[StreamEvent | None]:
    """Yield events, and None when ``seconds`` pass without one (flush)."""
    return with_heartbeats(source, seconds)  # type: ignore[arg-type]


class Publisher:
    """Send numbered batches to the request's group and journal."""

    def __init__(self, job: JobPayload, layer: RedisChannelLayer) -> None:
        self.job = job
        self.layer = layer
        self.seq = 0
        self.batch: list[StreamEvent] = []
        self.first_at = 0.0

    def add(self, event: StreamEvent) -> None:
        if not self.batch:
            self.first_at = time.monotonic()
        self.batch.append(event)

    def age(self) -> float:
        return time.monotonic() - self.first_at if self.batch else 0.0

    async def flush(self) -> None:
        if not self.batch:
            return
        self.seq += 1
        encoded = encode_batch(self.batch)
        self.batch = []
        await self._journal(encoded)
        try:
            await self.layer.group_send(
                self.job.group,
                {"type": "stream.batch", "seq": self.seq, "events": encoded},
            )
        except (RedisError, OSError) as exc:
            # The journal holds the batch; the follower reads it from there.
            logger.warning("queue %s: group send failed (%s)", self.job.request_id, exc)

    async def _journal(self, encoded: list[list[Any]]) -> None:
        client = redis_client.async_client()
        key = journal_key(self.job.request_id)
        redis_client.count_round_trip("queue")
        async with client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"seq": self.seq, "events": json.dumps(encoded)})
            pipe.expire(key, JOURNAL_TTL_SECONDS)
            await pipe.execute()


async def _beat(request_id: str) -> None:
    client = redis_client.async_client()
    while True:
        await asyncio.sleep(HEARTBEAT_EVERY)
        with contextlib.suppress(RedisError, OSError):
            redis_client.count_round_trip("queue")
            await client.set(heartbeat_key(request_id), "running", px=HEARTBEAT_TTL_MS)
        raise_if_cancelling()


async def _watch_cancel(request_id: str) -> None:
    client = redis_client.async_client()
    while True:
        await asyncio.sleep(CANCEL_CHECK_EVERY)
        with contextlib.suppress(RedisError, OSError):
            redis_client.count_round_trip("queue")
            if await client.exists(cancel_key(request_id)):
                return
        raise_if_cancelling()


async def _record_duration(seconds: float) -> None:
    """Keep a moving average of job durations for Retry-After estimates."""
    client = redis_client.async_client()
    with contextlib.suppress(RedisError, OSError):
        redis_client.count_round_trip("queue")
        raw = await client.get(durations_key())
        average = float(raw) if raw else seconds * 1000
        redis_client.count_round_trip("queue")
        await client.set(durations_key(), 0.8 * average + 0.2 * seconds * 1000)


async def _close_provider_clients() -> None:
    snapshot = policy_cache.current()
    for entry in snapshot.providers if snapshot else ():
        closer = getattr(entry.adapter, "aclose", None)
        if closer is not None:
            await closer()
