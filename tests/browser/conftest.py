"""What the browser tests need: headless Chromium (Debian's package, driven through Debian's
chromedriver by Selenium), a real sidecar running in the background, and a folder for
screenshots.

Nothing here downloads anything: the driver path is given to Selenium's ``Service``, which
makes Selenium skip Selenium Manager (selenium/webdriver/common/driver_finder.py, 4.x: "Skipping
Selenium Manager; path to ... driver specified in Service class"), and the browser binary is
set on the options. ``.ci/install-browser.sh`` installs both packages. Without them the tests
skip on a laptop and fail under CI, where a missing browser is a broken setup.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import simulator_processes
from repo_paths import REPO_ROOT
from sidecar_process import RunningSidecar

from sidecar.simulator.fluxgym_tree import FluxgymTree
from sidecar.simulator.harness import sidecar_environment, stop_everything

if TYPE_CHECKING:  # Selenium itself may be missing: the tests then skip (or fail under CI)
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS_ENV = "SIDECAR_TEST_ARTIFACTS"
WINDOW = (1280, 1000)


def _unavailable_reason() -> str | None:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            return f"{binary} is missing (run .ci/install-browser.sh)"
    try:
        import selenium.webdriver  # noqa: F401
    except ImportError as error:
        return f"the Selenium client is missing ({error}; pip install -e '.[test]')"
    return None


def require_browser() -> None:
    """Skip without a browser on a laptop; fail under CI, where it must have been installed."""
    reason = _unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the browser tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $SIDECAR_TEST_ARTIFACTS, else tests/artifacts (git-ignored), so a
    CI job can collect them and the README can show the page the test saw."""
    folder = Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


OpenBrowser = Callable[..., "WebDriver"]


@pytest.fixture(scope="module")
def open_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBrowser]:
    """``open_browser(javascript=True)``: a new headless Chromium with its own profile; every
    one opened is quit when the module's tests are done."""
    require_browser()
    drivers: list[WebDriver] = []

    def launch(*, javascript: bool = True) -> WebDriver:
        driver = _chromium(tmp_path_factory.mktemp("chromium-profile"), javascript=javascript)
        drivers.append(driver)
        _check_javascript(driver, javascript)
        return driver

    yield launch
    for driver in drivers:
        driver.quit()


def _chromium(profile: Path, *, javascript: bool) -> WebDriver:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --headless=new is the full browser without a window (Chrome 112+); --disable-dev-shm-usage
    # because a container's /dev/shm is often 64 MB; --disable-gpu: no GPU to draw with here.
    for argument in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # as root, Chromium will not start sandboxed
    # The page's console, for get_log("browser") (chromedriver's logging preference).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        # The content setting a user or an admin sets to turn JavaScript off (2 = block).
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    return driver


def _check_javascript(driver: WebDriver, javascript: bool) -> None:
    """Prove the browser runs (or blocks) page scripts as asked, so that a JS-off test that
    passes really saw the page without them."""
    driver.get("data:text/html,<title>before</title><script>document.title='ran'</script>")
    ran = driver.title == "ran"
    assert ran == javascript, f"asked for javascript={javascript}, page scripts ran: {ran}"


def retried_when_swapped(check: Callable[[], None], attempts: int = 3) -> None:
    """Run ``check`` on a live page again when the refresh replaced ``main`` under it (an
    element found before the swap is stale after it); the last attempt's error stands."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(attempts):
        try:
            check()
            return
        except StaleElementReferenceException:
            if attempt == attempts - 1:
                raise


def save_full_page(driver: WebDriver, path: Path) -> Path:
    """The whole page as a PNG, not only the window: Chrome DevTools Protocol
    Page.captureScreenshot with captureBeyondViewport and a clip of Page.getLayoutMetrics'
    cssContentSize (https://chromedevtools.github.io/devtools-protocol/tot/Page/)."""
    content = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {
        "x": 0,
        "y": 0,
        "width": max(1, content["width"]),
        "height": max(1, content["height"]),
        "scale": 1,
    }
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


class BackgroundSidecar(RunningSidecar):
    """``python -m sidecar run`` on a simulated tree, left running while a test looks at it;
    :meth:`stop` is what an operator's ``docker stop`` does."""

    def __init__(
        self,
        tree: FluxgymTree,
        *,
        settings: dict[str, str] | None = None,
        simulation: dict[str, str] | None = None,
    ):
        self.tree = tree
        super().__init__(sidecar_environment(tree, settings=settings, simulation=simulation))

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as ``docker stop`` sends it; the exit code (128 + 15 when it was running).
        Whatever is still alive afterwards (it should be nothing) is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_everything(self.tree, self.process.pid)
            code = self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def leftovers(self) -> list[Any]:
        return simulator_processes(self.tree)

    def kill(self) -> None:
        """The last resort after a failure: nothing of this run may outlive the test."""
        stop_everything(self.tree, self.process.pid)
        self.process.wait(timeout=10)
