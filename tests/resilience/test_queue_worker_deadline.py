"""A queued job that runs past its timeout ends with the right error code."""

import asyncio
from collections.abc import AsyncIterator

from resilience import events
from resilience.events import StreamEvent
from resilience.queue_consumer_worker import _deadline


async def slow_source(tokens: int) -> AsyncIterator[StreamEvent]:
    yield events.start("r", "p", "m")
    for _ in range(tokens):
        yield events.token("x")
    await asyncio.sleep(30)
    yield events.done("stop", {})


async def drain(source: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in source]


async def test_a_job_that_never_answered_in_time_is_provider_unavailable() -> None:
    got = await asyncio.wait_for(drain(_deadline(slow_source(0), 0.2)), 5)
    assert [e.name for e in got] == ["start", "error"]
    assert got[-1].data["code"] == "provider_unavailable"


async def test_a_job_cut_short_after_text_is_upstream_error() -> None:
    got = await asyncio.wait_for(drain(_deadline(slow_source(2), 0.2)), 5)
    assert [e.name for e in got] == ["start", "token", "token", "error"]
    assert got[-1].data["code"] == "upstream_error"
