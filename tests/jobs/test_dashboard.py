"""The dashboard in a real browser: Debian's headless chromium driven by Selenium through
/usr/bin/chromedriver (nothing downloaded). Enter the API key, upload a file, start a short job from
the form, watch it succeed with its loss curve, events and checkpoints, and chat with the result;
a screenshot of the end state goes to tmp_path. A DPO job's rewards are drawn as curves and a table."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from .helpers import InProcessService, chat_rows, jsonl, pair_rows, wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
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


def select_job(driver, job_id: str) -> None:
    def click(d):  # the list is redrawn every poll: a row found may be stale by the click
        try:
            d.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job-id="{job_id}"]').click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True
    wait = WebDriverWait(driver, 30, poll_frequency=0.2)
    wait.until(click)
    wait.until(lambda d: text_of(d, "#detail-id") == job_id and text_of(d, "#detail-status") != "")


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


def test_a_dpo_jobs_reward_accuracy_and_margins_are_drawn(browser, tiny_base, tmp_path):
    """A DPO job's metric events (put in the store as the worker would: no training here) show as the
    reward accuracy and margin curves and the rewards table; the method line names DPO and beta."""
    import openai

    from qforge.jobs.worker import metric_event

    with InProcessService(tiny_base, tmp_path / "data", keys=[KEY], start_worker=False) as service:
        client = openai.OpenAI(base_url=service.url, api_key=KEY, max_retries=0, timeout=60)
        pairs = client.files.create(file=("pairs.jsonl", jsonl(pair_rows(4))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=pairs.id, method={
            "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "method": "qlora", "rank": 4}}})
        wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "queued", 30, what="queued")
        steps = [{"step": s, "loss": 0.69 - 0.05 * s, "lr": 1e-4, "tokens": 50 * s, "rewards/chosen": 0.01 * s,
                  "rewards/rejected": -0.01 * s, "rewards/accuracies": 0.5 + 0.25 * (s - 1),
                  "rewards/margins": 0.02 * s} for s in (1, 2, 3)]
        service.jobs.store.add_events(job.id, [metric_event(r, 3) for r in steps])

        wait = WebDriverWait(browser, 30, poll_frequency=0.2)
        browser.get(service.root + "/")
        fill(browser, "api-key", KEY)
        browser.find_element(By.ID, "save-key").click()
        select_job(browser, job.id)
        wait.until(lambda d: d.find_element(By.ID, "rewards").is_displayed())
        assert text_of(browser, "#detail-method").startswith("dpo (beta 0.2), qlora, rank 4")
        for line in ("accuracy-line", "margin-line"):
            wait.until(lambda d: len(d.find_element(By.ID, line).get_attribute("points").split()) == 3)
        table = browser.find_elements(By.CSS_SELECTOR, "#reward-table tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in table] == ["3", "2", "1"]
        assert table[0].find_elements(By.TAG_NAME, "td")[2].text == "1.0000"
        browser.find_element(By.ID, "rewards").location_once_scrolled_into_view
        browser.save_screenshot(str(tmp_path / "dpo.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                  and "status of 401" not in e["message"]]
        assert not errors, json.dumps(errors, indent=1)
