"""`GET /metrics`: Prometheus format, token or allowed networks only."""

import ipaddress
from typing import Any

import httpx
import pytest
from django.test import Client

from tests.conftest import LiveServer
from tests.sse_client import chat, stream


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


def test_the_token_opens_metrics_from_anywhere(redis: Any, settings: Any) -> None:
    settings.METRICS_TOKEN = "s3cret"
    client = Client(REMOTE_ADDR="203.0.113.5")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


def test_allowed_networks_are_configurable(redis: Any, settings: Any) -> None:
    settings.METRICS_ALLOWED_NETWORKS = (ipaddress.ip_network("10.0.0.0/8"),)
    assert Client(REMOTE_ADDR="10.2.3.4").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 403


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
