"""The OpenAI adapter against a real local HTTP server (no mocked transport)."""

import asyncio
from typing import Any

import pytest

from llm.base import ChatRequest, Finish, Message, TextDelta
from llm.errors import (
    ProviderConnectionError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderStreamError,
    ProviderTimeout,
)
from llm.openai import OpenAIProvider
from tests.fake_openai import DONE, FakeOpenAI, Plan, chunk, error_plan, text_plan

REQUEST = ChatRequest((Message("user", "hi"),), max_tokens=50)


def provider_for(fake: FakeOpenAI, **options: Any) -> OpenAIProvider:
    return OpenAIProvider("up", {"base_url": fake.base_url, **options})


async def collect(provider: OpenAIProvider) -> list[Any]:
    try:
        return [item async for item in provider.stream(REQUEST)]
    finally:
        await provider.aclose()


async def test_streams_text_and_finish_with_upstream_usage(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.planner = lambda body: text_plan(["Hel", "lo", "!"])
    items = await collect(provider_for(fake_openai))
    assert [i.text for i in items if isinstance(i, TextDelta)] == ["Hel", "lo", "!"]
    assert items[-1] == Finish("stop", items[-1].usage)
    assert items[-1].usage.as_dict() == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
    }


async def test_request_asks_for_streaming_usage_and_sends_the_key(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-test")
    await collect(provider_for(fake_openai, api_key_env="TEST_UPSTREAM_KEY"))
    sent = fake_openai.requests[-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 50
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["_headers"]["Authorization"] == "Bearer sk-test"


async def test_c16_chunks_without_choices_and_role_only_deltas_add_no_text(
    fake_openai: FakeOpenAI,
) -> None:
    filter_only = b'data: {"choices": [], "prompt_filter_results": [{}]}\n\n'
    role_only = (
        b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
    )
    usage = (
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, '
        b'"completion_tokens": 3, "total_tokens": 12}}\n\n'
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
    items = await collect(provider_for(fake_openai))
    assert [i.text for i in items if isinstance(i, TextDelta)] == ["a", "b", "c"]
    assert items[-1].usage.as_dict() == {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
    }


async def test_c17_length_finish_reason_is_kept(fake_openai: FakeOpenAI) -> None:
    fake_openai.planner = lambda body: text_plan(["cut"], finish="length")
    items = await collect(provider_for(fake_openai))
    assert items[-1].finish_reason == "length"


async def test_c13_split_utf8_over_the_network_is_reassembled(
    fake_openai: FakeOpenAI,
) -> None:
    event = chunk("🦜漢")
    at = event.index("🦜".encode()) + 1
    fake_openai.planner = lambda body: Plan(
        pieces=[event[:at], event[at:], DONE[:5], DONE[5:]], delay=0.02
    )
    items = await collect(provider_for(fake_openai))
    assert items[0] == TextDelta("🦜漢")
    assert isinstance(items[-1], Finish)


async def test_c13_done_without_a_trailing_blank_line_still_ends_cleanly(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.planner = lambda body: Plan(pieces=[chunk("x"), b"data: [DONE]"])
    items = await collect(provider_for(fake_openai))
    assert isinstance(items[-1], Finish)


async def test_c12_error_payload_after_tokens_raises_after_the_text(
    fake_openai: FakeOpenAI,
) -> None:
    error = b'data: {"error": {"message": "overloaded"}}\n\n'
    fake_openai.planner = lambda body: Plan(pieces=[chunk("partial"), error])
    seen = []
    with pytest.raises(ProviderStreamError, match="overloaded"):
        async for item in provider_for(fake_openai).stream(REQUEST):
            seen.append(item)
    assert seen == [TextDelta("partial")]


async def test_c12_stream_that_ends_without_done_is_an_error(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.planner = lambda body: Plan(pieces=[chunk("partial")])
    with pytest.raises(ProviderStreamError, match="without \\[DONE\\]"):
        await collect(provider_for(fake_openai))


async def test_malformed_json_in_the_stream_is_a_stream_error(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.planner = lambda body: Plan(pieces=[b"data: {nope\n\n"])
    with pytest.raises(ProviderStreamError, match="malformed"):
        await collect(provider_for(fake_openai))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_c08_client_errors_are_permanent_rejections(
    fake_openai: FakeOpenAI, status: int
) -> None:
    fake_openai.planner = lambda body: error_plan(status, "context too long")
    with pytest.raises(ProviderRejected, match="context too long") as caught:
        await collect(provider_for(fake_openai))
    assert caught.value.status == status
    assert not caught.value.transient


async def test_429_is_transient_with_its_retry_after(fake_openai: FakeOpenAI) -> None:
    fake_openai.planner = lambda body: error_plan(429, retry_after_ms="2500")
    with pytest.raises(ProviderRateLimited) as caught:
        await collect(provider_for(fake_openai))
    assert caught.value.retry_after == 2.5
    assert caught.value.transient


async def test_5xx_is_a_transient_server_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.planner = lambda body: error_plan(503, retry_after="4")
    with pytest.raises(ProviderServerError) as caught:
        await collect(provider_for(fake_openai))
    assert caught.value.retry_after == 4


async def test_read_timeout_is_a_provider_timeout(fake_openai: FakeOpenAI) -> None:
    fake_openai.planner = lambda body: Plan(pieces=[chunk("x")], first_delay=1.0)
    with pytest.raises(ProviderTimeout):
        await collect(provider_for(fake_openai, timeout_seconds=0.2))


async def test_refused_connection_is_a_connection_error() -> None:
    from streamsvc.embedded_redis import free_port

    provider = OpenAIProvider("up", {"base_url": f"http://127.0.0.1:{free_port()}/v1"})
    with pytest.raises(ProviderConnectionError):
        await collect(provider)


async def test_c11_abandoned_streams_return_their_connections(
    fake_openai: FakeOpenAI,
) -> None:
    """Two connections, five streams dropped mid-way, then six full ones."""
    words = [f"w{i} " for i in range(20)]
    fake_openai.planner = lambda body: text_plan(words, delay=0.02)
    provider = provider_for(fake_openai, max_connections=2, connect_timeout_seconds=2)

    async def abandon() -> None:
        stream = provider.stream(REQUEST)
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    async def cancel() -> None:
        task = asyncio.ensure_future(collect_without_close(provider))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    for action in (abandon, cancel, abandon, cancel, abandon):
        await action()
    for _ in range(6):
        items = await collect_without_close(provider)
        assert isinstance(items[-1], Finish)
    await provider.aclose()
    assert fake_openai.wait_until(lambda: fake_openai.in_flight == 0)
    assert fake_openai.wait_until(lambda: fake_openai.open_connections == 0)


async def collect_without_close(provider: OpenAIProvider) -> list[Any]:
    return [item async for item in provider.stream(REQUEST)]


async def test_finished_streams_reuse_one_kept_alive_connection(
    fake_openai: FakeOpenAI,
) -> None:
    provider = provider_for(fake_openai)
    try:
        for _ in range(3):
            items = [item async for item in provider.stream(REQUEST)]
            assert isinstance(items[-1], Finish)
        assert fake_openai.accepted == 1
        assert fake_openai.open_connections == 1
    finally:
        await provider.aclose()
