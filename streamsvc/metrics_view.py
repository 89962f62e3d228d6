"""``GET /metrics``: Prometheus text format, for Prometheus and nobody else.

Prometheus has no Django session, so access is a bearer token
(``METRICS_TOKEN``) or the client's address being in
``METRICS_ALLOWED_NETWORKS`` (loopback by default).
"""

import hmac
import ipaddress
import logging
import os
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from resilience import metrics as _registered  # noqa: F401  (defines the metrics)
from resilience import redis_client, status
from resilience.connection_pool_manager import global_in_use
from resilience.errors import ResilienceError
from resilience.queue_request_handler import QUEUE_NAME, waiting_key

from .identity import client_ip
from .views import page_limited

logger = logging.getLogger(__name__)


class ClusterCollector(Collector):
    """Levels shared by the whole fleet, read from Redis at scrape time."""

    def collect(self) -> Iterator[Metric]:
        # Gathered first, so an outage costs these levels, never the scrape
        # (the per-process counters still go out).
        try:
            families = self._levels()
        except (RedisError, OSError, ResilienceError, DatabaseError) as exc:
            logger.warning("metrics: fleet levels unavailable (%s)", exc)
            yield GaugeMetricFamily("streamsvc_redis_up", "Redis answered.", value=0)
            return
        yield GaugeMetricFamily("streamsvc_redis_up", "Redis answered.", value=1)
        yield from families

    def _levels(self) -> list[Metric]:
        client: Any = redis_client.sync_client()
        waiting = int(client.zcard(waiting_key()))
        queued_jobs = int(client.llen(f"rq:queue:{QUEUE_NAME}"))
        return [
            GaugeMetricFamily(
                "streamsvc_queue_depth", "Requests waiting in the queue.", value=waiting
            ),
            GaugeMetricFamily(
                "streamsvc_queue_jobs", "RQ jobs in the streams queue.",
                value=queued_jobs,
            ),
            GaugeMetricFamily(
                "streamsvc_pool_in_use",
                "Direct streams holding a pool lease, fleet-wide.",
                value=global_in_use(client),
            ),
            _breaker_states(),
        ]  # fmt: skip


BREAKER_LEVELS = {
    "closed": 0, "forced_closed": 0, "half_open": 1, "open": 2, "forced_open": 2,
}  # fmt: skip


def _breaker_states() -> Metric:
    family = GaugeMetricFamily(
        "streamsvc_breaker_state",
        "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
        labels=["provider"],
    )
    for entry in status.breaker_status():
        family.add_metric([entry["provider"]], BREAKER_LEVELS.get(entry["state"], 2))
    return family


class _Fixed(Collector):
    """A collector of metrics computed before the scrape is rendered."""

    def __init__(self, *families: Metric) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def local_ratio(registry: CollectorRegistry) -> Metric:
    """Return the share of rate-limit decisions made without Redis, so far.

    Derived at scrape time from the decision counter (summed over processes
    in multiprocess mode); ``rate(...)`` over the counter gives it per window.
    """
    local = total = 0.0
    for family in registry.collect():
        if family.name != "streamsvc_rate_limit_decisions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
                local += sample.value if sample.labels["where"] == "local" else 0
    return GaugeMetricFamily(
        "streamsvc_rate_limit_local_ratio",
        "Share of rate-limit decisions made from the local lease cache.",
        value=local / total if total else 0.0,
    )


def _allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if token and hmac.compare_digest(header, f"Bearer {token}"):
        return True
    address = client_ip(
        request.META.get("REMOTE_ADDR", ""),
        request.META.get("HTTP_X_FORWARDED_FOR", ""),
        settings.TRUSTED_PROXIES,
    )
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.METRICS_ALLOWED_NETWORKS)


@page_limited
def metrics(request: HttpRequest) -> HttpResponse:
    """Serve every metric, summed over processes when multiprocess is on."""
    if not _allowed(request):
        return JsonResponse(
            {"error": {"code": "forbidden", "message": "metrics need the token or "
                       "an allowed network", "retry_after": None}},
            status=403,
        )  # fmt: skip
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    cluster = CollectorRegistry()
    cluster.register(ClusterCollector())
    ratio = local_ratio(registry)
    cluster.register(_Fixed(ratio))
    body = generate_latest(registry) + generate_latest(cluster)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
