"""The license managers' portal in a real headless browser (Chromium through
selenium) against the real authority: enrol, sign in, see "Not assigned",
assign, unassign, a refused form, sign out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from browser import start_browser
from test_managers import issue_under
from test_online import Vendor, admin

MIA = "mia@customer.example"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver: Any = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver: Any, **fields: str) -> None:
    """Type into the named inputs of the page's first form that has them, and submit it."""
    from selenium.webdriver.common.by import By

    element = None
    for name, value in fields.items():
        element = driver.find_element(By.NAME, name)
        element.clear()
        element.send_keys(value)
    assert element is not None
    submit(driver, element)


def submit(driver: Any, element: Any) -> None:
    """Submit the form ``element`` is in, and wait (bounded) until the page it
    leads to has loaded: a form's submission does not wait by itself."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.submit()
    wait = WebDriverWait(driver, 15)
    wait.until(expected_conditions.staleness_of(old))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def row(driver: Any, license_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'tr[data-license="{license_id}"]')


def test_a_manager_works_in_the_portal(books: Vendor, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    url = books.process.url
    mine = issue_under(books, "o-1", "--seats", "3", "--max-users", "1")
    other = issue_under(books, "o-2", "--seats", "3", "--max-users", "1")
    token = books.run("managers", "appoint", "o-1", MIA).strip()

    browser.delete_all_cookies()
    browser.get(f"{url}/portal/enrol?token={token}")
    assert "Set your password" in browser.title
    fill(browser, password=PASSWORD)
    assert "Your password is set" in text(browser)

    fill(browser, email=MIA, password=PASSWORD)
    assert "Your licenses" in browser.title
    assert f"Signed in as {MIA}" in text(browser)
    assert other not in browser.page_source  # another order's license never shows
    assert "Not assigned" in row(browser, mine).text
    cookie = browser.get_cookie("floatd_portal")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Assign: the page says so, and the authority's books agree.
    assign = row(browser, mine).find_element(By.CSS_SELECTOR, "form[action$='/assign']")
    assign.find_element(By.NAME, "email").send_keys("ann@customer.example")
    submit(browser, assign)
    assert "User assigned." in text(browser)
    assert "ann@customer.example" in row(browser, mine).text
    assert "Not assigned" not in row(browser, mine).text
    key = books.run("api-keys", "create", "ops").strip()
    assert admin(books, "GET", f"/v1/admin/licenses/{mine}", key)[1]["users"] == [
        "ann@customer.example"
    ]

    # Past max_users: the page shows the authority's refusal, and nothing changes.
    assign = row(browser, mine).find_element(By.CSS_SELECTOR, "form[action$='/assign']")
    assign.find_element(By.NAME, "email").send_keys("bo@customer.example")
    submit(browser, assign)
    assert "user places are taken" in text(browser)
    assert "bo@customer.example" not in row(browser, mine).text

    # A form whose CSRF token is not the session's is refused and changes nothing.
    browser.get(f"{url}/portal/")
    unassign = row(browser, mine).find_element(By.CSS_SELECTOR, "form[action$='/unassign']")
    csrf = unassign.find_element(By.NAME, "csrf")
    browser.execute_script("arguments[0].value = 'forged';", csrf)
    submit(browser, unassign)
    assert "Form refused" in browser.title
    assert admin(books, "GET", f"/v1/admin/licenses/{mine}", key)[1]["users"] == [
        "ann@customer.example"
    ]

    # Unassign for real, then sign out.
    browser.get(f"{url}/portal/")
    submit(browser, row(browser, mine).find_element(By.CSS_SELECTOR, "form[action$='/unassign']"))
    assert "User unassigned." in text(browser)
    assert "Not assigned" in row(browser, mine).text
    submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/portal/sign-out']"))
    assert "Signed out." in text(browser)
    assert "Sign in" in browser.title
    browser.get(f"{url}/portal/")
    assert "Sign in" in browser.title  # the session is gone, not just the page


def test_a_wrong_password_and_a_forged_sign_in_are_refused(books: Vendor, browser: Any) -> None:
    issue_under(books, "o-1", "--seats", "1", "--max-users", "1")
    token = books.run("managers", "appoint", "o-1", MIA).strip()
    url = books.process.url
    browser.delete_all_cookies()
    browser.get(f"{url}/portal/enrol?token={token}")
    fill(browser, password=PASSWORD)
    fill(browser, email=MIA, password="not the password")
    assert "unknown e-mail or wrong password" in text(browser)
    assert browser.get_cookie("floatd_portal") is None
    # Without the form's own cookie (a page elsewhere posting here), sign-in is refused.
    browser.delete_all_cookies()
    fill(browser, email=MIA, password=PASSWORD)
    assert "Form refused" in browser.title
    assert browser.get_cookie("floatd_portal") is None


def test_cookies_are_secure_behind_tls_and_pages_forbid_framing() -> None:
    from floatd.authority.portal import Portal, _page

    async def run(*_: Any) -> Any:
        raise AssertionError("not called")

    for secure in (True, False):
        name, value = Portal(None, run, secure=secure)._cookie("floatd_portal", "t")  # type: ignore[arg-type]
        assert name == "set-cookie"
        parts = value.split("; ")
        assert {"HttpOnly", "SameSite=Strict", "Path=/portal"} <= set(parts)
        assert ("Secure" in parts) is secure
    page = dict(_page("t", "").headers)
    assert page["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page["content-security-policy"]
    assert page["referrer-policy"] == "no-referrer"
