"""Drive the gateway's web dashboard (/ui) in headless Chromium with selenium against a running
stack (tests/e2e/tests/dashboard.rs starts it). Prints OK as the last line when every check held.

Checks: an unauthenticated visit sees only the login; a wrong token is refused with the gateway's
message; after the login the page shows the GPU; a model loaded through the API appears as a lease
and as a model within 2 s; a key created in the page appears, and disappears when revoked there
(revoked through the API too); no console errors apart from the refused wrong token's 401.
Screenshots go to $ARTIFACTS.

Environment: BASE (http://HOST:PORT), ADMIN_TOKEN, ARTIFACTS, CHROMIUM, CHROMEDRIVER.
"""
import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BASE = os.environ["BASE"]
TOKEN = os.environ["ADMIN_TOKEN"]
ART = os.environ["ARTIFACTS"]
os.makedirs(ART, exist_ok=True)


def admin(method, path, body=None):
    req = urllib.request.Request(
        BASE + "/admin/v1" + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)


opts = webdriver.ChromeOptions()
opts.binary_location = os.environ["CHROMIUM"]
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
    opts.add_argument(a)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(os.environ["CHROMEDRIVER"]), options=opts)
wait = WebDriverWait(driver, 10, poll_frequency=0.05)
by_id = lambda i: driver.find_element(By.ID, i)  # noqa: E731


def console_errors():
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def table_text(i):
    return by_id(i).find_element(By.TAG_NAME, "tbody").text


try:
    # An unauthenticated visit: the login and nothing else.
    driver.get(BASE + "/ui")
    wait.until(lambda d: by_id("login").is_displayed())
    check(not by_id("dashboard").is_displayed(), "the dashboard is hidden before the login")
    check("GPU" not in by_id("gpus").text, "no data before the login")
    driver.save_screenshot(os.path.join(ART, "login.png"))
    errs = console_errors()
    check(errs == [], f"no console errors on load: {errs}")

    # A wrong token: refused with the gateway's message.
    by_id("token").send_keys("wrong-token")
    by_id("login-form").submit()
    wait.until(lambda d: by_id("login-error").is_displayed())
    check("invalid admin token" in by_id("login-error").text, by_id("login-error").text)
    check(not by_id("dashboard").is_displayed(), "still no dashboard")
    errs = console_errors()
    check(all("401" in e["message"] for e in errs), f"only the refused token's 401: {errs}")

    # The right token: the dashboard with the GPU.
    by_id("token").send_keys(TOKEN)
    by_id("login-form").submit()
    wait.until(lambda d: by_id("dashboard").is_displayed())
    wait.until(lambda d: "GPU 0" in by_id("gpus").text)
    check("up" in by_id("services").text, by_id("services").text)

    # A load through the API shows up as a lease and a model within 2 s.
    inst = admin("POST", "/instances/load", {"model": "tiny"})
    check(inst["state"] == "ready", f"loaded: {inst}")
    t0 = time.monotonic()
    WebDriverWait(driver, 2, poll_frequency=0.05).until(
        lambda d: "tiny" in table_text("leases") and "tiny" in table_text("instances")
        and "ready" in table_text("instances")
    )
    print(f"load visible after {time.monotonic() - t0:.2f} s", flush=True)
    driver.save_screenshot(os.path.join(ART, "dashboard.png"))

    # A key created in the page appears; revoked there, it disappears.
    by_id("key-name").send_keys("from-the-browser")
    by_id("key-models").send_keys("tiny")
    by_id("key-form").submit()
    wait.until(lambda d: "from-the-browser" in table_text("keys"))
    check("sk-slm-" in by_id("key-secret").text, "the new secret is shown once")
    row = [r for r in by_id("keys").find_elements(By.CSS_SELECTOR, "tbody tr") if "from-the-browser" in r.text][0]
    key_id = row.find_element(By.CSS_SELECTOR, "td").text
    row.find_element(By.CSS_SELECTOR, "button.revoke").click()
    wait.until(lambda d: "from-the-browser" not in table_text("keys"))
    keys = admin("GET", "/keys?include_inactive=true")["keys"]
    check([k["state"] for k in keys if k["id"] == key_id] == ["revoked"], f"{key_id} revoked: {keys}")

    # The audit tail shows the page's own calls.
    wait.until(lambda d: "/admin/v1/keys/{id}" in table_text("audit"))
    errs = console_errors()
    check(errs == [], f"no console errors while logged in: {errs}")
    driver.save_screenshot(os.path.join(ART, "dashboard-after.png"))
finally:
    driver.quit()
print("OK", flush=True)
