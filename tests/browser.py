"""A real headless Chromium (Debian's `chromium` and `chromium-driver`, installed by
scripts/browser.sh) driven with Selenium, for the tests of the pages the API serves. Screenshots
go to var/test-artifacts/, which CI keeps."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "var" / "test-artifacts"
CHROMIUM = os.environ.get("GATT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GATT_CHROMEDRIVER", "/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which a closed
# network refuses by the dozen; as root it needs --no-sandbox.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2000",
]


@contextmanager
def chromium() -> Iterator:
    """A Selenium driver of a fresh headless Chromium profile; the browser's console is readable
    with `driver.get_log("browser")`."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("GATT_SKIP_BROWSER") == "1":
            pytest.skip("GATT_SKIP_BROWSER=1 and no Chromium")
        pytest.fail(
            f"no {CHROMIUM} or {CHROMEDRIVER}: run scripts/browser.sh (Debian's chromium, chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gatt-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    """The whole page as var/test-artifacts/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(800, min(int(height), 6000)))
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
