"""OpenAI-compatible Chat Completions streaming (OpenAI, vLLM, Ollama, ...).

One ``httpx.AsyncClient`` per provider per event loop: httpx clients hold
connections bound to the loop that opened them, and daphne runs one loop
while each RQ job runs its own.
"""

import asyncio
import contextlib
import json
import logging
import os
import weakref
from asyncio import AbstractEventLoop, get_running_loop
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .base import ChatRequest, Finish, StreamItem, TextDelta, Usage
from .errors import (
    LLMError,
    ProviderConnectionError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderStreamError,
    ProviderTimeout,
)
from .retry_after import parse_retry_after
from .sse import aiter_events

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "base_url": "https://api.openai.com/v1",
    "model": "gpt-4o-mini",
    "api_key_env": "OPENAI_API_KEY",
    "timeout_seconds": 60.0,
    "connect_timeout_seconds": 5.0,
    "max_tokens": 4096,
    "max_connections": 100,
}

REJECTED_STATUSES = frozenset({400, 401, 403, 404, 422})
# How long to wait for the end of a body after ``[DONE]`` (see ``_drain``).
DRAIN_SECONDS = 0.5


class OpenAIProvider:
    """Stream a chat completion from an OpenAI-compatible endpoint."""

    kind = "openai"

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.options = {**DEFAULTS, **options}
        self.default_model = str(self.options["model"])
        self.max_tokens_limit = int(self.options["max_tokens"])
        self._transport = transport
        self._clients: weakref.WeakKeyDictionary[
            AbstractEventLoop, httpx.AsyncClient
        ] = weakref.WeakKeyDictionary()

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        return self._stream(request)

    async def aclose(self) -> None:
        """Close this loop's client and its connections."""
        client = self._clients.pop(get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def client(self) -> httpx.AsyncClient:
        """Return the shared client of the running event loop."""
        loop = get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            client = self._new_client()
            self._clients[loop] = client
        return client

    def _new_client(self) -> httpx.AsyncClient:
        limit = int(self.options["max_connections"])
        timeout = httpx.Timeout(
            float(self.options["timeout_seconds"]),
            connect=float(self.options["connect_timeout_seconds"]),
            pool=float(self.options["connect_timeout_seconds"]),
        )
        return httpx.AsyncClient(
            base_url=str(self.options["base_url"]).rstrip("/") + "/",
            timeout=timeout,
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            transport=self._transport,
        )

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": request.model or self.default_model,
            "messages": [
                {"role": m.role, "content": m.content} for m in request.messages
            ],
            "stream": True,
            # Ask for the usage-only last chunk (shared/CASES.md C16).
            "stream_options": {"include_usage": True},
        }
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        return payload

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        key = os.environ.get(str(self.options["api_key_env"]), "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def _stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        try:
            async with self.client().stream(
                "POST",
                "chat/completions",
                json=self._payload(request),
                headers=self._headers(),
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response)
                async for item in self._items(response):
                    yield item
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(
                f"timed out: {exc.__class__.__name__}", provider=self.name
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderConnectionError(
                f"connection failed: {exc.__class__.__name__}", provider=self.name
            ) from exc

    async def _items(self, response: httpx.Response) -> AsyncIterator[StreamItem]:
        finish_reason: str | None = None
        usage: Usage | None = None
        emitted = 0
        events = aiter_events(response.aiter_bytes())
        async for event in events:
            if event.data.strip() == "[DONE]":
                await _drain(events)
                usage = usage or Usage(0, emitted, emitted)
                yield Finish(finish_reason or "stop", usage)
                return
            chunk = self._decode(event.data)
            usage = _usage(chunk) or usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    emitted += 1
                    yield TextDelta(text)
                finish_reason = choice.get("finish_reason") or finish_reason
        raise ProviderStreamError(
            "stream ended without [DONE]", provider=self.name, status=200
        )

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise ProviderStreamError(
                "malformed JSON in stream", provider=self.name, status=200
            ) from exc
        if not isinstance(chunk, dict):
            raise ProviderStreamError(
                "stream chunk is not an object", provider=self.name, status=200
            )
        if chunk.get("error"):
            raise ProviderStreamError(
                f"error in stream: {_error_message(chunk)}",
                provider=self.name,
                status=200,
            )
        return chunk

    def _status_error(self, response: httpx.Response) -> LLMError:
        status = response.status_code
        detail = _error_message(_json_or_empty(response))
        message = f"HTTP {status}" + (f": {detail}" if detail else "")
        retry_after = parse_retry_after(response.headers)
        if status in REJECTED_STATUSES:
            return ProviderRejected(message, provider=self.name, status=status)
        if status == 429:
            cls: type[LLMError] = ProviderRateLimited
        elif status >= 500 or status == 408:
            cls = ProviderServerError
        else:
            return ProviderRejected(message, provider=self.name, status=status)
        return cls(message, provider=self.name, status=status, retry_after=retry_after)


async def _drain(rest: AsyncIterator[Any]) -> None:
    """Read what follows ``[DONE]`` so httpx can pool the connection.

    A response closed before the end of its body takes its connection with
    it: every request would pay a new TCP and TLS handshake. The body
    normally ends right after ``[DONE]``; one that does not within
    ``DRAIN_SECONDS`` is given up (and its connection closed).
    """
    with contextlib.suppress(TimeoutError, httpx.HTTPError, LLMError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in rest:
                pass


def _usage(chunk: dict[str, Any]) -> Usage | None:
    raw = chunk.get("usage")
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    total = int(raw.get("total_tokens") or prompt + completion)
    return Usage(prompt, completion, total)


def _json_or_empty(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "")[:200]
    if isinstance(error, str):
        return error[:200]
    return ""
