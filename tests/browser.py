"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by selenium,
for the web console's tests: ``WHY`` says what is missing (the tests skip with it),
``chromium()`` starts the browser, ``Page`` wraps one driver pointed at one service (waits,
text of elements while pages reload themselves, screenshots kept as test artifacts in
``$IMGACCEL_TEST_ARTIFACTS``, else a directory the caller chooses)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    WHY = ""
except ImportError:  # the tests skip, naming what is missing
    By = Keys = Select = NoSuchElementException = StaleElementReferenceException = None  # type: ignore[assignment,misc]
    WHY = "selenium is not installed (pip install selenium)"
for _path, _what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver (chromedriver)")):
    if not WHY and not os.path.exists(_path):
        WHY = f"{_what} is not installed (apt-get install chromium chromium-driver)"


def artifacts_dir(default: Path) -> Path:
    shots = Path(os.environ.get("IMGACCEL_TEST_ARTIFACTS") or default)
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@contextmanager
def chromium(width: int = 1280, height: int = 1500, javascript: bool = True) -> Iterator[Any]:
    """A headless Chromium driver, quit on exit."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Page:
    driver: Any
    base_url: str  # the service's http://127.0.0.1:port
    shots: Path
    log_path: Path | None = None  # the service's log, quoted when a wait times out

    def get(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def shot(self, name: str) -> Path:
        path = self.shots / f"console-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def until(self, predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = predicate()
            except (NoSuchElementException, StaleElementReferenceException):
                got = None
            if got:
                return got
            time.sleep(0.2)
        self.shot("timeout")
        log = self.log_path.read_text()[-2000:] if self.log_path else ""
        raise AssertionError(f"timed out waiting for {what}; service log: {log}")

    def text(self, css: str) -> str:
        """The element's text; retried while the page reloads itself (a task that ended)."""
        for _ in range(50):
            try:
                return str(self.driver.find_element(By.CSS_SELECTOR, css).text)
            except (NoSuchElementException, StaleElementReferenceException):
                time.sleep(0.1)
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def login(self, token: str) -> None:
        self.get("/ui/login")
        self.driver.find_element(By.ID, "token").send_keys(token)
        self.driver.find_element(By.CSS_SELECTOR, "form.card button").click()
        self.until(lambda: not self.driver.current_url.endswith("/ui/login"), 10, "the page after logging in")
