"""The demo chat page in a real browser (Debian's chromium + chromedriver)."""

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import LiveServer
from tests.fake_openai import FakeOpenAI, text_plan

pytestmark = pytest.mark.timeout(120)

Configure = Callable[..., None]


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "make test installs chromium and chromium-driver"
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def state(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "state").text


def ended_state(driver: WebDriver) -> str | None:
    """Return the page's state once the answer has ended, else None."""
    value = driver.find_element(By.ID, "state").get_attribute("data-state")
    busy = ("idle", "connecting", "queued", "streaming")
    return None if value in busy else value


def wait_for(driver: WebDriver, check: Callable[[WebDriver], Any], timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check)


def send(driver: WebDriver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_a_message_streams_and_finishes(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    providers(
        {
            "name": "simulated",
            "options": {"ttft_ms": 100, "length": 8, "tokens_per_second": 20},
        }
    )
    browser.get(daphne.url + "/")
    send(browser, "hello browser")
    wait_for(browser, lambda d: state(d).startswith("streaming"))
    wait_for(browser, lambda d: state(d).startswith("done"))
    answers = browser.find_elements(By.CSS_SELECTOR, "#history li.assistant .text")
    assert len(answers[-1].text.split()) == 8
    assert browser.find_elements(By.CSS_SELECTOR, "#history li.user")[-1].text.endswith(
        "hello browser"
    )


def test_stop_aborts_the_stream(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    providers(
        {
            "name": "simulated",
            "options": {"ttft_ms": 0, "length": 300, "tokens_per_second": 10},
        }
    )
    browser.get(daphne.url + "/")
    send(browser, "long answer")
    wait_for(browser, lambda d: state(d).startswith("streaming"))
    browser.find_element(By.ID, "stop").click()
    wait_for(browser, lambda d: state(d) == "stopped")
    words = len(
        browser.find_elements(By.CSS_SELECTOR, "#history li.assistant .text")[
            -1
        ].text.split()
    )
    assert 0 < words < 300


def test_a_cut_off_answer_is_marked(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    providers({"name": "simulated", "options": {"ttft_ms": 0, "length": 50}})
    browser.get(daphne.url + "/")
    browser.find_element(By.ID, "max-tokens").send_keys("3")
    send(browser, "cut me")
    wait_for(browser, lambda d: state(d).startswith("cut off"))
    assert browser.find_elements(By.CSS_SELECTOR, "#history li.cut-off")


def test_c17_an_answer_cut_off_before_any_text_is_not_shown_as_done(
    daphne: LiveServer,
    providers: Configure,
    fake_openai: FakeOpenAI,
    browser: WebDriver,
) -> None:
    # The simulated provider always sends at least one token before `length`.
    fake_openai.planner = lambda body: text_plan([], finish="length")
    providers(
        {
            "name": "upstream",
            "kind": "openai",
            "options": {"base_url": fake_openai.base_url},
        }
    )
    browser.get(daphne.url + "/")
    send(browser, "think too long")
    ended = wait_for(browser, ended_state)
    assert ended == "cut_off"
    assert state(browser).startswith("cut off before any text")
    answer = browser.find_elements(By.CSS_SELECTOR, "#history li.assistant")[-1]
    assert "cut-off" in answer.get_attribute("class").split()
    assert answer.find_element(By.CSS_SELECTOR, ".text").text == ""


def test_an_error_event_is_shown(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    providers({"name": "simulated", "options": {"fault": "bad_request"}})
    browser.get(daphne.url + "/")
    send(browser, "refuse me")
    wait_for(browser, lambda d: state(d) == "error: provider_rejected")


def test_a_queued_request_shows_its_position(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    import threading

    from tests.sse_client import chat, stream

    providers(
        {
            "name": "simulated",
            "options": {"ttft_ms": 0, "length": 160, "tokens_per_second": 20},
        },
        pool={"global_max": 1, "per_user_max": 1},
        queue={"max_wait_seconds": 3},
    )
    holder = threading.Thread(target=stream, args=(daphne.url, chat("holder")))
    holder.start()
    # No workers: one request waits ahead of the page's until it times out,
    # and the page's moves up from #2 to #1.
    ahead = threading.Thread(target=stream, args=(daphne.url, chat("ahead")))
    try:
        time.sleep(0.5)
        ahead.start()
        browser.get(daphne.url + "/")
        time.sleep(1.5)  # the two time out well apart
        send(browser, "let me in")
        wait_for(browser, lambda d: state(d) == "queued #2")
        wait_for(browser, lambda d: state(d) == "queued #1")
        wait_for(browser, lambda d: state(d) == "error: queue_timeout")
    finally:
        ahead.join(30)
        holder.join(30)


def test_a_rate_limited_request_shows_a_countdown(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "length": 2}},
        rate_limits=[
            {
                "name": "browser-ip",
                "scope": "ip",
                "capacity": 1,
                "refill_per_second": 0.2,
            }
        ],
    )
    browser.get(daphne.url + "/")
    send(browser, "first")
    wait_for(browser, lambda d: state(d).startswith("done"))
    send(browser, "second")
    wait_for(browser, lambda d: state(d).startswith("rate limited — retry in"))
    first = int(state(browser).split("retry in ")[1].rstrip("s"))
    assert 1 <= first <= 5
    wait_for(browser, lambda d: f"retry in {first - 1}s" in state(d), timeout=3)


def test_a_provider_unavailable_event_is_shown_as_such(
    daphne: LiveServer, providers: Configure, browser: WebDriver
) -> None:
    # The stream was admitted, then every attempt failed before any text:
    # the `error` event form, not the 503 answer.
    providers(
        {"name": "simulated", "options": {"ttft_ms": 0, "fault": "server_error"}},
        retry={"max_attempts": 1},
    )
    browser.get(daphne.url + "/")
    send(browser, "anyone there?")
    wait_for(browser, lambda d: state(d).startswith("provider unavailable — "))
    assert ended_state(browser) == "provider_unavailable"
