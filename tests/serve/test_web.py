"""The web page in a real headless Chromium (Playwright + Debian's chromium package)."""

import json
import os
import time

import pytest

from tests.serve.conftest import wait_until

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Playwright's bound on each launch / wait (ms); only a hang reaches it, so it is minutes
#: (the default 30 s is too short for a machine whose cores other jobs share).
WAIT_MS = 300_000


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it "
                    "(or run: apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=WAIT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


def set_slider(page, sel, value):
    page.eval_on_selector(sel, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')) }",
                          str(value))


def test_type_generate_watch_it_stream_then_stop(fake_server, page):
    srv, sched, _ = fake_server(max_slots=2, step_delay=0.1, steps_per_dispatch=1)
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data) if r.method == "POST" else None)
    page.goto(srv.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('fake')")
    page.fill("#prompt", "abc")
    set_slider(page, "#max_tokens", 240)
    set_slider(page, "#temperature", 0.3)
    set_slider(page, "#top_p", 0.8)
    assert page.text_content("#max_tokens_v") == "240"
    page.click("#generate")

    out = page.locator("#generated")
    page.wait_for_function("document.getElementById('generated').textContent.length >= 3")
    first = out.text_content()
    page.wait_for_function(f"document.getElementById('generated').textContent.length >= "
                           f"{len(first) + 3}")
    second = out.text_content()
    assert second.startswith(first) and "defghijklmnop".startswith(second[:13])
    assert page.is_disabled("#generate") and page.is_enabled("#stop")

    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    wait_until(lambda: sched.stats()["active"] == 0)  # the server cancelled it
    assert sched.metrics.registry.get_sample_value("optkit_sequences_finished_total",
                                                   {"reason": "cancelled"}) == 1
    stopped = out.text_content()
    time.sleep(0.2)
    assert out.text_content() == stopped and 3 <= len(stopped) < 240
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    assert page.locator("#output .prompt").text_content() == "abc"

    sent = json.loads(bodies[0])
    assert (sent["prompt"], sent["max_tokens"], sent["temperature"], sent["top_p"],
            sent["stream"]) == ("abc", 240, 0.3, 0.8, True)


def test_examples_full_run_and_visible_errors(fake_server, page):
    srv, sched, _ = fake_server()
    page.goto(srv.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('fake')")
    page.click("#examples button >> nth=1")
    assert page.input_value("#prompt") == "The best way to serve a language model is"
    page.fill("#prompt", "XY")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    assert page.text_content("#generated") == "Z"
    assert "stop" in page.text_content("#status")
    assert not page.is_visible("#error")

    page.fill("#prompt", "")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert "empty" in page.text_content("#error")
    assert page.text_content("#status") == "failed"
    page.fill("#prompt", "a" * 300)  # longer than the context
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('300 tokens')")


def test_page_asks_for_a_key_when_the_server_needs_one(fake_server, page):
    srv, *_ = fake_server(api_keys={"sesame": 1})
    page.goto(srv.url + "/")
    page.wait_for_selector("#key-row", state="visible")
    page.fill("#prompt", "ab")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    page.fill("#key", "sesame")
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('model').textContent.includes('fake')")
    set_slider(page, "#max_tokens", 3)
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    assert page.text_content("#generated") == "cde"
    assert not page.is_visible("#error")
