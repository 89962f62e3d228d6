"""What a stream leaves in the logs: its request id, never its prompt.

Requests go through the ASGI application in this process, so ``caplog`` sees
every record with its level, against the session's real Redis.
"""

import asyncio
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
from channels.testing import ApplicationCommunicator

from llm.sse import SSEParser
from streamsvc.asgi import application
from tests.fake_openai import FakeOpenAI, error_plan

pytestmark = pytest.mark.timeout(60)

Configure = Callable[..., None]
Events = list[tuple[str, dict[str, Any]]]

PROMPT = "my-private-prompt-9c1e: what did Dana earn last quarter?"
STREAM_LINE = re.compile(r"^stream (\S+): ")
OUTCOMES = [
    pytest.param({"ttft_ms": 0, "length": 6}, "done", id="done"),
    pytest.param(
        {"ttft_ms": 0, "fault": "fail_after_tokens", "fail_after_tokens": 2},
        "upstream_error",
        id="upstream-error",
    ),
    pytest.param({"fault": "bad_request"}, "provider_rejected", id="rejected"),
]


async def _post(prompt: str) -> Events:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode()
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/api/v1/chat/stream",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
    }
    app = ApplicationCommunicator(application, scope)
    await app.send_input({"type": "http.request", "body": body})
    start = await app.receive_output(10)
    assert start["status"] == 200, start
    parser, events = SSEParser(), []
    while True:
        message = await app.receive_output(10)
        for event in parser.feed(message.get("body", b"")):
            events.append((event.event, json.loads(event.data)))
        if not message.get("more_body"):
            break
    await app.send_input({"type": "http.disconnect"})
    await app.wait(5)
    return events


def post_stream(prompt: str) -> Events:
    """Stream one answer in a fresh event loop and return its events."""
    return asyncio.run(_post(prompt))


def logged_at_info_or_above(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return every record at INFO or above as written, traceback included."""
    formatter = logging.Formatter("%(name)s %(message)s")
    return [
        formatter.format(record)
        for record in caplog.records
        if record.levelno >= logging.INFO
    ]


@pytest.mark.parametrize(("options", "outcome"), OUTCOMES)
def test_every_stream_log_line_carries_the_request_id(
    providers: Configure,
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    outcome: str,
) -> None:
    providers({"name": "simulated", "options": options})
    caplog.set_level(logging.DEBUG)

    events = post_stream(PROMPT)

    assert events[-1][0] == ("done" if outcome == "done" else "error")
    ours = ("streamsvc", "resilience", "llm")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(ours)]
    stream_lines = [line for line in lines if line.startswith("stream")]
    ids = {match[1] for line in stream_lines if (match := STREAM_LINE.match(line))}
    assert len(ids) == 1, stream_lines
    assert all(STREAM_LINE.match(line) for line in stream_lines), stream_lines
    (request_id,) = ids
    if events[0][0] == "start":
        assert events[0][1]["request_id"] == request_id
    assert f"stream {request_id}: admitted, provider simulated" in stream_lines
    ended = f"stream {request_id}: {outcome} after"
    assert any(line.startswith(ended) for line in stream_lines), stream_lines


@pytest.mark.parametrize(("options", "outcome"), OUTCOMES)
def test_prompt_and_answer_text_never_reach_the_logs_at_info_or_above(
    providers: Configure,
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    outcome: str,
) -> None:
    providers({"name": "simulated", "options": options})
    caplog.set_level(logging.DEBUG)

    events = post_stream(PROMPT)

    answer = "".join(data["text"] for name, data in events if name == "token")
    logged = logged_at_info_or_above(caplog)
    assert any(outcome in line for line in logged), "the stream logged nothing"
    assert not [line for line in logged if "my-private-prompt-9c1e" in line]
    assert not [line for line in logged if "Dana earn" in line]
    if len(answer.split()) > 2:
        assert not [line for line in logged if answer in line]


def test_a_provider_error_that_quotes_the_prompt_is_not_logged_at_info(
    providers: Configure, caplog: pytest.LogCaptureFixture, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: error_plan(
        400, "invalid content: " + body["messages"][0]["content"]
    )
    providers(
        {
            "name": "upstream",
            "kind": "openai",
            "options": {"base_url": fake_openai.base_url},
        }
    )
    caplog.set_level(logging.DEBUG)

    events = post_stream(PROMPT)

    assert events[-1][1]["code"] == "provider_rejected"
    logged = logged_at_info_or_above(caplog)
    assert not [line for line in logged if "my-private-prompt-9c1e" in line]
