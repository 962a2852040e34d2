"""`hf-vram ui` in a real browser: Debian's chromium, headless, driven by Playwright. The page picks the demo and
shows its plan, redraws the plan when the micro-batch changes, starts a small run and shows its loss curve
growing, stops it (checkpoint kept) and resumes it across a page reload, and generates from the finished output.
Screenshots of each step are written to HF_VRAM_UI_SCREENSHOTS (default: the test's temporary folder)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium)")
# A small run of the demo's base: a tokenizer trained, then 60 steps from scratch, a checkpoint every 10.
SMALL_RUN = """extends: demo-base
train:
  max_steps: 60
  logging_steps: 5
  save_steps: 10
  report_to: []
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """The app served over tmp_path by the CLI, as `make ui` serves it; its URL."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "ui.log", "wb")  # a file, not a pipe nobody reads (a full pipe would stall the server)
    proc = subprocess.Popen([sys.executable, "-m", "hf_vram", "ui", "--root", str(tmp_path), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _shots(tmp_path) -> Path:
    folder = Path(os.environ.get("HF_VRAM_UI_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _wait_for(page, elem_id: str, words: str, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = _text(page, elem_id)
        if words in text:
            return text
        page.wait_for_timeout(500)
    raise AssertionError(f"#{elem_id} never said {words!r}; it says {_text(page, elem_id)!r}")


def _picture(page, elem_id: str) -> str:
    img = page.locator(f"#{elem_id} img")
    img.wait_for()
    return img.get_attribute("src")


def test_plan_view_shows_the_demo_and_redraws_when_the_micro_batch_changes(ui, page, tmp_path):
    shots = _shots(tmp_path)
    page.goto(ui)
    _choose(page, "recipe-choice", "demo")
    page.get_by_role("tab", name="Plan").click()
    first = _picture(page, "plan-picture")
    assert "micro-batch 16" in _text(page, "plan-text")
    page.screenshot(path=str(shots / "1-plan.png"))
    page.locator("#plan-micro-batch input").fill("64")
    page.locator("#plan-micro-batch input").press("Enter")
    _wait_for(page, "plan-text", "micro-batch 64")
    assert _picture(page, "plan-picture") != first
    page.screenshot(path=str(shots / "2-plan-micro-batch-64.png"))
    # A bad value is an error in the page, as the CLI words it, and the page goes on working.
    page.locator("#plan-micro-batch input").fill("0")
    page.locator("#plan-micro-batch input").press("Enter")
    _wait_for(page, "status", "micro_batch_size")


def test_a_run_is_started_watched_stopped_resumed_and_generates(ui, page, tmp_path):
    shots = _shots(tmp_path)
    page.goto(ui)
    _choose(page, "recipe-choice", "demo-base")
    _wait_for(page, "status", "Loaded demo-base")  # the pick fills name and text: edited after it
    page.locator("#recipe-name input, #recipe-name textarea").first.fill("small")
    page.locator("#recipe-text .cm-content").fill(SMALL_RUN)
    page.get_by_role("tab", name="Runs").click()
    page.locator("#start").click()
    _wait_for(page, "status", "Started small")
    first = _picture(page, "run-loss")  # the curve appears once the first loss is logged
    page.wait_for_function(f"() => document.querySelector('#run-loss img').src !== {first!r}", timeout=120_000)
    page.screenshot(path=str(shots / "3-run-training.png"))
    page.locator("#stop").click()
    _wait_for(page, "run-state", "stopped")
    out = tmp_path / "outputs" / "small"
    assert any(out.glob("checkpoint-*")) and not (out / "train_summary.json").exists()
    page.reload()  # the run list is read from the output folders: a reloaded page finds the run again
    page.get_by_role("tab", name="Runs").click()
    _choose(page, "run-choice", "small")
    _wait_for(page, "run-state", "stopped")
    page.locator("#resume").click()
    _wait_for(page, "run-state", "running")
    assert "resident (CPU run)" in _text(page, "run-state")  # the memory the runner logs, step by step
    page.reload()  # mid-run: the page comes back to the run going on
    page.get_by_role("tab", name="Runs").click()
    _choose(page, "run-choice", "small")
    _wait_for(page, "run-state", "running")
    _wait_for(page, "run-state", "finished", timeout=600)  # a loaded 2-core machine: minutes
    page.screenshot(path=str(shots / "4-run-finished.png"))
    assert "resumed_from" in (out / "train_summary.json").read_text() and (out / "loss.png").is_file()
    page.get_by_role("tab", name="Outputs").click()
    page.locator("#output-refresh").click()
    _choose(page, "output-choice", "small")
    _wait_for(page, "output-card", "Training")
    page.locator("#generate-prompt textarea, #generate-prompt input").first.fill("2 + 3 =")
    page.locator("#generate").click()
    _wait_for(page, "status", "Generated by small")
    page.screenshot(path=str(shots / "5-output-generate.png"))
    assert page.locator("#generate-answer textarea, #generate-answer input").first.input_value().strip()
