"""Incremental Server-Sent Events parsing for provider streams.

Follows the WHATWG event-stream rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html) with one
deliberate difference: an event still pending when the stream ends is
dispatched instead of dropped. Providers that omit the final blank line
would otherwise lose their last chunk, and a lost ``[DONE]`` reads as a
cut-off answer. httpx-sse follows the spec here, which is why we parse
ourselves (shared/CASES.md C13).
"""

import codecs
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None


class SSEParser:
    """Feed bytes in arbitrary pieces; collect complete events."""

    def __init__(self) -> None:
        # An incremental decoder keeps a multi-byte character that a network
        # chunk split in two until its remaining bytes arrive.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._pending_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse a piece of the stream and return the events it completed."""
        return self._lines(self._decoder.decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End the stream: flush the last line and any pending event."""
        events = self._lines(self._decoder.decode(b"", final=True))
        if self._buffer:
            events.extend(self._line(self._buffer))
            self._buffer = ""
        events.extend(self._line(""))
        return events

    def _lines(self, text: str) -> list[SSEEvent]:
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = text.endswith("\r")
        text = self._buffer + text
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            events.extend(self._line(line))
        return events

    def _line(self, line: str) -> list[SSEEvent]:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return []
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return []

    def _dispatch(self) -> list[SSEEvent]:
        if not self._data:
            self._event = ""
            return []
        event = SSEEvent(self._event or "message", "\n".join(self._data), self._id)
        self._event = ""
        self._data = []
        return [event]


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[SSEEvent]:
    """Yield the events of a byte stream, including an unterminated last one."""
    parser = SSEParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event
