"""The controller's page in a real browser (headless Chromium): the fake view served by the
real Server, read and clicked through as a person would, down to a screenshot."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import PNG_MAGIC, chromium, screenshot
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from test_web import DB_ERRORS, HOSTILE, TOKEN, FakeView, sample_view

from kvmctl.controller.metrics import Metrics
from kvmctl.controller.web import Server, create_app

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def served() -> Iterator[tuple[FakeView, Server]]:
    view = sample_view(time.time())  # "2 min ago" reads better in the screenshot than "2 y ago"
    # No auto-refresh: a reload between finding an element and reading it would make the
    # test flaky, and what the page shows does not change under a fake view anyway.
    app = create_app(view, TOKEN, None, Metrics(view.projects), refresh_seconds=0)
    server = Server(app, "127.0.0.1", 0)
    try:
        yield view, server
    finally:
        server.stop()


def wait_for(driver: webdriver.Chrome, by: str, what: str) -> WebElement:
    element: WebElement = WebDriverWait(driver, 10).until(
        ec.visibility_of_element_located((by, what)))
    return element


def open_project(driver: webdriver.Chrome, name: str) -> None:
    """From the index, by its link, as a person would."""
    wait_for(driver, By.ID, "projects")
    driver.find_element(By.CSS_SELECTOR, f"#project-{name} a.project-link").click()
    WebDriverWait(driver, 10).until(ec.url_contains(f"/projects/{name}"))
    wait_for(driver, By.ID, "objects-section")


def no_alert(driver: webdriver.Chrome) -> bool:
    """No script of a hostile string ran (its alert() would be open now)."""
    return ec.alert_is_present()(driver) is False


def test_the_page_in_a_real_browser(served: tuple[FakeView, Server], tmp_path: Path) -> None:
    view, server = served
    with chromium(tmp_path) as driver:
        driver.get(server.url)

        # The index: every project, its state and counts; hosts and their reachability.
        web = wait_for(driver, By.ID, "project-web")
        assert "Progressing" in web.text
        assert "OutOfSync 1" in web.text and "Failed 1" in web.text and "Synced 3" in web.text
        assert "Missing 1" in web.text and "Degraded 1" in web.text
        assert "partial" in web.text and "a1b2c3d4e5f6" in web.text
        assert "closed" in web.text  # the window
        db = driver.find_element(By.ID, "project-db")
        assert "Degraded" in db.text and "failed" in db.text
        assert "Suspended" in driver.find_element(By.ID, "project-archive").text
        down = driver.find_element(By.CSS_SELECTOR, '#hosts tr[data-host="web/lab2"]')
        assert "down" in down.text and "cannot connect: timed out" in down.text
        # The hostile commit message is text on the page, not a script that ran.
        assert HOSTILE in web.text
        assert no_alert(driver)

        # A project with an object in every status, and its diff.
        open_project(driver, "web")
        assert driver.find_element(By.ID, "project-state").text == "Progressing"
        assert driver.find_element(By.ID, "last-sync-result").text == "partial"
        assert "a1b2c3d4e5f6" in driver.find_element(By.ID, "commit").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#objects tr[data-object]")
        assert {r.get_attribute("data-sync") for r in rows} == {
            "Synced", "OutOfSync", "Failed", "Progressing"}
        assert {r.get_attribute("data-health") for r in rows} == {
            "Healthy", "Progressing", "Degraded", "Missing", "Unknown"}
        hostile_row = driver.find_element(By.CSS_SELECTOR, '#objects tr[data-object$="script>"]')
        assert HOSTILE in hostile_row.text
        diff = driver.find_element(By.CSS_SELECTOR, '#diff [data-diff="lab1:vm/web-1"]')
        memory = diff.find_element(By.CSS_SELECTOR, 'tr[data-field="memory"]')
        assert memory.find_element(By.CSS_SELECTOR, "td.old").text == "2 GiB"
        assert memory.find_element(By.CSS_SELECTOR, "td.new").text == "4 GiB"
        assert "memory grows from 2 GiB to 4 GiB" in diff.text
        assert "outside the maintenance window" in diff.text
        assert "lab1:vm/web-1" in driver.find_element(By.ID, "pending-restarts").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#history tr[data-record]")) == 2
        # Read-only without a login: a link to log in, no buttons.
        assert driver.find_element(By.ID, "login-link").text == "Log in to sync or suspend"
        assert driver.find_elements(By.ID, "sync-now") == []
        assert no_alert(driver)

        # A failed sync: its located errors, line for line.
        driver.find_element(By.ID, "back").click()
        open_project(driver, "db")
        assert driver.find_element(By.ID, "last-sync-result").text == "failed"
        errors = driver.find_element(By.ID, "errors")
        for line in DB_ERRORS[0].splitlines() + [DB_ERRORS[1]]:
            assert line.strip() in errors.text, line
        shown = errors.find_elements(By.CSS_SELECTOR, "pre[data-error]")[0].text
        assert shown.splitlines()[0] == DB_ERRORS[0].splitlines()[0]
        assert len(shown.splitlines()) == 3  # the pre keeps the lines apart
        history = driver.find_element(By.ID, "history")
        assert "webhook" in history.text and "ffff0000eeee" in history.text
        screenshot(driver, tmp_path / "db-full.png", full_page=True)

        # Log in with the token, back on the project, and sync it.
        driver.find_element(By.ID, "back").click()
        open_project(driver, "web")
        driver.find_element(By.ID, "login-link").click()
        token = wait_for(driver, By.ID, "token")
        token.send_keys(TOKEN)
        driver.find_element(By.ID, "login-submit").click()
        WebDriverWait(driver, 10).until(ec.url_contains("/projects/web"))
        assert "Logged in." in wait_for(driver, By.ID, "flash").text
        assert view.syncs == []
        wait_for(driver, By.ID, "sync-now").click()
        flash = WebDriverWait(driver, 10).until(
            ec.text_to_be_present_in_element((By.ID, "flash"), "Sync of web requested."))
        assert flash
        assert view.syncs == [("web", "manual")]
        assert driver.find_element(By.ID, "suspend").is_displayed()

        shot = screenshot(driver, tmp_path / "project.png")
        screenshot(driver, tmp_path / "project-full.png", full_page=True)
        driver.get(server.url)
        wait_for(driver, By.ID, "projects")
        screenshot(driver, tmp_path / "index-full.png", full_page=True)

    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10 * 1024, f"{shot} is only {len(data)} bytes"
