"""shared/CASES.md C14: reading the provider's Retry-After forms."""

from email.utils import formatdate

from llm.retry_after import parse_retry_after

NOW = 1_800_000_000.0


def test_c14_retry_after_ms_wins_and_is_in_milliseconds() -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "9"}
    assert parse_retry_after(headers, lambda: NOW) == 1.5


def test_c14_retry_after_in_seconds() -> None:
    assert parse_retry_after({"retry-after": "7"}, lambda: NOW) == 7


def test_c14_retry_after_as_http_date() -> None:
    date = formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, lambda: NOW) == 30


def test_c14_retry_after_date_in_the_past_means_now() -> None:
    date = formatdate(NOW - 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, lambda: NOW) == 0


def test_c14_malformed_values_give_none_for_the_caller_to_back_off() -> None:
    for bad in ("soon", "-3", "nan", "", "Mon, 99 Foo 2026"):
        assert parse_retry_after({"retry-after": bad}, lambda: NOW) is None
    assert parse_retry_after({"retry-after-ms": "x"}, lambda: NOW) is None
    assert parse_retry_after({}, lambda: NOW) is None
