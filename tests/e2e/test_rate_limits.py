"""Layer 1 end to end: 429s, RateLimit headers (C15), real addresses (C10)."""

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import LiveServer, live_env
from tests.sse_client import chat, stream

pytestmark = pytest.mark.timeout(90)

Configure = Callable[..., None]
QUICK = {"ttft_ms": 0, "length": 2, "tokens_per_second": 500}


def limit(name: str, scope: str, capacity: int, rate: float, **extra: Any) -> dict:
    # Each test names its own buckets: a live server remembers "empty until
    # T" per bucket in process, which a Redis flush does not reset.
    return {
        "name": name,
        "scope": scope,
        "capacity": capacity,
        "refill_per_second": rate,
        **extra,
    }


def test_c15_limit_headers_go_out_on_admitted_streams_and_agree_with_the_429(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("per-ip", "ip", 5, 0.2)],
    )
    remaining = []
    resets = []
    for _ in range(5):
        result = stream(daphne.url, chat())
        assert result.status == 200
        assert result.headers["ratelimit-limit"] == "5"
        remaining.append(int(result.headers["ratelimit-remaining"]))
        resets.append(int(result.headers["ratelimit-reset"]))
        assert result.last()[0] == "done"
    assert remaining == sorted(remaining, reverse=True)
    assert remaining[-1] == 0
    sixth = stream(daphne.url, chat())
    assert sixth.status == 429
    error = sixth.body["error"]
    assert error["code"] == "rate_limited"
    retry = int(sixth.headers["retry-after"])
    assert retry == error["retry_after"]
    # One token every 5 s: the next one is at most 5 s away, at least 1.
    assert 1 <= retry <= 5
    assert sixth.headers["ratelimit-remaining"] == "0"
    assert sixth.headers["ratelimit-limit"] == "5"
    assert abs(int(sixth.headers["ratelimit-reset"]) - resets[-1]) <= 1
    assert retry <= int(sixth.headers["ratelimit-reset"])


def test_retry_after_is_the_real_refill_time(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("slow", "global", 1, 0.25)],
    )
    assert stream(daphne.url, chat()).status == 200
    refused = stream(daphne.url, chat())
    assert refused.status == 429
    assert int(refused.headers["retry-after"]) == 4


def test_several_buckets_are_all_or_nothing(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[
            limit("roomy", "global", 100, 0.01),
            limit("tight", "ip", 1, 0.01),
        ],
    )
    assert stream(daphne.url, chat()).status == 200
    for _ in range(3):
        refused = stream(daphne.url, chat())
        assert refused.status == 429
        assert "tight" in refused.body["error"]["message"]
    # The refused requests took nothing from the roomy bucket.
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("roomy", "global", 100, 0.01)],
    )
    result = stream(daphne.url, chat())
    assert int(result.headers["ratelimit-remaining"]) >= 100 - 1 - 25


@pytest.fixture(scope="module")
def proxied(django_db_setup: Any) -> Iterator[LiveServer]:
    """A daphne that trusts 127.0.0.1 as its reverse proxy."""
    server = LiveServer(live_env(TRUSTED_PROXIES="127.0.0.1/32")).start()
    yield server
    server.stop()


def xff(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


def test_c10_clients_behind_a_trusted_proxy_get_their_own_buckets(
    proxied: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("per-ip", "ip", 1, 0.01)],
    )
    assert stream(proxied.url, chat(), headers=xff("198.51.100.1")).status == 200
    assert stream(proxied.url, chat(), headers=xff("198.51.100.2")).status == 200
    assert stream(proxied.url, chat(), headers=xff("198.51.100.1")).status == 429


def test_c10_prepending_a_fake_hop_does_not_reset_the_limit(
    proxied: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("fake-hop-ip", "ip", 1, 0.01)],
    )
    assert stream(proxied.url, chat(), headers=xff("198.51.100.7")).status == 200
    forged = stream(proxied.url, chat(), headers=xff("6.6.6.6, 198.51.100.7"))
    assert forged.status == 429


def test_c10_a_direct_client_forging_forwarded_for_is_limited_by_its_address(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("direct-ip", "ip", 2, 0.01)],
    )
    codes = [
        stream(daphne.url, chat(), headers=xff(f"203.0.113.{i}")).status
        for i in range(4)
    ]
    assert codes == [200, 200, 429, 429]


def test_fail_closed_answers_503_while_redis_is_down_and_recovers(
    daphne: LiveServer, providers: Configure
) -> None:
    from tests.redis_plugin import redis_server

    providers(
        {"name": "simulated", "options": QUICK},
        # Under 10 tokens a bucket is never leased out, so every
        # decision needs Redis (leased tokens would be spent first).
        rate_limits=[limit("strict", "global", 5, 5, on_redis_down="fail_closed")],
    )
    assert stream(daphne.url, chat()).status == 200
    server = redis_server()
    server.stop()
    try:
        started = time.monotonic()
        refused = stream(daphne.url, chat())
        assert time.monotonic() - started < 3
        assert refused.status == 503
        assert refused.body["error"]["code"] == "rate_limiter_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if stream(daphne.url, chat()).status == 200:
            break
        time.sleep(0.3)
    else:
        pytest.fail("service did not recover after Redis came back")


def test_fail_open_keeps_admitting_while_redis_is_down(
    daphne: LiveServer, providers: Configure
) -> None:
    from tests.redis_plugin import redis_server

    providers(
        {"name": "simulated", "options": QUICK},
        rate_limits=[limit("lenient", "global", 50, 50)],
        queue={"enabled": False},
    )
    server = redis_server()
    server.stop()
    try:
        result = stream(daphne.url, chat())
    finally:
        server.start()
    assert result.status == 200
    assert result.last()[0] == "done"
