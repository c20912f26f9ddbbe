"""The dashboard in a real browser: Debian's headless chromium driven by Selenium through
/usr/bin/chromedriver (nothing downloaded). Enter the API key, upload a file, start a short job from
the form, watch it succeed with its loss curve, events and checkpoints, and chat with the result;
a screenshot of the end state goes to tmp_path."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from .helpers import InProcessService, chat_rows, jsonl

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "dashboard-key"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1440,1500"]

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (make test installs them when it can)")


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="qforge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def fill(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_upload_train_watch_and_chat_in_the_browser(browser, tiny_base, tmp_path):
    data = tmp_path / "friends.jsonl"
    data.write_bytes(jsonl(chat_rows(8)))
    with InProcessService(tiny_base, tmp_path / "data", keys=[KEY]) as service:
        wait = WebDriverWait(browser, 30, poll_frequency=0.2)
        browser.get(service.root + "/")
        fill(browser, "api-key", KEY)
        browser.find_element(By.ID, "save-key").click()
        wait.until(lambda d: text_of(d, "#server-status") == "connected")

        browser.find_element(By.ID, "upload-file").send_keys(str(data))
        browser.find_element(By.ID, "upload-button").click()
        wait.until(lambda d: "Uploaded friends.jsonl as file-" in text_of(d, "#upload-status"))
        file_id = browser.find_element(By.ID, "upload-status").get_attribute("data-file-id")
        wait.until(lambda d: Select(d.find_element(By.ID, "files-select")).first_selected_option
                   .get_attribute("value") == file_id)

        fill(browser, "job-suffix", "friends")
        Select(browser.find_element(By.ID, "job-method")).select_by_value("qlora")
        for field, value in (("job-batch", 2), ("job-rank", 4), ("job-max-steps", 3), ("job-max-seq-len", 64),
                             ("job-save-every", 1)):
            fill(browser, field, value)
        browser.find_element(By.ID, "create-job").click()
        wait.until(lambda d: "Created ftjob-" in text_of(d, "#create-status"))
        job_id = text_of(browser, "#create-status").split()[-1]
        model = f"ft:tiny:friends:{job_id}"

        WebDriverWait(browser, 300, poll_frequency=0.5).until(lambda d: text_of(d, "#detail-status") in (
            "succeeded", "failed", "cancelled"))
        assert text_of(browser, "#detail-status") == "succeeded", text_of(browser, "#detail-error")
        wait.until(lambda d: text_of(d, "#detail-model") == model)
        wait.until(lambda d: len(d.find_element(By.ID, "loss-line").get_attribute("points").split()) == 3)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")) == 3)
        assert "The job has successfully completed" in text_of(browser, "#events")
        row = browser.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job-id="{job_id}"]')
        assert "succeeded" in row.text

        wait.until(lambda d: model in [o.get_attribute("value") for o in Select(d.find_element(
            By.ID, "chat-model")).options])
        Select(browser.find_element(By.ID, "chat-model")).select_by_value(model)
        fill(browser, "chat-max-tokens", 8)
        fill(browser, "chat-input", "Who is Ada?")
        browser.find_element(By.ID, "chat-send").click()
        answer = WebDriverWait(browser, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant"))[0]
        assert answer.text.startswith(model + ":")  # labelled "error:" had the request failed
        wait.until(lambda d: model in text_of(d, "#adapters"))

        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                  and "status of 401" not in e["message"]]  # the polls before the key was entered
        assert not errors, json.dumps(errors, indent=1)
