"""Read a provider's "come back later" hint from its response headers."""

import math
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime


def parse_retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time
) -> float | None:
    """Return the wait in seconds a provider asked for, or None.

    ``retry-after-ms`` (OpenAI, Azure) wins over ``Retry-After``, which may
    be delta-seconds or an HTTP-date (RFC 9110, section 10.2.3). A malformed
    or negative value gives None, so the caller falls back to its own
    backoff (shared/CASES.md C14).
    """
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _number(raw)
    if seconds is not None:
        return seconds
    return _http_date_delay(raw, now())


def _number(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    if math.isnan(value) or math.isinf(value) or value < 0:
        return None
    return value


def _http_date_delay(raw: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
