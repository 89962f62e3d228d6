"""A local HTTP server that speaks the OpenAI Chat Completions stream format.

Each test gives it a plan: the status, headers and the exact byte pieces
of the body with pauses between them, sent with chunked encoding so that
pieces cross the network separately. It counts connections and responses
in flight so tests can prove that nothing was left open.
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Plan:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    pieces: list[bytes] = field(default_factory=list)
    delay: float = 0.0
    first_delay: float = 0.0


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One ``data:`` event of a streamed completion."""
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    delta = {} if content is None else {"content": content}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    body.update(extra)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def text_plan(words: list[str], finish: str = "stop", delay: float = 0.0) -> Plan:
    pieces = [chunk(role_only) for role_only in [None]]
    pieces += [chunk(word) for word in words]
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": len(words),
        "total_tokens": 3 + len(words),
    }
    pieces += [chunk(None, finish), _usage_chunk(usage), DONE]
    return Plan(pieces=pieces, delay=delay)


def _usage_chunk(usage: dict[str, int]) -> bytes:
    body = {"id": "chatcmpl-1", "choices": [], "usage": usage}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def error_plan(status: int, message: str = "nope", **headers: str) -> Plan:
    body = json.dumps({"error": {"message": message, "type": "test"}}).encode()
    return Plan(status=status, headers=headers, pieces=[body])


class QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-stream are expected here, not errors."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakeOpenAI:
    """Serve plans from a thread; ``planner`` picks one per request."""

    def __init__(self) -> None:
        self.planner: Callable[[dict[str, Any]], Plan] = lambda body: text_plan(
            ["Hello", " world"]
        )
        self.requests: list[dict[str, Any]] = []
        self.open_connections = 0
        self.accepted = 0
        self.in_flight = 0
        self.aborted = 0
        self.completed = 0
        self._lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, name: str, delta: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def wait_until(self, check: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.01)
        return check()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                fake.count("open_connections", 1)
                fake.count("accepted", 1)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    fake.count("open_connections", -1)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                body["_headers"] = dict(self.headers)
                fake.requests.append(body)
                plan = fake.planner(body)
                fake.count("in_flight", 1)
                try:
                    self._send(plan)
                    fake.count("completed", 1)
                except (BrokenPipeError, ConnectionResetError):
                    fake.count("aborted", 1)
                    self.close_connection = True
                finally:
                    fake.count("in_flight", -1)

            def _send(self, plan: Plan) -> None:
                self.send_response(plan.status)
                content_type = (
                    "text/event-stream" if plan.status == 200 else "application/json"
                )
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                for name, value in plan.headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.flush()
                if plan.first_delay:
                    time.sleep(plan.first_delay)
                for index, piece in enumerate(plan.pieces):
                    if index and plan.delay:
                        time.sleep(plan.delay)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler
