"""`manage.py policies export/import`: lossless, atomic, explicit."""

import io
import json
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from llm.models import Provider
from resilience.models import BreakerPolicy, PoolPolicy, RateLimitPolicy
from resilience.policy_io import PolicyImportError, import_policies

pytestmark = pytest.mark.django_db


def run_import(data: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(data)))
    out = io.StringIO()
    call_command("policies", "import", "-", stdout=out)
    return out.getvalue()


def export_json() -> dict[str, Any]:
    out = io.StringIO()
    call_command("policies", "export", stdout=out)
    return json.loads(out.getvalue())


def test_export_has_every_section_with_the_defaults() -> None:
    data = export_json()
    assert set(data) == {
        "rate_limits",
        "providers",
        "pool",
        "queue",
        "breakers",
        "retry",
    }
    assert {r["name"] for r in data["rate_limits"]} == {"global", "per-ip", "per-user"}
    assert data["providers"][0]["name"] == "simulated"
    assert set(data["rate_limits"][0]) == {
        "name",
        "scope",
        "capacity",
        "refill_per_second",
        "enabled",
        "on_redis_down",
    }
    assert set(data["providers"][0]) == {"name", "kind", "order", "enabled", "options"}
    # The issues' exact shapes of the other sections.
    assert set(data["pool"]) == {"global_max", "per_user_max", "lease_ttl_seconds"}
    assert set(data["queue"]) == {
        "enabled",
        "max_depth",
        "per_user_max",
        "max_wait_seconds",
        "job_timeout_seconds",
    }
    assert set(data["breakers"][0]) == {
        "provider",
        "failure_threshold",
        "failure_rate_percent",
        "window_seconds",
        "minimum_calls",
        "recovery_timeout_seconds",
        "half_open_probes",
        "probe_timeout_seconds",
    }
    assert set(data["retry"]) == {
        "max_attempts",
        "base_delay_seconds",
        "max_delay_seconds",
        "max_total_seconds",
    }


def test_export_then_import_round_trips_losslessly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    edited = export_json()
    edited["rate_limits"] = [
        {
            "name": "burst",
            "scope": "user",
            "capacity": 5,
            "refill_per_second": 0.25,
            "enabled": False,
            "on_redis_down": "fail_closed",
        }
    ]
    edited["providers"].append(
        {
            "name": "local",
            "kind": "openai",
            "order": 3,
            "enabled": True,
            "options": {"base_url": "http://127.0.0.1:9/v1"},
        }
    )
    edited["pool"] = {"global_max": 7, "per_user_max": 2, "lease_ttl_seconds": 12.5}
    edited["breakers"].append(
        {**edited["breakers"][0], "provider": "local", "half_open_probes": 3}
    )
    edited["queue"] = {
        "enabled": False,
        "max_depth": 17,
        "per_user_max": 3,
        "max_wait_seconds": 45.5,
        "job_timeout_seconds": 240.0,
    }
    edited["retry"] = {
        "max_attempts": 5,
        "base_delay_seconds": 0.25,
        "max_delay_seconds": 4.0,
        "max_total_seconds": 12.0,
    }
    assert edited["queue"] != export_json()["queue"]
    assert edited["retry"] != export_json()["retry"]
    run_import(edited, monkeypatch)
    assert canonical(export_json()) == canonical(edited)


def canonical(data: dict[str, Any]) -> dict[str, Any]:
    keys = {"rate_limits": "name", "providers": "name", "breakers": "provider"}
    return {
        name: sorted(value, key=lambda row: row[keys[name]]) if name in keys else value
        for name, value in data.items()
    }


def test_sections_absent_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    before = export_json()
    run_import(
        {"pool": {"global_max": 9, "per_user_max": 1, "lease_ttl_seconds": 5}},
        monkeypatch,
    )
    after = export_json()
    assert after["pool"]["global_max"] == 9
    assert {k: v for k, v in after.items() if k != "pool"} == {
        k: v for k, v in before.items() if k != "pool"
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pools": {}}, "pools: unknown section"),
        ({"pool": {"global_max": 0}}, "pool.global_max"),
        ({"pool": {"global_max": 5, "per_user_max": 9}}, "pool.per_user_max"),
        ({"pool": {"size": 3}}, "pool.size: unknown key"),
        (
            {
                "rate_limits": [
                    {
                        "name": "x",
                        "scope": "planet",
                        "capacity": 1,
                        "refill_per_second": 1,
                    }
                ]
            },
            "rate_limits[0].scope",
        ),
        (
            {
                "rate_limits": [
                    {"name": "x", "scope": "ip", "capacity": 1, "refill_per_second": 0}
                ]
            },
            "rate_limits[0].refill_per_second",
        ),
        ({"rate_limits": [{"name": "x", "scope": "ip"}]}, "rate_limits[0].capacity"),
        ({"rate_limits": "all"}, "rate_limits: must be a list"),
        (
            {
                "providers": [
                    {"name": "p", "kind": "simulated", "options": {"fault": "melt"}}
                ]
            },
            "providers[0].options",
        ),
        ({"providers": [{"name": "p", "kind": "alien"}]}, "providers[0].kind"),
        ({"breakers": [{"provider": "ghost"}]}, "breakers[0].provider"),
        (
            {"breakers": [{"provider": "simulated", "half_open_probes": 0}]},
            "breakers[0].half_open_probes",
        ),
        ({"queue": {"max_depth": 2, "per_user_max": 5}}, "queue.per_user_max"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ([1, 2], "JSON object"),
    ],
)
def test_a_bad_file_names_the_field_and_changes_nothing(
    data: Any, message: str
) -> None:
    before = export_json()
    with pytest.raises(PolicyImportError, match=message.replace("[", r"\[")):
        import_policies(
            {"pool": {"global_max": 99, "per_user_max": 1}, **data}
            if isinstance(data, dict)
            else data
        )
    assert export_json() == before


def test_the_command_reports_a_bad_file_without_changing_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = export_json()
    with pytest.raises(CommandError, match="nothing imported: rate_limits"):
        run_import(
            {
                "pool": {"global_max": 3, "per_user_max": 1},
                "rate_limits": [
                    {"name": "a", "scope": "ip", "capacity": -1, "refill_per_second": 1}
                ],
            },
            monkeypatch,
        )
    assert export_json() == before
    assert PoolPolicy.current().global_max != 3


def test_importing_providers_keeps_breakers_of_kept_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    BreakerPolicy.objects.filter(provider__name="simulated").update(failure_threshold=2)
    run_import(
        {
            "providers": [
                {"name": "simulated", "kind": "simulated", "options": {"ttft_ms": 0}}
            ]
        },
        monkeypatch,
    )
    assert BreakerPolicy.objects.get(provider__name="simulated").failure_threshold == 2
    assert Provider.objects.get().options == {"ttft_ms": 0}


def test_rate_limits_are_replaced_wholesale(monkeypatch: pytest.MonkeyPatch) -> None:
    run_import(
        {
            "rate_limits": [
                {
                    "name": "only",
                    "scope": "global",
                    "capacity": 3,
                    "refill_per_second": 1,
                }
            ]
        },
        monkeypatch,
    )
    assert list(RateLimitPolicy.objects.values_list("name", flat=True)) == ["only"]


def test_new_providers_get_a_default_breaker() -> None:
    provider = Provider.objects.create(name="fresh", kind="simulated")
    assert BreakerPolicy.objects.get(provider=provider).failure_threshold == 5


def test_a_singleton_section_is_replaced_wholesale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    PoolPolicy(global_max=80, per_user_max=7, lease_ttl_seconds=12).save()
    run_import({"pool": {"global_max": 9}}, monkeypatch)
    pool = PoolPolicy.current()
    assert (pool.global_max, pool.per_user_max, pool.lease_ttl_seconds) == (9, 4, 30)


def test_a_provider_left_out_of_breakers_keeps_a_default_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Provider.objects.create(name="other", kind="simulated")
    BreakerPolicy.objects.filter(provider__name="other").update(failure_threshold=9)
    run_import({"breakers": [{"provider": "simulated"}]}, monkeypatch)
    assert BreakerPolicy.objects.get(provider__name="other").failure_threshold == 5
    assert BreakerPolicy.objects.count() == 2
