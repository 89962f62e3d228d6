"""What an operator watches in a real browser: the status page, a breaker."""

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from resilience.circuit_breaker import CircuitBreaker
from tests.conftest import LiveServer
from tests.e2e.test_browser import browser, send, state, wait_for

__all__ = ["browser"]  # the fixture, shared with the chat page tests

pytestmark = pytest.mark.timeout(120)


def login_as_staff(driver: WebDriver, url: str) -> None:
    staff = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    client = Client()
    client.force_login(staff)
    driver.get(url + "/healthz")
    driver.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value})


def test_the_status_page_shows_live_pool_and_breakers(
    browser: WebDriver, daphne: LiveServer, providers: Callable[..., None]
) -> None:
    providers({"name": "simulated"}, {"name": "backup"}, pool={"global_max": 7})
    CircuitBreaker("backup").force_open()
    login_as_staff(browser, daphne.url)
    browser.get(daphne.url + "/status/")

    def rows(driver: Any) -> list[str]:
        return [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#breakers tr")]

    # The breaker rows are drawn after every chart: a script error in the
    # charts would leave them empty.
    wait_for(browser, lambda d: any("forced_open" in r for r in rows(d)))
    assert any(r.startswith("simulated closed") for r in rows(browser))
    assert browser.find_element(By.ID, "pool").text == "0 / 7"
    assert browser.find_element(By.ID, "feed-state").text.startswith("live")
    transitions = browser.find_element(By.ID, "transitions").text
    assert "backup" in transitions


def test_the_chat_page_counts_down_to_an_open_breakers_next_probe(
    browser: WebDriver, daphne: LiveServer, providers: Callable[..., None]
) -> None:
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "fault": "server_error"}},
        retry={"max_attempts": 1},
        breakers={"simulated": {"failure_threshold": 1,
                                "recovery_timeout_seconds": 30}},
    )  # fmt: skip
    browser.get(daphne.url + "/")
    send(browser, "trip it")
    wait_for(browser, lambda d: state(d).startswith("provider unavailable — "))
    send(browser, "again")
    wait_for(browser, lambda d: "next probe in" in state(d))
    first = state(browser)
    assert "circuit open" in first
    wait_for(browser, lambda d: state(d) != first, timeout=5)
    left = [int(s.rstrip("s")) for s in (first.split()[-1], state(browser).split()[-1])]
    assert 20 <= left[1] < left[0] <= 30
