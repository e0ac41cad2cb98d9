"""A real browser for the tests of the controller's page (unit, over a fake view, and
integration, over the real controller): Debian's headless Chromium driven by its chromedriver.

Both paths are given, so Selenium Manager has nothing to look up or download, and SE_OFFLINE
forbids it to try. The profile is a fresh directory of the test's own, so no state leaks
between tests. A browser that cannot start raises with the reason and chromedriver's log: the
tests that use it fail rather than skip, because the browser is part of the test environment.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1280, 900

ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # the tests may run as root or in a container without user namespaces
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm is often too small
    "--disable-quic",
    "--no-first-run",
    # Nothing but the page under test goes to the network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--window-size={WIDTH},{HEIGHT}",
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@contextmanager
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile under `tmp_path`, quit on leaving."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "chromedriver.log"
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log))
    before = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # read while the driver starts, and only then
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as exc:
        told = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise RuntimeError(f"headless Chromium could not start: {exc.msg}\n"
                           f"chromedriver log ({log}):\n{told}") from exc
    finally:
        if before is None:
            del os.environ["SE_OFFLINE"]
        else:
            os.environ["SE_OFFLINE"] = before
    try:
        driver.set_window_size(WIDTH, HEIGHT)
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, path: Path, *, full_page: bool = False) -> Path:
    """The page as a PNG at the 1280x900 window; with `full_page`, all of its height (through
    the DevTools protocol, which can capture beyond the viewport)."""
    driver.set_window_size(WIDTH, HEIGHT)
    path.parent.mkdir(parents=True, exist_ok=True)
    if full_page:
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics["cssContentSize"]
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": max(WIDTH, size["width"]),
                     "height": size["height"], "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
    elif not driver.save_screenshot(str(path)):
        raise RuntimeError(f"Chromium wrote no screenshot to {path}")
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise RuntimeError(f"{path} is not a PNG")
    return path
