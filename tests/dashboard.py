"""Drives the dashboard of a running head in headless Chromium (Debian's chromium + chromedriver,
through Selenium) and checks what a user sees: the token prompt, the cluster, a running job and its
live loss curve, cancel, the deployments (and deleting one from its row), a job name with HTML in
it shown as text, and the playground streaming an answer. Saves a screenshot. Called by tests/dashboard.rs:

    python tests/dashboard.py URL TOKEN RUNNING_JOB_ID HOSTILE_OUTPUT_NAME SCREENSHOT
"""

import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

url, token, job_id, hostile, screenshot = sys.argv[1:6]


def driver_path():
    for path in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"):
        try:
            open(path).close()
            return path
        except OSError:
            pass
    raise SystemExit("chromedriver not found")


options = Options()
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1400,1100"):
    options.add_argument(arg)
browser = webdriver.Chrome(service=Service(driver_path()), options=options)
# The tables are rebuilt every 2 s: an element found a moment ago may be gone; look again.
wait = WebDriverWait(browser, 60, poll_frequency=0.2,
                     ignored_exceptions=[StaleElementReferenceException])


def click(selector):
    """Clicks in one script call, so that a table rebuilt in between cannot make it stale."""
    wait.until(lambda b: b.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) { e.click(); return true; }"
        " return false;", selector))


def step(what):
    print(f"dashboard: {what}", flush=True)


try:
    browser.get(url + "/dashboard")
    step("the page asks for the token")
    wait.until(lambda b: b.find_element(By.ID, "auth").is_displayed())
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "token-save").click()

    step("the cluster shows the head and its replica")
    wait.until(lambda b: "health: ok" in b.find_element(By.ID, "health").text)
    wait.until(lambda b: "head" in b.find_element(By.ID, "nodes").text)
    wait.until(lambda b: "inference-0" in b.find_element(By.ID, "replicas").text)

    step("the deployments: the default one and tiny2, ready, with their replicas")
    deployment = "#deployments tr[data-deployment='tiny2']"
    wait.until(lambda b: "ready" in b.find_element(By.CSS_SELECTOR, deployment).text)
    assert "1/1" in browser.find_element(By.CSS_SELECTOR, deployment).text
    assert "(default)" in browser.find_element(By.ID, "deployments").text
    wait.until(lambda b: "tiny2" in b.find_element(By.ID, "replicas").text)

    step("the running job appears")
    row = f"#jobs tr[data-job='{job_id}']"
    wait.until(lambda b: "running" in b.find_element(By.CSS_SELECTOR, row).text)

    step("its loss curve updates")
    click(row + " button.view")
    wait.until(lambda b: b.execute_script("return points.length") > 0)
    first = browser.execute_script("return points.length")
    wait.until(lambda b: b.execute_script("return points.length") > first)
    drawn = browser.execute_script(
        "const c = document.getElementById('curve');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;")
    assert drawn > 100, f"the curve canvas is blank ({drawn} painted pixels)"

    step("a job whose output name holds HTML shows it as text")
    wait.until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('#jobs td')].some(td => td.textContent === arguments[0])",
        hostile))
    assert not browser.find_elements(By.CSS_SELECTOR, "#jobs img, #jobs b, #jobs script"), \
        "server text was rendered as HTML"
    assert browser.execute_script("return window.injected === undefined"), "injected code ran"

    step("the playground streams an answer from the deployment picked")
    wait.until(lambda b: "tiny2" in b.find_element(By.ID, "model").text)
    # In one script call: the picker's options may be rebuilt between two WebDriver calls.
    browser.execute_script("document.getElementById('model').value = 'tiny2'")
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "tiny2"
    assert Select(browser.find_element(By.ID, "adapter")).first_selected_option.text.startswith("none")
    browser.find_element(By.ID, "prompt").send_keys("Hello there")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_element(By.ID, "chat-status").text.startswith(("finished", "done")))
    answer = browser.find_element(By.ID, "answer").text
    assert answer.strip(), "the playground answer is empty"
    print(f"dashboard: answer {answer!r}", flush=True)

    browser.save_screenshot(screenshot)
    step("screenshot saved")

    step("deleting tiny2 from its row drains and removes it")
    click(deployment + " button.delete")
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, deployment))

    step("cancel works")
    click(row + " button.cancel")
    wait.until(lambda b: "cancelled" in b.find_element(By.CSS_SELECTOR, row).text)
    step("all checks passed")
finally:
    browser.quit()
