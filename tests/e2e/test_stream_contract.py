"""The streaming API through a real daphne, real Redis and local upstreams."""

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from resilience.circuit_breaker import CircuitBreaker
from tests.conftest import LiveServer, wait_until
from tests.fake_openai import DONE, FakeOpenAI, Plan, chunk, error_plan, text_plan
from tests.sse_client import chat, stream

pytestmark = pytest.mark.timeout(60)

Configure = Callable[..., None]


def openai_row(fake: FakeOpenAI, name: str = "upstream", **options: Any) -> dict:
    return {
        "name": name,
        "kind": "openai",
        "options": {"base_url": fake.base_url, **options},
    }


def test_events_follow_the_contract(daphne: LiveServer, providers: Configure) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 6}})
    result = stream(daphne.url, chat("hi"))

    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.raw.startswith(b": ")
    assert result.names() == ["start"] + ["token"] * 6 + ["done"]
    assert result.ids == list(range(1, 9))
    start = result.events[0][1]
    assert set(start) == {"request_id", "provider", "model"}
    assert start["provider"] == "simulated"
    assert start["model"] == "simulated-1"
    done = result.last()[1]
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 6,
        "total_tokens": 7,
    }


def test_same_prompt_streams_the_same_text(
    daphne: LiveServer, providers: Configure
) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 5}})
    first = stream(daphne.url, chat("same"))
    second = stream(daphne.url, chat("same"))
    assert first.text() == second.text() != ""


def test_openai_provider_streams_end_to_end(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: text_plan(["Hello", ",", " world"])
    providers(openai_row(fake_openai, model="m-1"))
    result = stream(daphne.url, chat("hi", max_tokens=20))
    assert result.names() == ["start", "token", "token", "token", "done"]
    assert result.text() == "Hello, world"
    assert result.events[0][1]["provider"] == "upstream"
    assert result.events[0][1]["model"] == "m-1"
    assert fake_openai.requests[-1]["max_tokens"] == 20


def test_c16_chunks_without_choices_give_exactly_the_text_tokens(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    filter_only = b'data: {"choices": [], "prompt_filter_results": []}\n\n'
    role_only = (
        b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
    )
    usage = (
        b'data: {"choices": [], "usage": {"prompt_tokens": 4, '
        b'"completion_tokens": 3, "total_tokens": 7}}\n\n'
    )
    pieces = [
        filter_only,
        role_only,
        chunk("a"),
        chunk("b"),
        chunk("c"),
        chunk(None, "stop"),
        usage,
        DONE,
    ]
    fake_openai.planner = lambda body: Plan(pieces=pieces)
    providers(openai_row(fake_openai))
    result = stream(daphne.url, chat())
    assert result.names() == ["start", "token", "token", "token", "done"]
    assert result.last()[1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
    }
    assert fake_openai.requests[0]["stream_options"] == {"include_usage": True}
    # The outcome is recorded as the stream closes, just after `done` is sent.
    assert wait_until(lambda: CircuitBreaker("upstream").state().window_calls == 1)
    breaker = CircuitBreaker("upstream").state()
    assert breaker.state == "closed"
    assert breaker.window_failures == 0
    assert len(fake_openai.requests) == 1


@pytest.mark.parametrize(
    ("words", "finish"),
    [(["some", " text"], "length"), ([], "length"), (["ok"], "stop")],
)
def test_c17_finish_reason_reaches_the_client_unchanged(
    daphne: LiveServer,
    providers: Configure,
    fake_openai: FakeOpenAI,
    words: list[str],
    finish: str,
) -> None:
    fake_openai.planner = lambda body: text_plan(words, finish=finish)
    providers(openai_row(fake_openai))
    result = stream(daphne.url, chat())
    assert result.last()[0] == "done"
    assert result.last()[1]["finish_reason"] == finish
    assert result.text() == "".join(words)


def test_c12_error_after_tokens_ends_with_error_not_done(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    error = b'data: {"error": {"message": "overloaded"}}\n\n'
    fake_openai.planner = lambda body: Plan(pieces=[chunk("par"), chunk("tial"), error])
    providers(openai_row(fake_openai))
    result = stream(daphne.url, chat())
    assert result.names() == ["start", "token", "token", "error"]
    assert result.text() == "partial"
    assert result.last()[1]["code"] == "upstream_error"
    assert len(fake_openai.requests) == 1


def test_c12_stream_cut_without_done_marker_ends_with_error(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: Plan(pieces=[chunk("par"), chunk("tial")])
    providers(openai_row(fake_openai))
    result = stream(daphne.url, chat())
    assert result.names() == ["start", "token", "token", "error"]
    assert result.last()[1]["code"] == "upstream_error"
    assert "done" not in result.names()


def test_provider_refusal_is_provider_rejected(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: error_plan(400, "context too long")
    providers(openai_row(fake_openai))
    result = stream(daphne.url, chat())
    assert result.names() == ["error"]
    assert result.last()[1]["code"] == "provider_rejected"
    assert "context too long" in result.last()[1]["message"]


def test_provider_rate_limit_is_provider_unavailable_with_retry_after(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {
            "name": "simulated",
            "options": {"fault": "rate_limited", "retry_after_seconds": 2.2},
        }
    )
    result = stream(daphne.url, chat())
    assert result.names() == ["error"]
    assert result.last()[1] == {
        "code": "provider_unavailable",
        "message": result.last()[1]["message"],
        "retry_after": 3,
    }


def test_simulated_failure_mid_stream_is_upstream_error(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {
            "name": "simulated",
            "options": {
                "ttft_ms": 0,
                "fault": "fail_after_tokens",
                "fail_after_tokens": 2,
            },
        }
    )
    result = stream(daphne.url, chat())
    assert result.names() == ["start", "token", "token", "error"]
    assert result.last()[1]["code"] == "upstream_error"


def test_c02_silent_provider_gets_heartbeats_and_the_stream_survives(
    daphne: LiveServer, providers: Configure
) -> None:
    # The live server beats every 0.5 s; the provider is silent for 1.6 s.
    providers({"name": "simulated", "options": {"ttft_ms": 1600, "length": 2}})
    result = stream(daphne.url, chat())
    assert result.names() == ["start", "token", "token", "done"]
    head = result.raw.split(b"event: start")[0]
    assert head.count(b": ping\n\n") >= 2


def test_hanging_provider_ends_with_an_error_event(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "fault": "hang"}},
        retry={"max_attempts": 1},
    )
    started = time.monotonic()
    result = stream(daphne.url, chat())
    assert result.names() == ["error"]
    assert result.last()[1]["code"] == "provider_unavailable"
    assert time.monotonic() - started < 15


def test_client_disconnect_cancels_the_upstream_call(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    words = [f"w{i} " for i in range(200)]
    fake_openai.planner = lambda body: text_plan(words, delay=0.05)
    providers(openai_row(fake_openai))
    result = stream(daphne.url, chat(), stop_after=3)
    assert result.names()[:2] == ["start", "token"]
    assert wait_until(lambda: fake_openai.aborted == 1, timeout=5)
    assert fake_openai.in_flight == 0
    assert fake_openai.completed == 0


def test_c11_cancelled_streams_do_not_exhaust_the_upstream_pool(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    words = [f"w{i} " for i in range(40)]
    fake_openai.planner = lambda body: text_plan(words, delay=0.02)
    providers(openai_row(fake_openai, max_connections=2, connect_timeout_seconds=3))
    for _ in range(5):
        partial = stream(daphne.url, chat(), stop_after=3)
        assert partial.names()[-1] == "token"
    for _ in range(6):
        full = stream(daphne.url, chat())
        assert full.last()[0] == "done", full.events[-1]
    # No upstream response is still being sent: every stream was closed.
    # Finished streams hand their connection back to the pool (kept alive,
    # at most the limit of 2); cancelled ones close theirs.
    assert wait_until(lambda: fake_openai.in_flight == 0, timeout=5)
    assert fake_openai.open_connections <= 2
    assert (fake_openai.aborted, fake_openai.completed) == (5, 6)
    assert len(fake_openai.requests) == 11


# --- admission errors: every malformed request gets a JSON 4xx -------------


def post(
    url: str, content: bytes, content_type: str = "application/json", **headers: str
) -> httpx.Response:
    return httpx.post(
        url + "/api/v1/chat/stream",
        content=content,
        headers={"Content-Type": content_type, **headers},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "needle"),
    [
        (b"{not json", 400, "invalid_json", "JSON"),
        (b"[1, 2]", 400, "invalid_request", "object"),
        (b"{}", 400, "invalid_request", "messages"),
        (b'{"messages": []}', 400, "invalid_request", "messages"),
        (
            b'{"messages": [{"role": "robot", "content": "x"}]}',
            400,
            "invalid_request",
            "role",
        ),
        (
            b'{"messages": [{"role": "user", "content": 5}]}',
            400,
            "invalid_request",
            "content",
        ),
        (
            b'{"messages": [{"role": "user", "content": "  "}]}',
            400,
            "invalid_request",
            "empty",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999}',
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}',
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "provider": "nope"}',
            404,
            "unknown_provider",
            "nope",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1}',
            400,
            "invalid_request",
            "temperature",
        ),
        (b"\xff\xfe", 400, "invalid_json", "JSON"),
    ],
)
def test_bad_input_gets_a_json_error_naming_the_problem(
    daphne: LiveServer,
    providers: Configure,
    body: bytes,
    status: int,
    code: str,
    needle: str,
) -> None:
    providers({"name": "simulated"})
    response = post(daphne.url, body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert needle in error["message"]
    assert error["retry_after"] is None


def test_wrong_content_type_is_415(daphne: LiveServer) -> None:
    response = post(daphne.url, b"{}", "text/plain")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_get_on_the_stream_endpoint_is_405(daphne: LiveServer) -> None:
    response = httpx.get(daphne.url + "/api/v1/chat/stream")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_too_many_characters_is_413(daphne: LiveServer, providers: Configure) -> None:
    providers({"name": "simulated"})
    body = json.dumps(chat("x" * 32001)).encode()
    response = post(daphne.url, body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "32000" in response.json()["error"]["message"]


def test_oversized_body_is_refused_while_it_is_read(daphne: LiveServer) -> None:
    """A huge body is cut off at the limit, without waiting for all of it."""
    with socket.create_connection(("127.0.0.1", daphne.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 65536
        try:
            for _ in range(200):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        answer = sock.recv(4096)
    assert b" 413 " in answer.split(b"\r\n")[0]


def test_body_over_the_byte_limit_is_413_before_parsing(daphne: LiveServer) -> None:
    # Daphne buffers a body before the application sees it (the README says
    # to cap it at the proxy too); the consumer counts bytes as they arrive.
    body = b'{"messages": [{"role": "user", "content": "' + b"y" * 600_000 + b'"}]}'
    response = post(daphne.url, body)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body is too large"


def test_disabled_provider_is_unknown(daphne: LiveServer, providers: Configure) -> None:
    providers({"name": "simulated"}, {"name": "off", "enabled": False})
    response = post(daphne.url, json.dumps(chat(provider="off")).encode())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_provider"


def test_session_requests_need_the_csrf_token(
    daphne: LiveServer, providers: Configure
) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 1}})
    body = json.dumps(chat()).encode()
    refused = post(daphne.url, body, Cookie="sessionid=abc")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"

    with httpx.Client(base_url=daphne.url) as client:
        client.get("/")
        token = client.cookies["csrftoken"]
        client.cookies.set("sessionid", "abc")
        answer = client.post(
            "/api/v1/chat/stream",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-CSRFToken": token,
                "Referer": daphne.url + "/",
            },
        )
    assert answer.status_code == 200
    assert "event: done" in answer.text


def test_api_clients_without_a_session_need_no_csrf_token(
    daphne: LiveServer, providers: Configure
) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 1}})
    assert stream(daphne.url, chat()).last()[0] == "done"


def test_health_and_readiness(daphne: LiveServer) -> None:
    assert httpx.get(daphne.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(daphne.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_chat_page_and_styled_admin_are_served(daphne: LiveServer) -> None:
    page = httpx.get(daphne.url + "/")
    assert page.status_code == 200
    assert (
        "/api/v1/chat/stream"
        in httpx.get(daphne.url + "/static/streamsvc/chat.js").text
    )
    css = httpx.get(daphne.url + "/static/admin/css/base.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


def test_prompt_text_is_not_logged(daphne: LiveServer, providers: Configure) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 1}})
    secret = "do-not-log-this-prompt-7f3a"
    stream(daphne.url, chat(secret))
    assert wait_until(lambda: "done" in daphne.log_text())
    assert secret not in daphne.log_text()
