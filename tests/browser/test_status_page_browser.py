"""The status page as a person sees it: headless Chromium on a real sidecar that recovers a
hung simulated trainer.

The page is opened once, before the hang, and left open the way a user leaves a tab; the
recovery has to reach it through the live refresh, without a reload. A second browser with
JavaScript turned off then loads the page and must see the same story in the first HTML.
Screenshots (whole pages) go to the artifacts folder (see conftest); ``status-page.png`` is
the one the README shows.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sidecar_process import free_port

from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree

from .conftest import (
    BackgroundSidecar,
    OpenBrowser,
    retried_when_swapped,
    save_full_page,
)

if TYPE_CHECKING:  # Selenium itself may be missing: the tests then skip (or fail under CI)
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

pytestmark = pytest.mark.slow

HANG_STEP = 10
SAVE_EVERY_STEPS = 4
# 16 epochs of 8 steps: 128 steps. The hang at step 10 is recovered from the state of step 8,
# and the relaunch then has 120 steps x 0.25 s = 30 s to go: time to watch the step move.
SIMULATION = {
    "SIM_FAULTS": f"hang_idle@step={HANG_STEP}:once",
    "SIM_STEP_SECONDS": "0.25",
    "SIM_STEPS_PER_EPOCH": "8",
}
# The words the contract allows in a checkpoint row's verdict cell.
VERDICTS = {"complete", "still written", "mixed", "quarantined", "incomplete", "unreadable"}
STEP_TEXT = re.compile(r"(\d+) / (\d+)")
NO_RELOAD = "window.__sidecarTestNoReload"


@dataclass
class Watched:
    tree: FluxgymTree
    sidecar: BackgroundSidecar
    url: str
    page: WebDriver  # the JavaScript browser, on the page since before the hang
    stall: dict[str, Any]
    restart: dict[str, Any]
    incident: Path  # the bundle saved for the hang


@pytest.fixture(scope="module")
def watched(
    open_browser: OpenBrowser, tmp_path_factory: pytest.TempPathFactory, artifacts: Path
) -> Iterator[Watched]:
    """A sidecar through a hang and a recovery, with a page open on it since before the hang;
    stopped with SIGTERM afterwards, and nothing of its run may be left."""
    tree = build_fluxgym_tree(
        tmp_path_factory.mktemp("run") / "fluxgym",
        extra_trainer_args=f"--save_every_n_steps {SAVE_EVERY_STEPS}",
    )
    # The harness's fast settings turn the HTTP surface off (SIDECAR_HTTP_PORT=0).
    sidecar = BackgroundSidecar(
        tree, settings={"SIDECAR_HTTP_PORT": str(free_port())}, simulation=SIMULATION
    )
    try:
        port = sidecar.wait_for("http_listening")["port"]
        url = f"http://127.0.0.1:{port}/"
        page = open_browser(javascript=True)
        page.get(url)
        page.execute_script(f"{NO_RELOAD} = true")
        save_full_page(page, artifacts / "status-page-before-hang.png")
        stall = sidecar.wait_for("stall_detected", timeout=60)
        restart = sidecar.wait_for("trainer_restarted", timeout=60)
        # The relaunch's first step: until then the page rightly shows no step ("—").
        sidecar.wait_for("training_progressing", after=restart)
        incident = Path(sidecar.wait_for("incident_saved")["path"])
        yield Watched(tree, sidecar, url, page, stall, restart, incident)
        still_running = sidecar.process.poll() is None
    finally:
        code = sidecar.stop()
        left = sidecar.leftovers()
        if left:
            sidecar.kill()
    assert still_running, "the run ended before the page was checked: make it longer"
    assert code == 143, f"SIGTERM exit code {code}; stderr: {''.join(sidecar.stderr)[-2000:]}"
    assert not left, f"trainer processes outlived the sidecar: {[p.pid for p in left]}"


def test_an_open_page_follows_the_recovery_without_a_reload(
    watched: Watched, artifacts: Path
) -> None:
    page = watched.page
    wait_until(
        page,
        lambda: (
            page.find_elements("css selector", '#chart g.marker[data-kind="restart"]')
            and step_shown(page)
        ),
        "the restart marker and the relaunch's step reaching the open page",
        artifacts,
    )
    assert page.execute_script(f"return {NO_RELOAD}"), "the page was reloaded"

    # The step moves while the relaunched trainer runs, and still without a reload.
    before = step_of(page)
    updated = float(attribute(page.find_element("id", "live"), "data-updated"))
    wait_until(page, lambda: step_of(page) != before, "#step to move", artifacts)
    assert step_of(page)[0] > before[0], (before, step_of(page))
    assert float(attribute(page.find_element("id", "live"), "data-updated")) > updated
    assert page.execute_script(f"return {NO_RELOAD}"), "the page was reloaded"

    save_full_page(page, artifacts / "status-page.png")
    (artifacts / "status-page.html").write_text(page.page_source, encoding="utf-8")
    retried_when_swapped(lambda: check_recovered_page(page, watched))
    # Nothing from elsewhere (the sidecar may have no internet: no CDN), and no script errors.
    # The browser's own favicon request is no part of the page (a 404 there is harmless).
    fetched = page.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert fetched and all(url.startswith(watched.url) for url in fetched), fetched
    errors = [
        entry["message"]
        for entry in page.get_log("browser")
        if entry["level"] == "SEVERE" and "/favicon.ico" not in entry["message"]
    ]
    assert not errors, errors
    # textContent: the page's CSS shows the phase word in capitals.
    assert content(page.find_element("id", "phase")) == "running"

    # A log tail the reader opened stays open through the refreshes that follow.
    page.find_element("css selector", "#incidents details[data-key^='log-'] summary").click()
    moved_from = step_of(page)
    wait_until(page, lambda: step_of(page) != moved_from, "a refresh after the click", artifacts)
    opened = page.find_element("css selector", "#incidents details[data-key^='log-']")
    assert opened.get_attribute("open") is not None, "the refresh closed the opened log tail"
    assert page.execute_script(f"return {NO_RELOAD}"), "the page was reloaded"


def test_the_first_html_tells_the_same_story_without_javascript(
    watched: Watched, open_browser: OpenBrowser, artifacts: Path
) -> None:
    with urllib.request.urlopen(watched.url, timeout=10) as response:
        assert response.headers.get_content_type() == "text/html"
        assert 'id="live"' in response.read().decode("utf-8")

    page = open_browser(javascript=False)
    page.get(watched.url)
    save_full_page(page, artifacts / "status-page-no-javascript.png")
    check_recovered_page(page, watched)


def check_recovered_page(page: WebDriver, watched: Watched) -> None:
    """What a person checks after a recovery, the same with JavaScript on or off."""
    assert text(page, "#run-name") == watched.tree.name
    step, total = step_of(page)
    assert HANG_STEP - 2 <= step <= total, (step, total)

    for selector in ("#section", "#speed", "#eta", "#quiet"):
        assert text(page, selector), f"{selector} is empty"

    chart = page.find_element("id", "chart")
    assert chart.find_elements("css selector", "svg polyline.progress"), "no progress line"
    for kind in ("stall", "restart"):
        markers = chart.find_elements("css selector", f'g.marker[data-kind="{kind}"]')
        assert len(markers) == 1, f"{len(markers)} {kind} markers"
        titles = markers[0].find_elements("css selector", "title")
        assert titles and content(titles[0]), f"{kind}: no <title>"

    rows = page.find_elements("css selector", "#checkpoints tr[data-checkpoint]")
    assert len(rows) >= 2, "the states of steps 4 and 8 at least"
    for row in rows:
        verdict = row.find_element("css selector", "td.verdict").text.strip()
        assert verdict in VERDICTS, (row.get_attribute("data-checkpoint"), verdict)
    resumed = [row for row in rows if "resumed" in attribute(row, "class").split()]
    assert len(resumed) == 1, "exactly one row is the one train.sh resumes from"
    assert attribute(resumed[0], "data-checkpoint") == Path(watched.restart["checkpoint"]).name
    assert resumed[0].find_element("css selector", "td.verdict").text.strip() == "complete"

    diff = page.find_element("id", "train-script-diff")
    assert diff.tag_name == "pre"
    assert "--resume" in content(diff)
    assert Path(watched.restart["checkpoint"]).name in content(diff)

    incidents = page.find_elements("css selector", "#incidents article.incident")
    assert len(incidents) == 1
    diagnosis = incidents[0].find_element("css selector", ".diagnosis").text.strip()
    assert diagnosis, "the incident names no diagnosis"
    assert diagnosis == watched.stall["diagnosis"]
    # textContent: the tail may sit in a collapsed <details>, where .text reads "".
    log_tail = content(incidents[0].find_element("css selector", "pre.log-tail"))
    assert "steps:" in log_tail, "the log tail is the trainer's output"
    # Stacks when the bundle has them (py-spy may be refused ptrace on some hosts).
    stacks = incidents[0].find_elements("css selector", "pre.stacks")
    if any((watched.incident / "stacks").glob("*.txt")):
        assert stacks and "Thread" in content(stacks[0])
    else:
        assert not stacks

    notice = page.find_element("id", "relaunch-notice")
    assert notice.is_displayed() and notice.text.strip()
    assert re.search(r"\b1\b.*\b3\b", text(page, "#budget"), re.S), text(page, "#budget")


def text(page: WebDriver, selector: str) -> str:
    """What the element shows (WebDriver's rendered text: hidden parts left out)."""
    return str(page.find_element("css selector", selector).text).strip()


def content(element: WebElement) -> str:
    """The element's text as the HTML has it, shown or not (a collapsed <details>, CSS caps)."""
    return (element.get_attribute("textContent") or "").strip()


def attribute(element: WebElement, name: str) -> str:
    return element.get_attribute(name) or ""


def step_of(page: WebDriver) -> tuple[int, int]:
    """``#step`` read as the contract writes it, "STEP / TOTAL"."""
    shown = step_shown(page)
    assert shown, f"#step is {text(page, '#step')!r}, not 'STEP / TOTAL'"
    return shown


def step_shown(page: WebDriver) -> tuple[int, int] | None:
    """``#step`` as numbers; None while the page knows no step (a launch before its first)."""
    match = STEP_TEXT.fullmatch(text(page, "#step"))
    return (int(match[1]), int(match[2])) if match else None


def wait_until(
    page: WebDriver, condition: Callable[[], Any], what: str, artifacts: Path, timeout: float = 20
) -> None:
    """Poll ``condition`` (the live refresh comes every few seconds); on a timeout keep the
    page as it was, screenshot and HTML, for the failure's reader."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (AssertionError, NoSuchElementException, StaleElementReferenceException):
            pass  # read while the refresh replaced main: ask again
        time.sleep(0.2)
    save_full_page(page, artifacts / "status-page-timeout.png")
    (artifacts / "status-page-timeout.html").write_text(page.page_source, encoding="utf-8")
    pytest.fail(f"waited {timeout} s for {what}; page kept in {artifacts}/status-page-timeout.*")
