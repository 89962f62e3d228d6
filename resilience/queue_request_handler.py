"""Layer 3, producer side: put an overflow request in the queue and follow it.

When the pool is full a request is not refused: ``submit`` reserves a place
(global depth and per-caller caps, one Lua step) and enqueues an RQ job on
the ``streams`` queue; ``follow`` then turns what the worker publishes into
the same events the direct path yields, with ``queued`` events while the
request waits.

The handoff is loss-proof by construction:

- the consumer joins the request's channel-layer group *before* the job is
  enqueued, so nothing is published to a group nobody listens to;
- every batch carries a sequence number, and the worker also appends it to
  a short-lived per-request Redis Stream (the journal). A gap, a batch the
  channel layer dropped (``RedisChannelLayer`` drops over capacity with only
  an INFO line) or a lost tail is read back from the journal; a gap the
  journal cannot fill ends the stream with an ``error``, never silently;
- the worker keeps a heartbeat key alive while it runs. RQ notices a dead
  worker only after about 90 s; the follower notices within a few seconds
  and ends the stream with ``worker_lost``.

Why ``RedisChannelLayer`` and not the PubSub layer: PubSub loses messages
published before the subscription is live, and we cannot know when that is;
the list-backed layer keeps them for ``expiry`` seconds. Its per-channel
capacity is the drop risk, which batching (tens of ms per message) and the
journal cover.
"""

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from channels.layers import BaseChannelLayer
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from . import events, redis_client
from .errors import ResilienceError
from .events import StreamEvent
from .streams import cancel_and_wait, raise_if_cancelling

logger = logging.getLogger(__name__)

QUEUE_NAME = "streams"
JOB_FUNCTION = "resilience.queue_consumer_worker.run_stream_job"
HEARTBEAT_TTL_MS = 3000
HEARTBEAT_EVERY = 1.0
JOURNAL_TTL_SECONDS = 600
CHECK_EVERY = 0.5
POSITION_EVERY = 1.0
# A job started but not yet heartbeating is given this long before it is
# declared lost.
START_GRACE_SECONDS = 5.0
# A follower that cannot reach Redis for this long ends its stream with
# ``queue_unavailable`` rather than wait in silence (C21).
OUTAGE_SECONDS = 5.0
# A withdrawal that failed is retried once a second this many times.
WITHDRAW_ATTEMPTS = 60
# Our workers refresh their RQ registration this often; one not heard from
# for three beats (and a little) is not counted as alive.
WORKER_BEAT_SECONDS = 10
WORKER_ALIVE_SECONDS = 3 * WORKER_BEAT_SECONDS + 5


@dataclass(frozen=True)
class QueueSettings:
    enabled: bool = True
    max_depth: int = 200
    per_user_max: int = 10
    max_wait_seconds: float = 120
    job_timeout_seconds: float = 600


class QueueFull(ResilienceError):
    code = "queue_full"
    status = 503


class QueueUnavailable(ResilienceError):
    code = "queue_unavailable"
    status = 503


def waiting_key() -> str:
    return redis_client.key("queue", "{q}", "waiting")


def caller_key(caller: str) -> str:
    return redis_client.key("queue", "{q}", "caller", caller)


def heartbeat_key(request_id: str) -> str:
    return redis_client.key("queue", "hb", request_id)


def cancel_key(request_id: str) -> str:
    return redis_client.key("queue", "cancel", request_id)


def journal_key(request_id: str) -> str:
    return redis_client.key("queue", "journal", request_id)


def durations_key() -> str:
    return redis_client.key("queue", "avg_ms")


def group_name(request_id: str) -> str:
    """The channel-layer group of one request (its id is unguessable)."""
    return f"stream.{request_id}"


RESERVE = redis_client.LuaScript.load("queue_reserve.lua", "queue")
START = redis_client.LuaScript.load("queue_start.lua", "queue")


@dataclass(frozen=True)
class JobPayload:
    """Everything a worker needs to run a request, as JSON-safe data."""

    request_id: str
    caller: str
    messages: list[dict[str, str]]
    model: str | None
    max_tokens: int | None
    provider: str | None
    max_wait_seconds: float
    job_timeout_seconds: float

    @property
    def group(self) -> str:
        return group_name(self.request_id)


@dataclass
class Ticket:
    """A request in line: where it is and since when."""

    payload: JobPayload
    position: int
    enqueued_at: float


def rq_queue() -> Queue:
    """The ``streams`` queue on the short-timeout client."""
    return Queue(QUEUE_NAME, connection=redis_client.sync_client())


def _enqueue(payload: JobPayload) -> None:
    rq_queue().enqueue_call(
        func=JOB_FUNCTION,
        args=(asdict(payload),),
        job_id=payload.request_id,
        # Our own deadline inside the job ends the stream with an event;
        # RQ's timeout is only the backstop for a stuck work-horse.
        timeout=int(payload.job_timeout_seconds) + 30,
        result_ttl=300,
        failure_ttl=86400,
        description=f"stream {payload.request_id}",
    )


async def estimate_wait(depth: int) -> float:
    """Guess how long the line takes to move ``depth`` places."""
    client = redis_client.async_client()
    redis_client.count_round_trip("queue")
    raw = await client.get(durations_key())
    average = float(raw) / 1000 if raw else 10.0
    workers = await asyncio.to_thread(_worker_count)
    return average * math.ceil((depth + 1) / max(1, workers))


def _worker_count() -> int:
    return len(alive_workers())


def alive_workers() -> list[str]:
    """Return the states of the ``streams`` workers heard from lately.

    RQ lists a killed worker until its key expires (minutes); ours
    (``StreamWorker``) refresh their registration every
    ``WORKER_BEAT_SECONDS``, so one silent for ``WORKER_ALIVE_SECONDS`` (on
    Redis's clock) is gone. Read with two round trips and without building
    RQ ``Worker`` objects, whose constructor raises the shared client's
    socket timeout to minutes.
    """
    from rq.utils import utcparse
    from rq.worker_registration import get_keys

    client: Any = redis_client.sync_client()
    keys = sorted(get_keys(queue=rq_queue()))
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for worker_key in keys:
            pipe.hmget(worker_key, "last_heartbeat", "state")
        now, *rows = pipe.execute()
    cutoff = redis_client.time_ms(now) / 1000 - WORKER_ALIVE_SECONDS
    alive = []
    for beat, state in rows:
        if beat is not None and utcparse(beat.decode()).timestamp() >= cutoff:
            alive.append(state.decode() if state else "unknown")
    return alive


async def submit(
    payload: JobPayload, policy: QueueSettings, clock: Callable[[], float]
) -> Ticket:
    """Reserve a place and enqueue the job; raise ``QueueFull``/``Unavailable``.

    Join the request's group before calling this.
    """
    stale_ms = int((policy.max_wait_seconds + 60) * 1000)
    keys = [waiting_key(), caller_key(payload.caller)]
    try:
        answer = await RESERVE.run(
            keys, [payload.request_id, policy.max_depth, policy.per_user_max, stale_ms]
        )
        if int(answer[0]) == 0:
            scope = answer[1].decode() if isinstance(answer[1], bytes) else answer[1]
            wait = await estimate_wait(int(answer[2]))
            raise QueueFull(f"the queue is full ({scope})", retry_after=wait)
        await asyncio.to_thread(_enqueue, payload)
    except (RedisError, OSError) as exc:
        logger.warning("queue: unreachable (%s)", exc)
        await _forget(payload)
        raise QueueUnavailable("the queue is unreachable") from exc
    return Ticket(payload, int(answer[1]), clock())


async def _forget(payload: JobPayload) -> None:
    # On failure the reservation goes stale by itself (max wait + 60 s).
    with contextlib.suppress(RedisError, OSError):
        await _leave_line(payload, cancel=False)


async def _leave_line(payload: JobPayload, cancel: bool) -> None:
    """Drop the request's place in line (and flag it cancelled): one round trip."""
    client = redis_client.async_client()
    redis_client.count_round_trip("queue")
    async with client.pipeline(transaction=False) as pipe:
        if cancel:
            pipe.set(cancel_key(payload.request_id), "1", ex=3600)
        pipe.zrem(waiting_key(), payload.request_id)
        pipe.zrem(caller_key(payload.caller), payload.request_id)
        await pipe.execute()


async def position(request_id: str) -> int | None:
    """Return the 1-based place in line, or None once a worker took it."""
    redis_client.count_round_trip("queue")
    rank = await redis_client.async_client().zrank(waiting_key(), request_id)
    return None if rank is None else int(rank) + 1


async def withdraw(payload: JobPayload) -> bool:
    """The client left: remove its job if queued, stop it if running.

    Return False if Redis could not be reached; ``withdraw_later`` retries.
    """
    try:
        await _leave_line(payload, cancel=True)
        await asyncio.to_thread(_cancel_job, payload.request_id)
    except (RedisError, OSError) as exc:
        logger.warning("queue: could not withdraw %s (%s)", payload.request_id, exc)
        return False
    return True


_withdrawals: set[asyncio.Task[None]] = set()


def withdraw_later(payload: JobPayload, attempts: int = WITHDRAW_ATTEMPTS) -> None:
    """Keep trying to withdraw in the background, once a second.

    Without it a request whose client left during a Redis outage would keep
    its place in line and later run for nobody.
    """

    async def retry() -> None:
        for _ in range(attempts):
            await asyncio.sleep(1.0)
            if await withdraw(payload):
                return
        logger.warning("queue: gave up withdrawing %s", payload.request_id)

    task = asyncio.get_running_loop().create_task(retry())
    _withdrawals.add(task)
    task.add_done_callback(_withdrawals.discard)


def _cancel_job(request_id: str) -> None:
    try:
        job = Job.fetch(request_id, connection=redis_client.sync_client())
    except NoSuchJobError:
        return
    if job.get_status(refresh=False) in ("queued", "deferred", "scheduled"):
        job.cancel()
        job.delete()


def _mark_lost(request_id: str, reason: str) -> None:
    try:
        job = Job.fetch(request_id, connection=redis_client.sync_client())
    except NoSuchJobError:
        return
    if job.get_status() in ("finished", "failed"):
        return
    queue = rq_queue()
    queue.started_job_registry.remove_executions(job)
    # The registry entry alone keeps no reason; a failed Result does, where
    # RQ's dashboard and ``job.latest_result()`` look for it.
    Result.create_failure(job, 86400, exc_string=reason)
    queue.failed_job_registry.add(job, ttl=86400, exc_string=reason)
    job.set_status(JobStatus.FAILED)


async def read_journal(
    request_id: str, after: bytes | None = None
) -> tuple[dict[int, list[StreamEvent]], bytes | None]:
    """Return the batches journaled after entry ``after``, and the last id.

    Pass the returned id back in to read only what is new (Redis 6.2+).
    """
    redis_client.count_round_trip("queue")
    key = journal_key(request_id)
    entries = await redis_client.async_client().xrange(key, _after(after))
    return _batches(entries, after)


def _after(entry_id: bytes | None) -> bytes:
    """XRANGE's start for the entries after ``entry_id`` (all when None)."""
    return b"-" if entry_id is None else b"(" + entry_id


def _batches(
    entries: list[Any], after: bytes | None
) -> tuple[dict[int, list[StreamEvent]], bytes | None]:
    batches = {}
    for entry_id, fields in entries:
        seq = int(fields[b"seq"])
        batches[seq] = decode_batch(json.loads(fields[b"events"]))
        after = entry_id
    return batches, after


def decode_batch(raw: list[list[Any]]) -> list[StreamEvent]:
    return [StreamEvent(name, data) for name, data in raw]


def encode_batch(batch: list[StreamEvent]) -> list[list[Any]]:
    return [[event.name, event.data] for event in batch]


class Follower:
    """Turn a queued request's group messages into events, in order."""

    def __init__(
        self,
        ticket: Ticket,
        layer: BaseChannelLayer,
        channel: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ticket = ticket
        self.payload = ticket.payload
        self.layer = layer
        self.channel = channel
        self.clock = clock
        self.expected = 1
        self.started_at: float | None = None
        self.finished = False
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._last_position = ticket.position
        self._next_position_check = clock() + POSITION_EVERY
        self._failing_since: float | None = None
        self._worker_ended = False
        # Journaled batches read but not yet delivered, and the last entry
        # read: each check reads only what the worker added since.
        self._journaled: dict[int, list[StreamEvent]] = {}
        self._journal_read_to: bytes | None = None
        # The heartbeat read with the journal on this tick, if it was.
        self._alive: bool | None = None

    async def events(self) -> AsyncGenerator[StreamEvent, None]:
        """Yield ``queued`` updates, then the worker's events, then stop.

        Redis errors while following are retried for ``OUTAGE_SECONDS``;
        the journal makes up for anything missed meanwhile. A longer outage
        ends the stream with ``queue_unavailable``.
        """
        receiver = asyncio.ensure_future(self._receive())
        try:
            yield events.queued(self.payload.request_id, self.ticket.position)
            async for event in self._follow_through_outages():
                if event.terminal:
                    # Set before the yield: the consumer closes this
                    # generator at the terminal event, so code after the
                    # yield never runs. Only the worker's own end means its
                    # job is over; for any end of ours (timeout, gap, lost
                    # contact) the consumer withdraws the job.
                    self.finished = self._worker_ended
                yield event
                if event.terminal:
                    return
        finally:
            await cancel_and_wait(receiver)

    async def _follow_through_outages(self) -> AsyncIterator[StreamEvent]:
        while True:
            try:
                async for event in self._follow():
                    yield event
                    if event.terminal:
                        return
            except (RedisError, OSError) as exc:
                raise_if_cancelling(exc)
                if self._outage_too_long(exc):
                    yield events.error(
                        "queue_unavailable", "lost contact with the queue (Redis)"
                    )
                    return
                await asyncio.sleep(CHECK_EVERY)

    def _outage_too_long(self, exc: Exception) -> bool:
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
            logger.warning(
                "queue %s: Redis unreachable while following (%s)",
                self.payload.request_id,
                exc,
            )
        return now - self._failing_since >= OUTAGE_SECONDS

    async def _receive(self) -> None:
        # A channel-layer error must not end the receiver for good: the
        # journal fills what is missed while Redis is away.
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except (RedisError, OSError) as exc:
                raise_if_cancelling(exc)
                logger.debug("queue %s: receive failed (%s)", self.channel, exc)
                await asyncio.sleep(CHECK_EVERY)
                continue
            await self._inbox.put(message)

    async def _follow(self) -> AsyncIterator[StreamEvent]:
        while True:
            try:
                async with asyncio.timeout(CHECK_EVERY):
                    message = await self._inbox.get()
            except TimeoutError:
                message = None
            if message is not None:
                accepted = await self._accept(message)
                self._failing_since = None
                for event in accepted:
                    yield event
                    if event.terminal:
                        return
                continue
            for event in await self._catch_up(heartbeat=True):
                yield event
                if event.terminal:
                    return
            if self.started_at is None and self.clock() >= self._next_position_check:
                self._next_position_check = self.clock() + POSITION_EVERY
                place = await position(self.payload.request_id)
                if place is None:
                    self.started_at = self.clock()
                elif self._waited_too_long():
                    yield events.error(
                        "queue_timeout",
                        f"waited more than {self.payload.max_wait_seconds:g} s",
                    )
                    return
                elif place != self._last_position:
                    self._last_position = place
                    yield events.queued(self.payload.request_id, place)
            self._failing_since = None
            if self.started_at is not None and await self._worker_lost():
                for event in await self._catch_up():
                    yield event
                    if event.terminal:
                        return
                await asyncio.to_thread(
                    _mark_lost, self.payload.request_id, "worker_lost: no heartbeat"
                )
                yield events.error("worker_lost", "the worker streaming it stopped")
                return

    def _waited_too_long(self) -> bool:
        return self.clock() - self.ticket.enqueued_at > self.payload.max_wait_seconds

    async def _worker_lost(self) -> bool:
        alive, self._alive = self._alive, None
        if alive is None:  # not read with the journal on this tick
            redis_client.count_round_trip("queue")
            key = heartbeat_key(self.payload.request_id)
            alive = bool(await redis_client.async_client().exists(key))
        if alive:
            return False
        assert self.started_at is not None
        return self.expected > 1 or self.clock() - self.started_at > START_GRACE_SECONDS

    async def _accept(self, message: dict[str, Any]) -> list[StreamEvent]:
        seq = int(message["seq"])
        if seq < self.expected:
            return []
        self.started_at = self.started_at or self.clock()
        if seq > self.expected:
            filled = await self._fill(seq)
            if filled and filled[-1].terminal:
                return filled
            return filled + self._take(seq, message["events"])
        return self._take(seq, message["events"])

    def _take(self, seq: int, raw: list[list[Any]]) -> list[StreamEvent]:
        self.expected = seq + 1
        return self._from_worker(decode_batch(raw))

    def _from_worker(self, batch: list[StreamEvent]) -> list[StreamEvent]:
        """Pass on the worker's events, noting whether they end its job."""
        self._worker_ended = self._worker_ended or any(e.terminal for e in batch)
        return batch

    async def _read_journal(
        self, heartbeat: bool = False
    ) -> dict[int, list[StreamEvent]]:
        """Return the journaled batches not yet delivered, by sequence.

        With ``heartbeat``, the job's heartbeat is read in the same round
        trip (for ``_worker_lost``): an idle tick costs one, not two.
        """
        request_id = self.payload.request_id
        if heartbeat:
            redis_client.count_round_trip("queue")
            async with redis_client.async_client().pipeline(False) as pipe:
                pipe.xrange(journal_key(request_id), _after(self._journal_read_to))
                pipe.exists(heartbeat_key(request_id))
                entries, alive = await pipe.execute()
            new, self._journal_read_to = _batches(entries, self._journal_read_to)
            self._alive = bool(alive)
        else:
            new, self._journal_read_to = await read_journal(
                request_id, self._journal_read_to
            )
        self._journaled.update(new)
        for seq in [seq for seq in self._journaled if seq < self.expected]:
            del self._journaled[seq]
        return self._journaled

    async def _fill(self, upto: int) -> list[StreamEvent]:
        journal = await self._read_journal()
        filled: list[StreamEvent] = []
        for seq in range(self.expected, upto):
            if seq not in journal:
                logger.warning(
                    "queue %s: batch %d lost and not journaled",
                    self.payload.request_id,
                    seq,
                )
                return [*filled, events.error(
                    "internal_error", "part of the answer was lost in transit"
                )]  # fmt: skip
            filled += self._from_worker(journal.pop(seq))
        self.expected = upto
        return filled

    async def _catch_up(self, heartbeat: bool = False) -> list[StreamEvent]:
        """Deliver journaled batches the channel layer never brought."""
        if self.started_at is None:
            return []
        journal = await self._read_journal(heartbeat)
        caught: list[StreamEvent] = []
        while self.expected in journal:
            caught += self._from_worker(journal.pop(self.expected))
            self.expected += 1
        return caught
