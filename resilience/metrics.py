"""Prometheus metrics of the stream path.

Counters and histograms live here and are recorded where things happen.
With ``PROMETHEUS_MULTIPROC_DIR`` set (``make run`` sets it) every daphne
and worker process writes its own files and ``/metrics`` sums them, so
several processes report as one. Cluster-wide levels (pool in use, queue
depth, breaker state) are read from Redis at scrape time instead of being
kept per process.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from .events import ERROR, TOKEN, StreamEvent
from .stats import stats

if TYPE_CHECKING:
    from .rate_limiter import Decision

REQUESTS = Counter(
    "streamsvc_requests",
    "Stream requests by admission outcome.",
    ["outcome"],
)
STREAMS_ENDED = Counter(
    "streamsvc_streams_ended",
    "Streams by how they ended (done, error code, cancelled).",
    ["outcome"],
)
TOKENS = Counter("streamsvc_tokens_streamed", "Token events sent to clients.")
TTFT = Histogram(
    "streamsvc_time_to_first_token_seconds",
    "From admission to the first token sent.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
DURATION = Histogram(
    "streamsvc_stream_duration_seconds",
    "From admission to the last event.",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
LIMITER_DECISIONS = Counter(
    "streamsvc_rate_limit_decisions",
    "Rate-limit decisions by result and where they were decided.",
    ["result", "where"],
)

OUTCOMES = (
    "admitted",
    "rate_limited",
    "queued",
    "queue_full",
    "provider_unavailable",
    "error",
)
for _outcome in OUTCOMES:
    REQUESTS.labels(_outcome)


def record_request(outcome: str) -> None:
    """Count an admission outcome in Prometheus and in the fleet history."""
    label = outcome if outcome in OUTCOMES else "error"
    REQUESTS.labels(label).inc()
    stats.count(label)


def record_decision(decision: "Decision") -> None:
    """Count a rate-limit decision by result and by where it was made."""
    result = "admitted" if decision.allowed else "limited"
    where = "fallback" if decision.fallback else "local" if decision.local else "redis"
    LIMITER_DECISIONS.labels(result, where).inc()
    if decision.allowed:
        # Limited ones are counted as the "rate_limited" request outcome.
        stats.count("limit_admitted")
    if decision.local:
        stats.count("decided_local")


class StreamRecorder:
    """Record one stream's metrics as its events go by."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.tokens = 0
        self.last: StreamEvent | None = None

    def saw(self, event: StreamEvent) -> None:
        if event.name == TOKEN:
            if not self.tokens:
                TTFT.observe(self._clock() - self.started)
                stats.ttft(self._clock() - self.started)
            self.tokens += 1
            TOKENS.inc()
        self.last = event

    def outcome(self) -> str:
        if self.last is None or not self.last.terminal:
            return "cancelled"
        if self.last.name == ERROR:
            return str(self.last.data.get("code", "error"))
        return "done"

    def finish(self) -> float:
        """Record the end; return the stream's duration in seconds."""
        seconds = self._clock() - self.started
        DURATION.observe(seconds)
        STREAMS_ENDED.labels(self.outcome()).inc()
        return seconds
