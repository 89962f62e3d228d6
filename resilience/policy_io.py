"""Export every policy as JSON, and import such a file atomically.

Each top-level section present in an import replaces that section
wholesale; sections absent are left alone. The whole file is validated
(with the same model ``clean`` the admin runs) before anything is written,
so a bad file changes nothing and the error names the bad field.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction

from llm.models import Provider

from .models import (
    BreakerPolicy,
    PoolPolicy,
    QueuePolicy,
    RateLimitPolicy,
    RetryPolicy,
    bucket_conflict,
    check_retry_fits_job,
)
from .policies import bump_version


class PolicyImportError(ValueError):
    """The file is not a valid policy file; the message names the field."""


@dataclass(frozen=True)
class Section:
    model: type[models.Model]
    fields: tuple[str, ...]
    required: tuple[str, ...] = ()
    key: str | None = None  # list sections: the field that must be unique


RATE_LIMITS = Section(
    RateLimitPolicy,
    ("name", "scope", "capacity", "refill_per_second", "enabled", "on_redis_down"),
    required=("name", "scope", "capacity", "refill_per_second"),
    key="name",
)
PROVIDERS = Section(
    Provider,
    ("name", "kind", "order", "enabled", "options"),
    required=("name", "kind"),
    key="name",
)
BREAKERS = Section(
    BreakerPolicy,
    (
        "provider",
        "failure_threshold",
        "failure_rate_percent",
        "window_seconds",
        "minimum_calls",
        "recovery_timeout_seconds",
        "half_open_probes",
        "probe_timeout_seconds",
    ),
    required=("provider",),
    key="provider",
)
POOL = Section(PoolPolicy, ("global_max", "per_user_max", "lease_ttl_seconds"))
QUEUE = Section(
    QueuePolicy,
    ("enabled", "max_depth", "per_user_max", "max_wait_seconds", "job_timeout_seconds"),
)
RETRY = Section(
    RetryPolicy,
    ("max_attempts", "base_delay_seconds", "max_delay_seconds", "max_total_seconds"),
)

LISTS = {"rate_limits": RATE_LIMITS, "providers": PROVIDERS, "breakers": BREAKERS}
SINGLETONS = {"pool": POOL, "queue": QUEUE, "retry": RETRY}
SECTIONS = (*LISTS, *SINGLETONS)


def _row(obj: models.Model, section: Section) -> dict[str, Any]:
    row = {field: getattr(obj, field) for field in section.fields}
    if section is BREAKERS:
        row["provider"] = obj.provider.name  # type: ignore[attr-defined]
    return row


def export_policies() -> dict[str, Any]:
    """Return every policy as plain JSON-ready data."""
    data: dict[str, Any] = {
        "rate_limits": [_row(o, RATE_LIMITS) for o in RateLimitPolicy.objects.all()],
        "providers": [_row(o, PROVIDERS) for o in Provider.objects.all()],
        "breakers": [
            _row(o, BREAKERS)
            for o in BreakerPolicy.objects.select_related("provider").order_by(
                "provider__name"
            )
        ],
    }
    for name, section in SINGLETONS.items():
        model: Any = section.model
        data[name] = _row(model.current(), section)
    return data


def _check_keys(path: str, item: Any, section: Section) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise PolicyImportError(f"{path}: must be an object")
    unknown = sorted(set(item) - set(section.fields))
    if unknown:
        raise PolicyImportError(f"{path}.{unknown[0]}: unknown key")
    missing = [field for field in section.required if field not in item]
    if missing:
        raise PolicyImportError(f"{path}.{missing[0]}: required")
    return item


def _validate(path: str, obj: models.Model, exclude: Iterable[str] = ()) -> None:
    # Rows are checked alone here and against each other in _check_fleet:
    # the model's own clean() would compare them with the rows being replaced.
    try:
        obj.clean_fields(exclude=list(exclude))
        getattr(obj, "clean_own", obj.clean)()
    except ValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        where = f"{path}.{field}" if field != "__all__" else path
        raise PolicyImportError(f"{where}: {' '.join(messages)}") from exc


def _build_list(name: str, items: Any, section: Section) -> list[models.Model]:
    if not isinstance(items, list):
        raise PolicyImportError(f"{name}: must be a list")
    seen: set[Any] = set()
    built = []
    for index, raw in enumerate(items):
        path = f"{name}[{index}]"
        item = _check_keys(path, raw, section)
        assert section.key is not None
        if item[section.key] in seen:
            raise PolicyImportError(f"{path}.{section.key}: duplicate")
        seen.add(item[section.key])
        values = dict(item)
        if section is BREAKERS:
            values.pop("provider")
        obj = section.model(**values)
        _validate(path, obj, exclude=["provider"] if section is BREAKERS else [])
        if section is BREAKERS:
            obj._provider_name = item["provider"]  # type: ignore[attr-defined]
        built.append(obj)
    return built


def _build_singleton(name: str, item: Any, section: Section) -> models.Model:
    # Wholesale, like the list sections: keys left out take their defaults,
    # not the values in the database, so a file means the same on any install.
    item = _check_keys(name, item, section)
    obj = section.model(pk=1, **item)
    _validate(name, obj)
    return obj


def _check_breaker_providers(
    breakers: list[models.Model], providers: list[models.Model] | None
) -> None:
    if providers is not None:
        names = {p.name for p in providers}  # type: ignore[attr-defined]
    else:
        names = set(Provider.objects.values_list("name", flat=True))
    for index, breaker in enumerate(breakers):
        name = breaker._provider_name  # type: ignore[attr-defined]
        if name not in names:
            raise PolicyImportError(
                f"breakers[{index}].provider: no provider named {name!r}"
            )


def _check_fleet(
    lists: dict[str, list[models.Model]], singles: dict[str, models.Model]
) -> None:
    """Apply the cross-model rules to the policies as they would be after import."""
    if "rate_limits" in lists:
        limits: list[Any] = lists["rate_limits"]
        conflict = bucket_conflict(limits)
        if conflict is not None:
            caller, bound, field = conflict
            raise PolicyImportError(
                f"rate_limits[{limits.index(caller)}].{field}: cannot be above the "
                f"global bucket {bound.name!r} ({getattr(bound, field)})"
            )
    retry: Any = singles.get("retry") or RetryPolicy.current()
    queue: Any = singles.get("queue") or QueuePolicy.current()
    problem = check_retry_fits_job(retry, queue)
    if problem:
        where = (
            "retry.max_total_seconds"
            if "retry" in singles
            else ("queue.job_timeout_seconds")
        )
        raise PolicyImportError(f"{where}: {problem}")


def _replace_providers(new: list[Any]) -> None:
    keep = []
    for provider in new:
        values = {f: getattr(provider, f) for f in PROVIDERS.fields if f != "name"}
        Provider.objects.update_or_create(name=provider.name, defaults=values)
        keep.append(provider.name)
    Provider.objects.exclude(name__in=keep).delete()


def _replace_breakers(new: list[Any]) -> None:
    BreakerPolicy.objects.all().delete()
    for breaker in new:
        breaker.provider = Provider.objects.get(name=breaker._provider_name)
        breaker.save()
    # A provider the file leaves out runs on the defaults: give it that row,
    # so it stays in the admin where it can be forced open or closed.
    for provider in Provider.objects.filter(breaker__isnull=True):
        BreakerPolicy.objects.create(provider=provider)


def import_policies(data: Any) -> list[str]:
    """Validate ``data`` whole, then apply it in one transaction.

    Return the names of the sections replaced. Raise ``PolicyImportError``
    naming the first bad field; nothing is written then.
    """
    if not isinstance(data, dict):
        raise PolicyImportError("the file must hold a JSON object of sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise PolicyImportError(f"{unknown[0]}: unknown section")

    lists = {n: _build_list(n, data[n], s) for n, s in LISTS.items() if n in data}
    singles = {
        n: _build_singleton(n, data[n], s) for n, s in SINGLETONS.items() if n in data
    }
    if "breakers" in lists:
        _check_breaker_providers(lists["breakers"], lists.get("providers"))
    _check_fleet(lists, singles)

    with transaction.atomic():
        if "providers" in lists:
            _replace_providers(lists["providers"])
        if "rate_limits" in lists:
            RateLimitPolicy.objects.all().delete()
            limits: list[Any] = lists["rate_limits"]
            RateLimitPolicy.objects.bulk_create(limits)
        if "breakers" in lists:
            _replace_breakers(lists["breakers"])
        for obj in singles.values():
            obj.save()
        transaction.on_commit(bump_version)
    return [name for name in SECTIONS if name in data]
