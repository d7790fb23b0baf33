"""`rlcd-data view` in a real browser: Debian's headless Chromium, driven by Playwright, as a person uses the page.

Screenshots of each view are kept in ``test-artifacts/view/`` at the top of the checkout (docs/images/ has one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from test_view import built, start_server

from rlcd_data.quality import annotations
from rlcd_data.view.pairs import PairTable

CHROMIUM = os.environ.get("RLCD_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "view"
# As the machine's own checks start it: no sandbox (root), and none of the background connections a closed
# network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEYS = ["1", "2", "0", "ArrowLeft", "ArrowRight", "1", "1", "2", "ArrowDown", "1"]  # left right tie ...
CHOICE = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right", "0": "tie", "ArrowDown": "tie"}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (`make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_browse_filter_and_label_ten_pairs_with_the_keyboard_then_reload_and_continue(browser, tmp_path,
                                                                                      fake_generator):
    folder = built(tmp_path, fake_generator, n=24)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    process, url = start_server(folder)
    outside = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("request", lambda r: urlparse(r.url).hostname != "127.0.0.1" and outside.append(r.url))
    try:
        # Overview: the report's headline figures and plots
        page.goto(url)
        page.wait_for_selector("#report table")
        assert "lexical separability" in page.inner_text("#report")
        assert page.locator("#plots img").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        # Browse: pages, a search, a filter
        page.click("#nav-browse")
        page.wait_for_selector("#rows .row")
        assert page.inner_text("#count") == "24 matching pairs" and page.locator("#rows .row").count() == 20
        page.click("#next")
        page.wait_for_function("document.querySelector('#page').textContent.startsWith('21')")
        assert page.locator("#rows .row").count() == 4
        page.fill("#q", "topic 2")
        page.press("#q", "Enter")
        page.wait_for_function("document.querySelector('#count').textContent === '8 matching pairs'")
        page.screenshot(path=str(ARTIFACTS / "browse.png"), full_page=True)
        page.check("#flagged")
        page.click("#filters button[type=submit]")
        page.wait_for_function("document.querySelector('#count').textContent === '0 matching pairs'")

        # Spot-check: ten pairs by keyboard
        page.click("#nav-spot")
        page.fill("#annotator", "dana")
        page.fill("#size", "12")
        page.fill("#seed", "4")
        page.click("#start")
        page.wait_for_selector("#spot-item:not([hidden])")
        shown = page.inner_text("#spot-item")
        assert "Which of these assistant responses is more helpful, honest and inoffensive?" in shown
        assert "chosen" not in shown.lower() and "descriptor" not in shown.lower()
        page.screenshot(path=str(ARTIFACTS / "spot-check.png"), full_page=True)
        for n, key in enumerate(KEYS):
            page.wait_for_function(f"document.querySelector('#progress').textContent.endsWith('{n} judged')")
            page.keyboard.press(key)
        page.wait_for_function("document.querySelector('#progress').textContent.endsWith('10 judged')")

        # Reload: the page continues where it stopped
        page.reload()
        page.wait_for_selector("#spot-item:not([hidden])")
        assert page.inner_text("#progress") == "Pair 11 of 12 · 10 judged"
        page.click("#nav-overview")
        page.wait_for_selector("#agreement table")
        overview = page.inner_text("#agreement")
        page.screenshot(path=str(ARTIFACTS / "agreement.png"), full_page=True)
    finally:
        page.close()
        process.terminate()
        process.wait()
    assert not outside, f"the page asked for something outside 127.0.0.1: {outside}"

    table = PairTable(str(folder))
    sample = table.sample(12, 4)
    lines = (folder / "annotations" / "dana.jsonl").read_text().splitlines()
    saved = [json.loads(line) for line in lines]
    assert [j["row"] for j in saved] == sample[:10] and [j["choice"] for j in saved] == [CHOICE[k] for k in KEYS]
    assert all(j["seed"] == 4 and j["left"] == table.left_side(4, j["row"]) for j in saved)
    figure = annotations.human_agreement(annotations.read(folder), table.data)
    assert (figure["judgments"], figure["ties"]) == (10, 2)
    assert f"{100 * figure['agreement']:.1f}% of 8 decisive judgments" in overview
    assert ("dana" in overview) and "can't tell" in overview

