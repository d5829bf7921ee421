"""A headless Chromium for the tests of web pages (Debian's ``chromium`` and
``chromium-driver``, driven by selenium).

If the two are missing and this runs as root on a machine with apt, they are
installed here, once: README's test command then works on a fresh machine, as
``.ci/run`` does (which installs them up front).  Anywhere else their absence
is a failure that says what to install, never a skip.
"""

from __future__ import annotations

from pathlib import Path

from packages import apt_install

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ["chromium", "chromium-driver"]


def ensure_chromium() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        apt_install(*PACKAGES)


def start_browser() -> object:
    """A headless Chromium under selenium's control (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    ensure_chromium()
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver
