"""A follower closed at its terminal event knows the stream finished."""

from typing import Any

from resilience.streams import with_heartbeats
from tests.resilience.test_queue_handoff import DONE, START, journal, started_ticket


async def test_a_follower_closed_at_done_counts_as_finished(redis: Any) -> None:
    follower, job, _ = await started_ticket(redis)
    journal(redis, job, 1, [START, DONE])
    # As the consumer relays: stop reading at the terminal event, which
    # closes the generator right there.
    async for event in with_heartbeats(follower.events(), 5):
        if event is not None and event.terminal:
            break
    assert follower.finished
