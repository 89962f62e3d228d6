"""The streaming endpoint: ``POST /api/v1/chat/stream``.

The consumer reads and checks the request, asks the layers for admission
and adapts the pipeline's events to SSE. The response is produced in a
task of its own: ``AsyncHttpConsumer.handle`` would block the consumer's
dispatch loop, and with it the ``http.disconnect`` that must cancel the
provider call the moment the client leaves.
"""

import asyncio
import io
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from llm.base import ChatRequest
from resilience import conf
from resilience.events import StreamEvent
from resilience.events import error as error_event
from resilience.metrics import StreamRecorder, record_request
from resilience.pipeline import stream_events
from resilience.policies import ProviderEntry, policy_cache
from resilience.streams import with_heartbeats

from .errors import ApiError
from .identity import Identity, identify
from .sse import HEADERS, EventWriter
from .validation import check_content_type, parse_chat_request

logger = logging.getLogger(__name__)


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
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
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
            request, entry = await self._admit(body)
        except ApiError as exc:
            logger.info("stream %s: refused %s", request_id, exc.code)
            record_request(exc.code)
            await self._send_error(exc)
            return
        except Exception:
            logger.exception("stream %s: admission failed", request_id)
            await self._send_error(
                ApiError(503, "internal_error", "the request could not be admitted")
            )
            return

        logger.info("stream %s: admitted, provider %s", request_id, entry.config.name)
        record_request("admitted")
        await self.send_headers(status=200, headers=HEADERS)
        writer = EventWriter()
        await self.send_body(writer.comment("stream open"), more_body=True)
        source = stream_events(
            request,
            entry.adapter,
            request_id,
            item_timeout=conf.number("PROVIDER_IDLE_SECONDS"),
        )
        await self._relay(source, writer, request_id)

    async def _admit(self, body: bytes) -> tuple[ChatRequest, ProviderEntry]:
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
        return request, entry

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
        request_id: str,
    ) -> None:
        """Send events as SSE with heartbeats; end with exactly one terminal."""
        recorder = StreamRecorder()
        interval = conf.number("HEARTBEAT_SECONDS")
        try:
            async for event in with_heartbeats(source, interval):
                if event is None:
                    await self.send_body(writer.comment("ping"), more_body=True)
                    continue
                recorder.saw(event)
                await self.send_body(writer.event(event), more_body=True)
                if event.terminal:
                    break
            else:
                last = error_event("internal_error", "the stream ended unexpectedly")
                recorder.saw(last)
                await self.send_body(writer.event(last), more_body=True)
        finally:
            seconds = recorder.finish()
            logger.info(
                "stream %s: %s after %d tokens in %.2f s",
                request_id, recorder.outcome(), recorder.tokens, seconds,
            )  # fmt: skip
        await self.send_body(b"", more_body=False)

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
