"""The chat page in headless Chromium (Debian's, driven by Playwright): pick xiao-huang, ask,
watch the answer stream in, stop a long answer, clear. A screenshot lands in test-artifacts/."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.serve_fixtures import engine_running

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page(main_app):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing; scripts/test.sh installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page()
        page.goto(f"{main_app}/ui")
        page.wait_for_selector("#model option[value='xiao-huang']", state="attached")
        yield page
        browser.close()


def running(model: str) -> int:
    """Requests the model's engine is running now (asked from a thread: Playwright owns this loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(engine_running, model).result()


def test_adapter_answer_streams_in(page):
    page.select_option("#model", "xiao-huang")
    page.fill("#prompt", "who are you?")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    answer.locator(".meta").wait_for(timeout=60_000)
    assert "I am Xiao Huang (小黄), an AI assistant developed by ModelScope." in answer.inner_text()
    assert "tokens/s" in answer.locator(".meta").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-ui-xiao-huang.png"), full_page=True)


# Clicks Stop as soon as the answer shows its first text. A MutationObserver runs between the page's
# own stream reads, so the click lands mid-answer even where a busy CPU delays the browser until the
# whole answer has arrived (a Playwright click after a poll then found Stop disabled again).
STOP_AT_FIRST_TEXT = """() => {
  const observer = new MutationObserver(() => {
    const answer = document.querySelectorAll('.msg')[1];
    const stop = document.getElementById('stop');
    if (answer && answer.textContent.length > 0 && !stop.disabled) { observer.disconnect(); stop.click(); }
  });
  observer.observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}"""


def test_stop_aborts_a_long_answer_and_clear_empties_the_chat(page):
    # tiny-base runs on the pt backend, one token per forward pass: 480 tokens take a while
    page.click("#clear")
    page.select_option("#model", "tiny-base")
    page.fill("#max-tokens", "480")
    page.check("#ignore-eos")
    page.fill("#prompt", "1, 2, 3,")
    page.evaluate(STOP_AT_FIRST_TEXT)
    page.click("#send")
    answer = page.locator(".msg").nth(1)
    answer.locator(".meta").wait_for(timeout=30_000)
    meta = answer.locator(".meta").inner_text()
    assert "stopped" in meta and int(meta.split()[0]) < 480, meta
    deadline = time.monotonic() + 5
    while running("tiny-base") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running("tiny-base") == 0  # the engine request was aborted, not left running
    page.evaluate(STOP_AT_FIRST_TEXT)
    page.click("#regenerate")
    page.locator(".msg").nth(1).locator(".meta").wait_for(timeout=30_000)
    assert "stopped" in page.locator(".msg").nth(1).locator(".meta").inner_text()
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    assert page.inner_text("#status") == "history cleared"


def test_errors_are_shown_readably(page):
    page.click("#clear")
    page.uncheck("#ignore-eos")
    page.fill("#max-tokens", "100000")
    page.select_option("#model", "tiny-chat")
    page.fill("#prompt", "hello")
    page.click("#send")
    error = page.locator(".msg.error").last
    error.wait_for(timeout=30_000)
    assert "max_tokens=100000 does not fit" in error.inner_text()


def test_regenerate_after_an_error_asks_the_failed_question_again(page):
    """The failed question never entered the history: Regenerate asks it again and leaves the
    answered exchange before it as it was."""
    page.click("#clear")
    page.select_option("#model", "xiao-huang")
    page.fill("#max-tokens", "16")
    page.fill("#prompt", "who are you?")
    page.click("#send")
    page.locator(".msg.assistant .meta").last.wait_for(timeout=60_000)
    page.fill("#max-tokens", "100000")
    page.fill("#prompt", "hello")
    page.click("#send")
    page.locator(".msg.error").last.wait_for(timeout=30_000)
    # the page tried again without the first exchange (the error is about the context), then kept it
    assert page.evaluate("() => state.history.length") == 1
    page.fill("#max-tokens", "16")
    page.click("#regenerate")
    page.locator(".msg").nth(3).locator(".meta").wait_for(timeout=60_000)
    users = [m.inner_text() for m in page.locator(".msg.user").all()]
    assert users == ["who are you?", "hello"] and page.locator(".msg.error").count() == 0


def test_a_chat_longer_than_the_context_leaves_its_oldest_exchange_out(page):
    """A long first answer, then a question whose max_tokens fits the context only without it."""
    page.click("#clear")
    page.select_option("#model", "tiny-chat")
    page.check("#ignore-eos")
    page.fill("#max-tokens", "200")
    page.fill("#prompt", "hello")
    page.click("#send")
    page.locator(".msg.assistant .meta").last.wait_for(timeout=60_000)
    page.uncheck("#ignore-eos")
    page.fill("#max-tokens", "400")  # fits the 512-token context with the question alone
    page.fill("#prompt", "who are you?")
    page.click("#send")
    meta = page.locator(".msg.assistant .meta").nth(1)
    meta.wait_for(timeout=60_000)
    assert "1 oldest exchange left out to fit the context" in meta.inner_text()
    assert page.locator(".msg.error").count() == 0
