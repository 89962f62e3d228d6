"""Breakers, retries and fallback end to end (C08, C12, C14, C18, C19)."""

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from resilience.circuit_breaker import CircuitBreaker
from resilience.connection_pool_manager import HASH_TAG
from resilience.redis_client import key
from tests.conftest import LiveServer, wait_until
from tests.fake_openai import FakeOpenAI, Plan, chunk, error_plan, text_plan
from tests.sse_client import chat, stream

pytestmark = pytest.mark.timeout(120)

Configure = Callable[..., None]
TRIP_FAST = {
    "failure_threshold": 3,
    "recovery_timeout_seconds": 1.5,
    "probe_timeout_seconds": 5,
    "minimum_calls": 100,
}


def upstream(fake: FakeOpenAI, name: str = "up", **options: Any) -> dict:
    return {
        "name": name,
        "kind": "openai",
        "options": {"base_url": fake.base_url, **options},
    }


def state(provider: str) -> Any:
    return CircuitBreaker(provider).state()


def test_the_breaker_opens_fails_fast_and_spares_the_provider(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: error_plan(500, "down")
    providers(
        upstream(fake_openai), retry={"max_attempts": 1}, breakers={"up": TRIP_FAST}
    )
    for _ in range(3):
        failed = stream(daphne.url, chat())
        assert failed.last()[1]["code"] == "provider_unavailable"
    assert state("up").state == "open"
    calls = len(fake_openai.requests)

    fast = stream(daphne.url, chat())
    assert fast.status == 503
    assert fast.body["error"]["code"] == "provider_unavailable"
    assert 1 <= int(fast.headers["retry-after"]) <= 2
    assert len(fake_openai.requests) == calls


def test_recovery_probes_and_closes_the_breaker(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    healthy = [False]
    fake_openai.planner = lambda body: (
        text_plan(["back"]) if healthy[0] else error_plan(503, "down")
    )
    providers(
        upstream(fake_openai), retry={"max_attempts": 1}, breakers={"up": TRIP_FAST}
    )
    for _ in range(3):
        stream(daphne.url, chat())
    assert state("up").state == "open"
    healthy[0] = True
    assert wait_until(lambda: state("up").state in ("open", "half_open"), 1)
    time.sleep(1.6)
    result = stream(daphne.url, chat())
    assert result.last()[0] == "done"
    assert result.text() == "back"
    assert state("up").state == "closed"


def test_fallback_moves_to_the_next_provider_and_start_names_it(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: error_plan(502, "bad gateway")
    providers(
        upstream(fake_openai),
        {"name": "backup", "options": {"ttft_ms": 0, "length": 3}},
        retry={"max_attempts": 2},
    )
    result = stream(daphne.url, chat())
    assert result.names()[0] == "start"
    assert result.events[0][1]["provider"] == "backup"
    assert result.last()[0] == "done"
    assert len(fake_openai.requests) == 2
    assert state("up").failures == 2


def test_fallback_follows_order_and_uses_the_fallbacks_own_model(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    providers(
        # Created first but ordered last: order, not creation, decides.
        upstream(fake_openai, "spare", model="spare-model", max_tokens=50)
        | {"order": 9},
        {"name": "broken", "order": 1, "options": {"fault": "server_error"}},
        {"name": "never", "order": 20, "options": {"ttft_ms": 0}},
        retry={"max_attempts": 1},
    )
    result = stream(daphne.url, chat(model="client-model", max_tokens=100))
    assert result.events[0][1]["provider"] == "spare"
    assert result.events[0][1]["model"] == "spare-model"
    assert result.last()[0] == "done"
    # The model the client named belongs to the provider it asked for.
    assert fake_openai.requests[0]["model"] == "spare-model"
    assert fake_openai.requests[0]["max_tokens"] == 50


def test_c19_both_providers_failing_both_breakers_record_it(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: error_plan(500, "down")
    providers(
        upstream(fake_openai, "first"),
        {"name": "second", "options": {"fault": "server_error"}},
        retry={"max_attempts": 1},
        breakers={"first": TRIP_FAST, "second": TRIP_FAST},
    )
    for _ in range(3):
        failed = stream(daphne.url, chat())
        assert failed.last()[1]["code"] == "provider_unavailable"
        assert "first" in failed.last()[1]["message"]
        assert "second" in failed.last()[1]["message"]
    assert state("first").state == "open"
    assert state("second").state == "open"


def test_c08_client_errors_neither_trip_the_breaker_nor_get_retried(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    bad = [True]
    fake_openai.planner = lambda body: (
        error_plan(400, "context too long") if bad[0] else text_plan(["fine"])
    )
    providers(upstream(fake_openai), breakers={"up": TRIP_FAST})
    for _ in range(20):
        refused = stream(daphne.url, chat())
        assert refused.last()[1]["code"] == "provider_rejected"
    assert len(fake_openai.requests) == 20
    assert state("up").state == "closed"
    bad[0] = False
    assert stream(daphne.url, chat()).last()[0] == "done"


def test_c12_no_retry_after_the_first_token_and_the_breaker_counts_it(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    error = b'data: {"error": {"message": "overloaded"}}\n\n'
    fake_openai.planner = lambda body: Plan(pieces=[chunk("once"), error])
    providers(
        upstream(fake_openai), retry={"max_attempts": 3}, breakers={"up": TRIP_FAST}
    )
    result = stream(daphne.url, chat())
    assert result.text() == "once"
    assert result.names().count("start") == 1
    assert result.last()[1]["code"] == "upstream_error"
    assert len(fake_openai.requests) == 1
    assert state("up").failures == 1


def test_c14_a_wait_longer_than_the_budget_is_not_slept_on(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    fake_openai.planner = lambda body: error_plan(429, "slow down", retry_after="60")
    providers(upstream(fake_openai), retry={"max_attempts": 3, "max_total_seconds": 5})
    started = time.monotonic()
    result = stream(daphne.url, chat())
    assert time.monotonic() - started < 3
    assert result.last()[1]["code"] == "provider_unavailable"
    assert result.last()[1]["retry_after"] == 60
    assert len(fake_openai.requests) == 1


def test_c14_a_short_retry_after_is_honoured(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI
) -> None:
    calls: list[float] = []

    def plan(body: Any) -> Plan:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return error_plan(503, "busy", retry_after_ms="700")
        return text_plan(["ok"])

    fake_openai.planner = plan
    providers(upstream(fake_openai), retry={"max_attempts": 3})
    result = stream(daphne.url, chat())
    assert result.last()[0] == "done"
    assert 0.6 <= calls[1] - calls[0] < 2.0


def test_c18_leaving_during_a_backoff_stops_the_retries(
    daphne: LiveServer, providers: Configure, fake_openai: FakeOpenAI, redis: Any
) -> None:
    fake_openai.planner = lambda body: error_plan(503, "busy", retry_after="2")
    providers(
        upstream(fake_openai),
        retry={
            "max_attempts": 4,
            "max_total_seconds": 30,
            "base_delay_seconds": 1,
            "max_delay_seconds": 4,
        },
        breakers={"up": {"failure_threshold": 10}},
    )
    import httpx

    def leave_during_second_backoff() -> None:
        with httpx.stream(
            "POST", daphne.url + "/api/v1/chat/stream", json=chat(), timeout=30
        ) as response:
            for _ in response.iter_raw():
                if len(fake_openai.requests) >= 2:
                    break

    thread = threading.Thread(target=leave_during_second_backoff)
    thread.start()
    thread.join(20)
    left_at = time.monotonic()
    assert wait_until(lambda: redis.zcard(key(HASH_TAG, "global")) == 0, 1.0)
    time.sleep(2.5)
    assert len(fake_openai.requests) == 2
    assert time.monotonic() - left_at < 5
    assert state("up").failures == 2


def test_admin_force_open_and_reset_reach_the_stream_path(
    daphne: LiveServer, providers: Configure
) -> None:
    from resilience.models import BreakerPolicy

    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 2}})
    staff = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    admin = Client()
    admin.force_login(staff)
    row = BreakerPolicy.objects.get(provider__name="simulated")
    url = "/admin/resilience/breakerpolicy/"
    admin.post(url, {"action": "force_open", "_selected_action": [row.pk]})
    assert state("simulated").state == "forced_open"
    time.sleep(0.6)
    refused = stream(daphne.url, chat())
    assert refused.status == 503 or refused.last()[1]["code"] == "provider_unavailable"
    admin.post(url, {"action": "reset", "_selected_action": [row.pk]})
    time.sleep(0.6)
    assert stream(daphne.url, chat()).last()[0] == "done"
    listing = admin.get(url).content.decode()
    assert "closed" in listing


def test_a_breaker_opened_elsewhere_refuses_at_admission_with_a_503(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "length": 2}},
        breakers={"simulated": {"recovery_timeout_seconds": 45}},
    )
    assert stream(daphne.url, chat()).last()[0] == "done"
    # Opened by an operator in another process: this instance has not seen it.
    CircuitBreaker("simulated").force_open()
    time.sleep(0.6)  # let the instance's 0.5 s cached "closed" verdict lapse
    refused = stream(daphne.url, chat())
    assert refused.status == 503
    assert refused.body["error"]["code"] == "provider_unavailable"
    # Forced open has no probe time: one recovery period, not "every second".
    assert refused.headers["retry-after"] == "45"
    CircuitBreaker("simulated").reset()
    time.sleep(0.6)
    assert stream(daphne.url, chat()).last()[0] == "done"
