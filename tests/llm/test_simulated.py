from typing import Any

import pytest

from llm.base import ChatRequest, Finish, Message, TextDelta
from llm.errors import (
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderStreamError,
)
from llm.simulated import SimulatedProvider

REQUEST = ChatRequest((Message("user", "hello"),))


async def no_sleep(seconds: float) -> None:
    return None


async def run(options: dict[str, Any], request: ChatRequest = REQUEST) -> list[Any]:
    provider = SimulatedProvider("sim", options, sleep=no_sleep)
    return [item async for item in provider.stream(request)]


async def test_text_is_deterministic_for_a_prompt_and_as_long_as_asked() -> None:
    first = await run({"length": 12})
    second = await run({"length": 12})
    assert first == second
    deltas = [item for item in first if isinstance(item, TextDelta)]
    assert len(deltas) == 12
    assert first[-1] == Finish("stop", first[-1].usage)
    assert first[-1].usage.completion_tokens == 12


async def test_max_tokens_below_the_natural_length_finishes_with_length() -> None:
    items = await run({"length": 20}, ChatRequest(REQUEST.messages, max_tokens=4))
    assert len(items) == 5
    assert items[-1].finish_reason == "length"


async def test_pacing_follows_ttft_and_tokens_per_second() -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    provider = SimulatedProvider(
        "sim", {"ttft_ms": 250, "tokens_per_second": 10, "length": 3}, sleep=record
    )
    [item async for item in provider.stream(REQUEST)]
    assert slept == [0.25, 0.1, 0.1]


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("rate_limited", ProviderRateLimited),
        ("server_error", ProviderServerError),
        ("bad_request", ProviderRejected),
        ("fail_before_first_token", ProviderServerError),
    ],
)
async def test_faults_fail_before_any_text(fault: str, error: type[Exception]) -> None:
    provider = SimulatedProvider("sim", {"fault": fault}, sleep=no_sleep)
    stream = provider.stream(REQUEST)
    with pytest.raises(error):
        await anext(stream)


async def test_rate_limited_fault_carries_its_retry_after() -> None:
    options = {"fault": "rate_limited", "retry_after_seconds": 7}
    with pytest.raises(ProviderRateLimited) as caught:
        await run(options)
    assert caught.value.retry_after == 7


async def test_fail_after_tokens_sends_that_many_tokens_then_fails() -> None:
    provider = SimulatedProvider(
        "sim", {"fault": "fail_after_tokens", "fail_after_tokens": 3}, sleep=no_sleep
    )
    seen = []
    with pytest.raises(ProviderStreamError):
        async for item in provider.stream(REQUEST):
            seen.append(item)
    assert len(seen) == 3
