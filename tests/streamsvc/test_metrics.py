"""`GET /metrics`: Prometheus format, token or allowed networks only."""

import ipaddress
import threading
import time
from typing import Any

import httpx
import pytest
from django.test import Client

from resilience.connection_pool_manager import HASH_TAG
from resilience.redis_client import key
from resilience.stats import history
from tests.conftest import LiveServer, wait_until
from tests.sse_client import chat, stream


@pytest.mark.django_db
def test_loopback_may_read_metrics(redis: Any) -> None:
    response = Client(REMOTE_ADDR="127.0.0.1").get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"streamsvc_requests_total" in response.content
    assert b"streamsvc_queue_depth 0.0" in response.content


def test_other_networks_are_refused_without_the_token(redis: Any) -> None:
    response = Client(REMOTE_ADDR="203.0.113.5").get("/metrics")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


@pytest.mark.django_db
def test_the_token_opens_metrics_from_anywhere(redis: Any, settings: Any) -> None:
    settings.METRICS_TOKEN = "s3cret"
    client = Client(REMOTE_ADDR="203.0.113.5")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


@pytest.mark.django_db
def test_allowed_networks_are_configurable(redis: Any, settings: Any) -> None:
    settings.METRICS_ALLOWED_NETWORKS = (ipaddress.ip_network("10.0.0.0/8"),)
    assert Client(REMOTE_ADDR="10.2.3.4").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 403


def pool_in_use(redis: Any) -> int:
    return int(redis.zcard(key(HASH_TAG, "global")))


def sample(text: str, name: str) -> float:
    """Return the value of the sample named exactly ``name`` (labels included)."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(60)
def test_metrics_move_when_requests_are_admitted_and_refused(
    daphne: LiveServer, providers: Any
) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 3}})

    def scrape() -> str:
        return httpx.get(daphne.url + "/metrics").text

    before = scrape()
    stream(daphne.url, chat())
    stream(daphne.url, chat(provider="nope"))
    after = scrape()
    admitted = 'streamsvc_requests_total{outcome="admitted"}'
    errors = 'streamsvc_requests_total{outcome="error"}'
    assert sample(after, admitted) == sample(before, admitted) + 1
    assert sample(after, errors) == sample(before, errors) + 1
    tokens = "streamsvc_tokens_streamed_total"
    assert sample(after, tokens) == sample(before, tokens) + 3
    count = "streamsvc_time_to_first_token_seconds_count"
    assert sample(after, count) == sample(before, count) + 1


@pytest.mark.timeout(90)
def test_metrics_move_when_requests_are_limited_and_queued(
    daphne: LiveServer, providers: Any, redis: Any
) -> None:
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "length": 60,
                                          "tokens_per_second": 20}},
        pool={"global_max": 1, "per_user_max": 1},
        rate_limits=[{"name": "m", "scope": "ip", "capacity": 3,
                      "refill_per_second": 0.01}],
    )  # fmt: skip
    before = httpx.get(daphne.url + "/metrics").text
    holder = threading.Thread(target=stream, args=(daphne.url, chat("hold")))
    holder.start()
    assert wait_until(lambda: pool_in_use(redis) == 1)
    during = httpx.get(daphne.url + "/metrics").text
    for _ in range(2):
        assert stream(daphne.url, chat(), stop_after=1).names() == ["queued"]
    assert stream(daphne.url, chat()).status == 429
    after = httpx.get(daphne.url + "/metrics").text
    holder.join(30)

    def moved(name: str) -> float:
        return sample(after, name) - sample(before, name)

    assert moved('streamsvc_requests_total{outcome="admitted"}') == 1
    assert moved('streamsvc_requests_total{outcome="queued"}') == 2
    assert moved('streamsvc_requests_total{outcome="rate_limited"}') == 1
    assert sample(during, "streamsvc_pool_in_use") == 1
    assert sample(during, 'streamsvc_breaker_state{provider="simulated"}') == 0
    decisions = 'streamsvc_rate_limit_decisions_total{result="admitted",where="redis"}'
    assert moved(decisions) >= 1
    assert 0 <= sample(after, "streamsvc_rate_limit_local_ratio") <= 1

    # The status page's "passed the rate limit" chart counts the limiter's
    # admissions: the direct stream and both queued ones.
    def passed() -> int:
        rows = history(time.time() + 2, seconds=60)["series"]
        return sum(int(row.get("limit_admitted", 0)) for row in rows)

    assert wait_until(lambda: passed() >= 3)
    for component in ("rate_limiter", "pool", "breaker", "queue"):
        trips = f'streamsvc_redis_round_trips_total{{component="{component}"}}'
        assert moved(trips) >= 1, component


def test_an_open_breaker_shows_in_metrics(redis: Any, providers: Any) -> None:
    from resilience.circuit_breaker import CircuitBreaker

    providers({"name": "simulated"}, {"name": "backup"})
    CircuitBreaker("backup").force_open()
    body = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()
    assert sample(body, 'streamsvc_breaker_state{provider="backup"}') == 2
    assert sample(body, 'streamsvc_breaker_state{provider="simulated"}') == 0


def test_reading_breaker_states_uses_each_providers_own_recovery_time(
    redis: Any, providers: Any
) -> None:
    import asyncio
    import time

    from resilience.circuit_breaker import AsyncCircuitBreaker, BreakerPolicy
    from resilience.status import breaker_status

    providers(
        {"name": "slowheal"},
        breakers={"slowheal": {"failure_threshold": 1,
                               "recovery_timeout_seconds": 300}},
    )  # fmt: skip

    async def open_a_minute_ago() -> None:
        policy = BreakerPolicy(failure_threshold=1, recovery_timeout_seconds=300)
        breaker = AsyncCircuitBreaker(
            "slowheal", policy, clock=lambda: time.time() - 60
        )
        await breaker.record_failure(await breaker.acquire())

    asyncio.run(open_a_minute_ago())
    # The default policy's 30 s recovery would turn this read into half-open.
    assert [b["state"] for b in breaker_status()] == ["open"]
    body = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()
    assert sample(body, 'streamsvc_breaker_state{provider="slowheal"}') == 2


def test_monitoring_reads_are_not_counted_as_breaker_traffic(
    redis: Any, providers: Any
) -> None:
    providers({"name": "simulated"})

    def trips(body: str, component: str) -> float:
        return sample(
            body, f'streamsvc_redis_round_trips_total{{component="{component}"}}'
        )

    client = Client(REMOTE_ADDR="127.0.0.1")
    first = client.get("/metrics").content.decode()
    second = client.get("/metrics").content.decode()
    # Each scrape reads every breaker's state: as "status", not "breaker".
    assert trips(second, "breaker") == trips(first, "breaker")
    assert trips(second, "status") > trips(first, "status")
