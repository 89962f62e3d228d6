"""A follower closed at its terminal event knows the stream finished."""

from contextlib import aclosing
from typing import Any

from resilience.streams import with_heartbeats
from tests.resilience.test_queue_handoff import DONE, START, journal, started_ticket


async def test_a_follower_closed_at_done_counts_as_finished(redis: Any) -> None:
    follower, job, _ = await started_ticket(redis)
    journal(redis, job, 1, [START, DONE])
    # As the consumer relays: stop reading at the terminal event, which
    # closes the generator right there.
    source = follower.events()
    async with aclosing(with_heartbeats(source, 5)) as relay:
        async for event in relay:
            if event is not None and event.terminal:
                break
    await source.aclose()
    assert follower.finished


async def test_an_end_the_follower_makes_itself_leaves_the_job_to_withdraw(
    redis: Any,
) -> None:
    follower, job, layer = await started_ticket(redis)
    # Batch 2 arrives, batch 1 was never journaled: the follower ends the
    # stream itself, and the worker may still be running for nobody.
    await layer.group_send(
        job.group, {"type": "stream.batch", "seq": 2, "events": [DONE]}
    )
    got = [e async for e in follower.events()]
    # (worker_lost if the batch is slow to arrive: also an end of ours)
    assert got[-1].data["code"] in ("internal_error", "worker_lost")
    assert not follower.finished
