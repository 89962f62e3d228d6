"""Read our own SSE responses in tests, with the production parser."""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from llm.sse import SSEParser


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    comments: int = 0
    raw: bytes = b""
    body: Any = None

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def text(self) -> str:
        return "".join(data["text"] for name, data in self.events if name == "token")

    def last(self) -> tuple[str, dict[str, Any]]:
        return self.events[-1]


def collect(response: httpx.Response, result: StreamResult, chunk: bytes) -> None:
    parser = getattr(response, "_test_parser", None)
    if parser is None:
        parser = SSEParser()
        response._test_parser = parser  # type: ignore[attr-defined]
    result.raw += chunk
    result.comments += chunk.count(b"\n: ") + chunk.startswith(b": ")
    for event in parser.feed(chunk):
        result.events.append((event.event, json.loads(event.data)))
        if event.id is not None:
            result.ids.append(int(event.id))


def stream(
    base_url: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    stop_after: int | None = None,
    stop_at: str | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> StreamResult:
    """POST a chat request and read the whole answer.

    Or stop (closing the connection) after ``stop_after`` events or at the
    first event named ``stop_at``; ``on_event`` sees each event as it comes.
    """
    sent = {"Content-Type": "application/json", **(headers or {})}
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    with (
        httpx.Client(base_url=base_url, timeout=timeout) as client,
        client.stream(
            "POST", "/api/v1/chat/stream", content=payload, headers=sent
        ) as response,
    ):
        result = StreamResult(response.status_code, response.headers)
        if response.status_code != 200:
            result.body = json.loads(response.read())
            return result
        for piece in response.iter_raw():
            seen = len(result.events)
            collect(response, result, piece)
            if on_event is not None:
                for name, data in result.events[seen:]:
                    on_event(name, data)
            if stop_after is not None and len(result.events) >= stop_after:
                break
            if stop_at is not None and stop_at in result.names()[seen:]:
                break
    return result


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}
