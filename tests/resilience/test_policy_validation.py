"""Policies are checked against each other, in the admin and on import alike."""

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from llm.models import Provider
from resilience.models import (
    BreakerPolicy,
    PoolPolicy,
    QueuePolicy,
    RateLimitPolicy,
    RetryPolicy,
)
from resilience.policy_io import PolicyImportError, import_policies

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client() -> Client:
    staff = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    client = Client()
    client.force_login(staff)
    return client


def post_rate_limit(client: Client, row: RateLimitPolicy, **changes: Any) -> Any:
    data = {
        "name": row.name,
        "scope": row.scope,
        "capacity": row.capacity,
        "refill_per_second": row.refill_per_second,
        "on_redis_down": row.on_redis_down,
        **changes,
    }
    if row.enabled:
        data["enabled"] = "on"
    url = f"/admin/resilience/ratelimitpolicy/{row.pk}/change/"
    return client.post(url, data)


def test_the_admin_refuses_a_per_caller_bucket_above_the_global_one(
    admin_client: Client,
) -> None:
    per_user = RateLimitPolicy.objects.get(name="per-user")
    response = post_rate_limit(admin_client, per_user, capacity=500)
    assert response.status_code == 200
    assert "cannot be above the global bucket" in response.content.decode()
    assert RateLimitPolicy.objects.get(name="per-user").capacity == 60


def test_the_admin_refuses_a_global_bucket_below_a_per_caller_one(
    admin_client: Client,
) -> None:
    fleet = RateLimitPolicy.objects.get(name="global")
    response = post_rate_limit(admin_client, fleet, refill_per_second=0.5)
    assert response.status_code == 200
    assert "cannot be below the per-caller bucket" in response.content.decode()
    assert RateLimitPolicy.objects.get(name="global").refill_per_second == 50


def test_a_disabled_global_bucket_bounds_nothing(admin_client: Client) -> None:
    RateLimitPolicy.objects.filter(name="global").update(enabled=False)
    per_user = RateLimitPolicy.objects.get(name="per-user")
    response = post_rate_limit(admin_client, per_user, capacity=500)
    assert response.status_code == 302
    assert RateLimitPolicy.objects.get(name="per-user").capacity == 500


def test_a_valid_change_saves(admin_client: Client) -> None:
    per_user = RateLimitPolicy.objects.get(name="per-user")
    assert post_rate_limit(admin_client, per_user, capacity=100).status_code == 302
    assert RateLimitPolicy.objects.get(name="per-user").capacity == 100


@pytest.mark.parametrize(
    ("url", "data", "message"),
    [
        (
            "/admin/resilience/retrypolicy/1/change/",
            {"max_attempts": 3, "base_delay_seconds": 1, "max_delay_seconds": 8,
             "max_total_seconds": 900},
            "must be below the queue&#x27;s job timeout",
        ),
        (
            "/admin/resilience/queuepolicy/1/change/",
            {"enabled": "on", "max_depth": 10, "per_user_max": 2,
             "max_wait_seconds": 60, "job_timeout_seconds": 5},
            "must be below the queue&#x27;s job timeout",
        ),
        (
            "/admin/resilience/poolpolicy/1/change/",
            {"global_max": 5, "per_user_max": 6, "lease_ttl_seconds": 30},
            "cannot be above the global maximum",
        ),
        (
            "/admin/resilience/poolpolicy/1/change/",
            {"global_max": 5, "per_user_max": 1, "lease_ttl_seconds": 0},
            "must be at least 1 second",
        ),
        (
            "/admin/resilience/queuepolicy/1/change/",
            {"enabled": "on", "max_depth": 3, "per_user_max": 4,
             "max_wait_seconds": 60, "job_timeout_seconds": 600},
            "cannot be above max_depth",
        ),
    ],
)  # fmt: skip
def test_the_admin_refuses_inconsistent_singletons(
    admin_client: Client, url: str, data: dict[str, Any], message: str
) -> None:
    before = [
        (model.current().__dict__ | {"_state": None})
        for model in (PoolPolicy, QueuePolicy, RetryPolicy)
    ]
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert message in response.content.decode()
    after = [
        (model.current().__dict__ | {"_state": None})
        for model in (PoolPolicy, QueuePolicy, RetryPolicy)
    ]
    assert after == before


def test_the_admin_refuses_zero_probes(admin_client: Client) -> None:
    row = BreakerPolicy.objects.get(provider__name="simulated")
    data = {
        "provider": Provider.objects.get(name="simulated").pk,
        "failure_threshold": 5,
        "failure_rate_percent": 50,
        "window_seconds": 30,
        "minimum_calls": 10,
        "recovery_timeout_seconds": 30,
        "half_open_probes": 0,
        "probe_timeout_seconds": 30,
    }
    url = f"/admin/resilience/breakerpolicy/{row.pk}/change/"
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert "greater than or equal to 1" in response.content.decode()
    assert BreakerPolicy.objects.get(pk=row.pk).half_open_probes == 1


def limit(name: str, scope: str, capacity: int, rate: float) -> dict[str, Any]:
    return {"name": name, "scope": scope, "capacity": capacity,
            "refill_per_second": rate}  # fmt: skip


def test_import_refuses_a_per_caller_bucket_above_the_global_one() -> None:
    data = {
        "rate_limits": [
            limit("all", "global", 10, 5),
            limit("each", "api_key", 20, 1),
        ]
    }
    with pytest.raises(PolicyImportError, match=r"rate_limits\[1\].capacity"):
        import_policies(data)
    assert RateLimitPolicy.objects.count() == 3


def test_import_checks_buckets_as_a_set_not_against_the_rows_it_replaces() -> None:
    # The old global bucket (200) would refuse a 300-token per-user bucket;
    # the file raises the global one in the same breath.
    import_policies(
        {"rate_limits": [limit("all", "global", 400, 60), limit("u", "user", 300, 2)]}
    )
    assert set(RateLimitPolicy.objects.values_list("name", flat=True)) == {"all", "u"}


def test_import_refuses_a_retry_budget_longer_than_the_job_timeout() -> None:
    with pytest.raises(PolicyImportError, match=r"retry\.max_total_seconds"):
        import_policies({"retry": {"max_total_seconds": 600}})
    with pytest.raises(PolicyImportError, match=r"queue\.job_timeout_seconds"):
        import_policies({"queue": {"job_timeout_seconds": 20}})
    assert RetryPolicy.current().max_total_seconds == 20
    assert QueuePolicy.current().job_timeout_seconds == 600


def test_import_accepts_both_sides_moved_together() -> None:
    import_policies(
        {"retry": {"max_total_seconds": 700}, "queue": {"job_timeout_seconds": 900}}
    )
    assert RetryPolicy.current().max_total_seconds == 700


def test_a_provider_and_its_breaker_are_edited_on_one_page(
    admin_client: Client,
) -> None:
    added = admin_client.post(
        "/admin/llm/provider/add/",
        {"name": "spare", "kind": "simulated", "order": 5, "enabled": "on",
         "options": "{}"},
    )  # fmt: skip
    assert added.status_code == 302
    provider = Provider.objects.get(name="spare")
    breaker = BreakerPolicy.objects.get(provider=provider)
    page = admin_client.get(f"/admin/llm/provider/{provider.pk}/change/")
    assert b"How to recover" in page.content
    prefix = "breaker"
    changed = admin_client.post(
        f"/admin/llm/provider/{provider.pk}/change/",
        {
            "name": "spare", "kind": "simulated", "order": 5, "enabled": "on",
            "options": "{}",
            f"{prefix}-TOTAL_FORMS": 1, f"{prefix}-INITIAL_FORMS": 1,
            f"{prefix}-MIN_NUM_FORMS": 0, f"{prefix}-MAX_NUM_FORMS": 1,
            f"{prefix}-0-id": breaker.pk, f"{prefix}-0-provider": provider.pk,
            f"{prefix}-0-failure_threshold": 2,
            f"{prefix}-0-failure_rate_percent": 50,
            f"{prefix}-0-window_seconds": 30, f"{prefix}-0-minimum_calls": 10,
            f"{prefix}-0-recovery_timeout_seconds": 30,
            f"{prefix}-0-half_open_probes": 1,
            f"{prefix}-0-probe_timeout_seconds": 30,
        },
    )  # fmt: skip
    assert changed.status_code == 302, changed.content.decode()[-2000:]
    assert BreakerPolicy.objects.get(provider=provider).failure_threshold == 2


@pytest.mark.parametrize("blank", ["capacity", "refill_per_second"])
def test_a_blank_number_on_the_add_page_is_a_form_error_not_a_500(
    admin_client: Client, blank: str
) -> None:
    data = {
        "name": "new",
        "scope": "user",
        "capacity": 5,
        "refill_per_second": 1,
        "on_redis_down": "fail_open",
        "enabled": "on",
    }
    data[blank] = ""
    response = admin_client.post("/admin/resilience/ratelimitpolicy/add/", data)
    assert response.status_code == 200
    assert "This field is required" in response.content.decode()


def test_an_old_conflict_between_other_rows_does_not_hide_this_ones(
    admin_client: Client,
) -> None:
    # per-ip (30) above a lowered global (20) is already inconsistent...
    RateLimitPolicy.objects.filter(name="global").update(capacity=20)
    per_user = RateLimitPolicy.objects.get(name="per-user")
    # ...and raising per-user above the global bucket must still be refused.
    response = post_rate_limit(admin_client, per_user, capacity=25)
    assert "cannot be above the global bucket" in response.content.decode()


def post_changelist(client: Client, changes: dict[str, dict[str, Any]]) -> Any:
    """Submit the rate-limit list page with some rows edited in place."""
    rows = list(RateLimitPolicy.objects.order_by("pk"))
    data: dict[str, Any] = {
        "form-TOTAL_FORMS": len(rows),
        "form-INITIAL_FORMS": len(rows),
        "_save": "Save",
    }
    for index, row in enumerate(rows):
        fields = {
            "id": row.pk,
            "capacity": row.capacity,
            "refill_per_second": row.refill_per_second,
            "on_redis_down": row.on_redis_down,
            **changes.get(row.name, {}),
        }
        if row.enabled:
            fields["enabled"] = "on"
        data.update({f"form-{index}-{name}": v for name, v in fields.items()})
    return client.post("/admin/resilience/ratelimitpolicy/", data)


def test_the_list_page_checks_its_edits_against_each_other(
    admin_client: Client,
) -> None:
    # Each edit alone is fine against the saved rows (60 <= 100 <= 200);
    # together the per-user bucket (100) ends above the global one (70).
    response = post_changelist(
        admin_client, {"global": {"capacity": 70}, "per-user": {"capacity": 100}}
    )
    assert response.status_code == 200
    assert "cannot be" in response.content.decode()
    assert RateLimitPolicy.objects.get(name="global").capacity == 200
    assert RateLimitPolicy.objects.get(name="per-user").capacity == 60


def test_the_list_page_saves_edits_that_agree(admin_client: Client) -> None:
    response = post_changelist(
        admin_client, {"global": {"capacity": 150}, "per-user": {"capacity": 100}}
    )
    assert response.status_code == 302
    assert RateLimitPolicy.objects.get(name="global").capacity == 150
    assert RateLimitPolicy.objects.get(name="per-user").capacity == 100


def test_the_list_page_saves_a_raise_of_both_buckets_together(
    admin_client: Client,
) -> None:
    # Per-user 250 is above the saved global 200, but not above the global
    # 300 saved with it.
    response = post_changelist(
        admin_client, {"global": {"capacity": 300}, "per-user": {"capacity": 250}}
    )
    assert response.status_code == 302
    assert RateLimitPolicy.objects.get(name="global").capacity == 300
    assert RateLimitPolicy.objects.get(name="per-user").capacity == 250
