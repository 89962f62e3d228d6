"""Server-Sent Events framing for our responses."""

import json
from typing import Any

from resilience.events import StreamEvent

HEADERS = [
    (b"Content-Type", b"text/event-stream; charset=utf-8"),
    (b"Cache-Control", b"no-cache"),
    # nginx and friends buffer responses unless told otherwise (CASES C02).
    (b"X-Accel-Buffering", b"no"),
]


def dumps(data: Any) -> str:
    """Compact JSON on one line (JSON escapes newlines, so SSE stays framed)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class EventWriter:
    """Frame events with a monotonically increasing ``id:``."""

    def __init__(self) -> None:
        self.last_id = 0

    def event(self, event: StreamEvent) -> bytes:
        self.last_id += 1
        return (
            f"id: {self.last_id}\nevent: {event.name}\ndata: {dumps(event.data)}\n\n"
        ).encode()

    @staticmethod
    def comment(text: str) -> bytes:
        return f": {text}\n\n".encode()
