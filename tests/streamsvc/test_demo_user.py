"""`manage.py ensure_demo_user`: the staff user `make run` creates for the demo."""

import io
import re

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db

SHOWN_ONCE = re.compile(r"^password \(shown once\): (\S+)$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _no_demo_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEMO_USERNAME", raising=False)
    monkeypatch.delenv("DEMO_PASSWORD", raising=False)


def ensure_demo_user() -> str:
    out = io.StringIO()
    call_command("ensure_demo_user", stdout=out)
    return out.getvalue()


def test_first_run_creates_a_staff_user_and_prints_a_password_that_works() -> None:
    output = ensure_demo_user()

    assert "created demo staff user: demo" in output
    passwords = SHOWN_ONCE.findall(output)
    assert len(passwords) == 1
    user = get_user_model().objects.get(username="demo")
    assert user.is_staff and user.is_active
    assert authenticate(username="demo", password=passwords[0]) == user


def test_each_new_demo_user_gets_its_own_generated_password() -> None:
    first = SHOWN_ONCE.findall(ensure_demo_user())
    get_user_model().objects.all().delete()
    second = SHOWN_ONCE.findall(ensure_demo_user())
    assert len(first[0]) >= 16
    assert first != second


def test_a_second_run_prints_no_password_and_keeps_the_first() -> None:
    (password,) = SHOWN_ONCE.findall(ensure_demo_user())
    stored = get_user_model().objects.get(username="demo").password

    again = ensure_demo_user()

    assert "password unchanged" in again
    assert not SHOWN_ONCE.search(again)
    assert password not in again
    assert get_user_model().objects.get(username="demo").password == stored
    assert authenticate(username="demo", password=password) is not None
    assert get_user_model().objects.filter(username="demo").count() == 1


def test_demo_username_and_password_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEMO_USERNAME", "ops-demo")
    monkeypatch.setenv("DEMO_PASSWORD", "chosen-by-the-operator-41")

    output = ensure_demo_user()

    assert "created demo staff user: ops-demo" in output
    assert "chosen-by-the-operator-41" not in output
    assert not SHOWN_ONCE.search(output)
    user = authenticate(username="ops-demo", password="chosen-by-the-operator-41")
    assert user is not None and user.is_staff
    assert not get_user_model().objects.filter(username="demo").exists()


def test_a_second_run_with_demo_password_does_not_print_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEMO_PASSWORD", "chosen-by-the-operator-41")
    ensure_demo_user()

    again = ensure_demo_user()

    assert "chosen-by-the-operator-41" not in again
    assert not SHOWN_ONCE.search(again)
    assert authenticate(username="demo", password="chosen-by-the-operator-41")
