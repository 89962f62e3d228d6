"""The streaming endpoint: ``POST /api/v1/chat/stream``.

The consumer reads and checks the request, asks the layers for admission
and adapts the pipeline's events to SSE. The response is produced in a
task of its own: ``AsyncHttpConsumer.handle`` would block the consumer's
dispatch loop, and with it the ``http.disconnect`` that must cancel the
provider call the moment the client leaves.
"""

import asyncio
import contextlib
import io
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from redis.exceptions import RedisError

from llm.base import ChatRequest
from resilience import conf
from resilience.connection_pool_manager import (
    AsyncConnectionPool,
    Lease,
    LeaseLost,
    PoolFull,
)
from resilience.events import StreamEvent
from resilience.events import error as error_event
from resilience.metrics import (
    StreamRecorder,
    record_decision,
    record_request,
)
from resilience.pipeline import stream_events
from resilience.policies import ProviderEntry, Snapshot, policy_cache
from resilience.queue_request_handler import (
    Follower,
    JobPayload,
    QueueFull,
    QueueUnavailable,
    submit,
    withdraw,
    withdraw_later,
)
from resilience.rate_limiter import (
    AsyncRateLimiter,
    BucketPolicy,
    BucketRef,
    Decision,
    RateLimiterUnavailable,
)
from resilience.streams import cancel_and_wait, run_to_end, with_heartbeats

from .errors import ApiError
from .identity import Identity, identify
from .sse import HEADERS, EventWriter
from .validation import check_content_type, parse_chat_request

logger = logging.getLogger(__name__)

# One pool client per process: it keeps the in-process fallback table and
# the moving average of stream durations behind Retry-After estimates.
pool = AsyncConnectionPool()


# One limiter per process: its leased tokens are this instance's share.
limiter = AsyncRateLimiter()


def buckets_for(
    identity: Identity, policies: tuple[BucketPolicy, ...]
) -> list[BucketRef]:
    """Return the buckets a request draws from, one per applicable policy."""
    subjects = {
        "global": "global",
        "ip": f"ip:{identity.ip}",
        "user": None if identity.user_id is None else f"user:{identity.user_id}",
        "api_key": None
        if identity.api_key_id is None
        else f"key:{identity.api_key_id}",
    }
    return [
        BucketRef(policy, subject)
        for policy in policies
        if (subject := subjects.get(policy.scope)) is not None
    ]


def limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """``RateLimit-*`` headers for the most restrictive bucket.

    Reset is the seconds until that bucket is full again; Remaining is
    conservative under local leasing (README).
    """
    return [
        (b"RateLimit-Limit", str(decision.limit).encode()),
        (b"RateLimit-Remaining", str(max(0, decision.remaining)).encode()),
        (b"RateLimit-Reset", str(decision.reset_seconds).encode()),
    ]


def max_body_bytes() -> int:
    # A character may take up to 12 bytes as a JSON surrogate-pair escape;
    # the rest is room for the envelope. The exact character limit is
    # enforced after parsing.
    return conf.integer("MAX_PROMPT_CHARS") * 12 + 64 * 1024


def _unused_view(request: HttpRequest) -> HttpResponse:
    """Stand in for the view CsrfViewMiddleware wants; it is never called."""
    return HttpResponse(status=500)


class ChatStreamConsumer(AsyncHttpConsumer):
    """Answer one chat request with a stream of events."""

    # The direct path needs no channel layer; without this every request
    # would open a channel and a receive loop on Redis for nothing.
    channel_layer_alias = "direct-path-uses-no-channel-layer"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0
        self._refused = False
        self._task: asyncio.Task[None] | None = None
        self.identity: Identity | None = None
        self._limit_headers: list[tuple[bytes, bytes]] = []
        self._snapshot = Snapshot(None)

    async def http_request(self, message: dict[str, Any]) -> None:
        if self._task is not None or self._refused:
            return
        chunk = message.get("body", b"")
        self._received += len(chunk)
        if self._received > max_body_bytes() or self._declared_too_large():
            self._refused = True
            await self._send_error(
                ApiError(413, "payload_too_large", "request body is too large")
            )
            return
        self.body.append(chunk)
        if not message.get("more_body"):
            body = b"".join(self.body)
            self._task = asyncio.create_task(self._respond(body))

    async def http_disconnect(self, message: dict[str, Any]) -> None:
        if self._task is not None and not self._task.done():
            await cancel_and_wait(self._task)
        raise StopConsumer()

    def _header(self, name: bytes) -> str:
        for key, value in self.scope.get("headers", []):
            if key.lower() == name:
                return value.decode("latin-1")
        return ""

    def _declared_too_large(self) -> bool:
        declared = self._header(b"content-length")
        return declared.isdigit() and int(declared) > max_body_bytes()

    async def _respond(self, body: bytes) -> None:
        request_id = str(uuid.uuid4())
        try:
            request, entry, snapshot = await self._admit(body)
            lease = await self._acquire(snapshot)
        except PoolFull as full:
            await self._respond_queued(request, entry, snapshot, full, request_id)
            return
        except ApiError as exc:
            await self._refuse(request_id, exc)
            return
        except Exception:
            logger.exception("stream %s: admission failed", request_id)
            await self._refuse(
                request_id,
                ApiError(503, "internal_error", "the request could not be admitted"),
            )
            return
        await self._respond_direct(request, entry, lease, request_id)

    async def _refuse(self, request_id: str, error: ApiError) -> None:
        logger.info("stream %s: refused %s", request_id, error.code)
        record_request(error.code)
        await self._send_error(error)

    async def _acquire(self, snapshot: Snapshot) -> Lease:
        """Take a pool slot; raise ``PoolFull`` for the queue to take over."""
        assert self.identity is not None
        try:
            return await pool.acquire(self.identity.caller, snapshot.pool)
        except PoolFull as full:
            if snapshot.queue.enabled:
                raise
            raise ApiError(
                503, "pool_full", full.message, full.retry_after_seconds
            ) from full

    async def _open_stream(self, writer: EventWriter) -> None:
        await self.send_headers(status=200, headers=HEADERS + self._limit_headers)
        await self.send_body(writer.comment("stream open"), more_body=True)

    async def _respond_direct(
        self,
        request: ChatRequest,
        entry: ProviderEntry,
        lease: Lease,
        request_id: str,
    ) -> None:
        logger.info("stream %s: admitted, provider %s", request_id, entry.config.name)
        record_request("admitted")
        recorder = StreamRecorder()
        writer = EventWriter()
        try:
            # The hold is entered before the first await, so a cancellation
            # at any later point still releases the lease.
            async with pool.hold(lease):
                await self._open_stream(writer)
                source = stream_events(
                    request,
                    self._snapshot.candidates(entry),
                    request_id,
                    self._snapshot.retry,
                    item_timeout=conf.number("PROVIDER_IDLE_SECONDS"),
                )
                await self._relay(source, writer, recorder)
        except LeaseLost:
            # A renewal may fail just after `done` went out: one end only.
            if recorder.last is None or not recorder.last.terminal:
                await self._send_event(
                    writer,
                    recorder,
                    error_event("lease_lost", "the stream's pool slot expired; retry"),
                )
        finally:
            self._log_end(request_id, recorder)
        await self.send_body(b"", more_body=False)

    async def _respond_queued(
        self,
        request: ChatRequest,
        entry: ProviderEntry,
        snapshot: Snapshot,
        full: PoolFull,
        request_id: str,
    ) -> None:
        assert self.identity is not None
        payload = JobPayload(
            request_id=request_id,
            caller=self.identity.caller,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            model=request.model,
            max_tokens=request.max_tokens,
            provider=entry.config.name,
            max_wait_seconds=snapshot.queue.max_wait_seconds,
            job_timeout_seconds=snapshot.queue.job_timeout_seconds,
        )
        layer = get_channel_layer()
        channel: str | None = None
        try:
            channel = await layer.new_channel()
            # The layer's own read timeout must outlast its blocking
            # receive, so bound the join here (C21).
            async with asyncio.timeout(settings.REDIS_TIMEOUT_SECONDS * 2):
                await layer.group_add(payload.group, channel)
            ticket = await submit(payload, snapshot.queue, time.monotonic)
        except asyncio.CancelledError:
            # The client left mid-enqueue: the job may be in line already.
            await self._leave_queue(payload, layer, channel, withdraw_job=True)
            raise
        except (QueueFull, QueueUnavailable) as exc:
            await self._discard(layer, payload.group, channel)
            await self._refuse(
                request_id,
                ApiError(503, exc.code, exc.message, exc.retry_after_seconds),
            )
            return
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("stream %s: channel layer unreachable (%s)", request_id, exc)
            await self._discard(layer, payload.group, channel)
            await self._refuse(
                request_id,
                ApiError(503, "queue_unavailable", "the queue is unreachable"),
            )
            return
        logger.info(
            "stream %s: queued at %d (%s)", request_id, ticket.position, full.message
        )
        record_request("queued")
        assert channel is not None
        follower = Follower(ticket, layer, channel)
        recorder = StreamRecorder()
        writer = EventWriter()
        try:
            await self._open_stream(writer)
            await self._relay(follower.events(), writer, recorder)
        finally:
            try:
                await self._leave_queue(
                    payload, layer, channel, withdraw_job=not follower.finished
                )
            finally:
                self._log_end(request_id, recorder)
        await self.send_body(b"", more_body=False)

    async def _leave_queue(
        self, payload: JobPayload, layer: Any, channel: str | None, withdraw_job: bool
    ) -> None:
        """Withdraw the job (if asked) and leave its group, whatever cancels us."""

        async def leave() -> None:
            if withdraw_job and not await withdraw(payload):
                withdraw_later(payload)
            await self._discard(layer, payload.group, channel)

        # A disconnect may cancel us again mid-cleanup: finish it anyway.
        cancelled = await run_to_end(leave)
        if cancelled is not None:
            raise cancelled

    @staticmethod
    async def _discard(layer: Any, group: str, channel: str | None) -> None:
        if channel is None:
            return
        # Best effort: group membership expires by itself in the layer.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(settings.REDIS_TIMEOUT_SECONDS * 2):
                await layer.group_discard(group, channel)

    async def _admit(self, body: bytes) -> tuple[ChatRequest, ProviderEntry, Snapshot]:
        if self.scope.get("method") != "POST":
            raise ApiError(405, "method_not_allowed", "use POST")
        check_content_type(self._header(b"content-type"))
        snapshot = await policy_cache.aget()
        request, entry = parse_chat_request(
            body, snapshot, conf.integer("MAX_PROMPT_CHARS")
        )
        self.identity = await identify(
            self._peer(), self._headers(), settings.TRUSTED_PROXIES, snapshot.version
        )
        self._check_csrf(body)
        await self._rate_limit(snapshot)
        await self._check_providers(snapshot.candidates(entry))
        self._snapshot = snapshot
        return request, entry, snapshot

    @staticmethod
    async def _check_providers(candidates: list[ProviderEntry]) -> None:
        """Refuse at once when every provider's breaker is open."""
        waits = []
        for entry in candidates:
            wait = await entry.breaker.aknown_open()
            if wait is None:
                return  # one usable provider is enough; ask no further
            waits.append(wait)
        if waits:
            soonest = min(waits)
            raise ApiError(
                503,
                "provider_unavailable",
                "circuit open for "
                + ", ".join(entry.config.name for entry in candidates)
                + "; retry when the next probe is due",
                max(1, math.ceil(soonest)),
            )

    async def _rate_limit(self, snapshot: Snapshot) -> None:
        """Take a token from every applicable bucket, or refuse (429/503)."""
        assert self.identity is not None
        buckets = buckets_for(self.identity, snapshot.rate_limits)
        if not buckets:
            return
        try:
            decision = await limiter.admit(buckets)
        except RateLimiterUnavailable as exc:
            raise ApiError(
                503, exc.code, "rate limiting is unavailable; retry shortly",
                exc.retry_after_seconds,
            ) from exc  # fmt: skip
        record_decision(decision)
        self._limit_headers = limit_headers(decision)
        if not decision.allowed:
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit {decision.policy!r} exceeded; retry in "
                f"{decision.retry_after_seconds} s",
                decision.retry_after_seconds,
                headers=self._limit_headers,
            )

    def _peer(self) -> str:
        client = self.scope.get("client") or ("", 0)
        return str(client[0])

    def _headers(self) -> dict[str, str]:
        return {
            key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in self.scope.get("headers", [])
        }

    async def _relay(
        self,
        source: AsyncGenerator[StreamEvent, None],
        writer: EventWriter,
        recorder: StreamRecorder,
    ) -> None:
        """Send events as SSE with heartbeats, up to exactly one terminal."""
        interval = conf.number("HEARTBEAT_SECONDS")
        try:
            async for event in with_heartbeats(source, interval):
                if event is None:
                    await self.send_body(writer.comment("ping"), more_body=True)
                    continue
                await self._send_event(writer, recorder, event)
                if event.terminal:
                    return
        except Exception:
            # A bug in a source must still end the stream with an event.
            logger.exception("stream: the event source failed")
        await self._send_event(
            writer,
            recorder,
            error_event("internal_error", "the stream ended unexpectedly"),
        )

    async def _send_event(
        self, writer: EventWriter, recorder: StreamRecorder, event: StreamEvent
    ) -> None:
        recorder.saw(event)
        await self.send_body(writer.event(event), more_body=True)

    @staticmethod
    def _log_end(request_id: str, recorder: StreamRecorder) -> None:
        seconds = recorder.finish()
        logger.info(
            "stream %s: %s after %d tokens in %.2f s",
            request_id, recorder.outcome(), recorder.tokens, seconds,
        )  # fmt: skip

    def _check_csrf(self, body: bytes) -> None:
        """Check CSRF when a session cookie, not an API key, authenticates."""
        if self._header(b"authorization"):
            return
        if settings.SESSION_COOKIE_NAME not in self._header(b"cookie"):
            return
        request = ASGIRequest(self.scope, io.BytesIO(body))
        refusal = CsrfViewMiddleware(_unused_view).process_view(
            request, _unused_view, (), {}
        )
        if refusal is not None:
            raise ApiError(403, "csrf_failed", "CSRF check failed; reload the page")

    async def _send_error(self, error: ApiError) -> None:
        await self.send_response(error.status, error.body(), headers=error.headers())
