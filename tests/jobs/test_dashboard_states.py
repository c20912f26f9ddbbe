"""The dashboard says what is happening, checked in headless Chromium on the page's text and DOM
(never its pixels): a wrong key is "not accepted" (not "No jobs yet") and ?key= is taken out of the
address bar into sessionStorage; a running job's progress, ETA, settings and loss / learning-rate
curves with Cancel; a finished job's download, its model named in the list and chosen in the
Playground (not a checkpoint alias), no Cancel; a failed job's error with the base model labelled.
No training: jobs are put in the states the worker leaves them in. A screenshot of each state goes
to tmp_path, and to $QFORGE_TEST_ARTIFACTS/dashboard/ when that is set (make test's artefacts)."""
import os
import shutil
from pathlib import Path

import openai
import pytest

from qforge.jobs.store import now

from .helpers import InProcessService, chat_rows, jsonl
from .test_adapter_download import add_steps, make_finished_job, queued_job
from .test_dashboard import CHROMEDRIVER, CHROMIUM, browser, fill, select_job, text_of  # noqa: F401 - browser: a fixture

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (make test installs them when it can)")]
KEY = "states-key"


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    driver.execute_script("window.scrollTo(0, 0)")
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("QFORGE_TEST_ARTIFACTS"):
        folder = Path(os.environ["QFORGE_TEST_ARTIFACTS"]) / "dashboard"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    return path


def settings(driver) -> dict[str, str]:
    """The job's settings table, {label: value}, read in one script (redrawn every poll)."""
    return driver.execute_script("""
        return Object.fromEntries([...document.querySelectorAll("#detail-settings tbody tr")].map(
            (r) => [r.dataset.setting, r.children[1].textContent]));""")


def job_row(driver, job_id: str) -> dict:
    """A job's row of the list, read in one script (the list is redrawn every poll): its id cell's
    text and title, and its Model column's label and name."""
    return driver.execute_script("""
        const row = document.querySelector(`#jobs tr[data-job-id="${arguments[0]}"]`);
        if (!row) return null;
        const id = row.querySelector("td.mono"), model = row.querySelector("td.model");
        const label = model.querySelector(".model-label").textContent;
        return {id: id.textContent, title: id.title, label, model: model.textContent.slice(label.length)};""", job_id)


def model_cell(driver, job_id: str) -> tuple[str, str]:
    """(label, name) of a job's Model column."""
    row = job_row(driver, job_id)
    return row["label"], row["model"]


def points(driver, line: str) -> int:
    return len(driver.execute_script("return document.getElementById(arguments[0]).getAttribute('points')",
                                     line).split())


def text_of(driver, css: str) -> str:  # noqa: F811 - textContent in one script: nodes are redrawn every poll
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", css)


def test_the_dashboard_states(browser, tiny_base, tmp_path):  # noqa: F811 - browser is the fixture
    with InProcessService(tiny_base, tmp_path / "data", keys=[KEY], start_worker=False) as service:
        client = openai.OpenAI(base_url=service.url, api_key=KEY, max_retries=0, timeout=60)
        data = client.files.create(file=("chat.jsonl", jsonl(chat_rows(6))), purpose="fine-tune")
        store = service.jobs.store
        running = queued_job(client, data.id, rank=4, max_seq_len=64, max_steps=4, batch_size=2)
        store.update_job(running, status="running", estimated_finish=now() + 95)
        add_steps(store, running, (1, 2), 4)
        finished, model = make_finished_job(service, client, tiny_base, data.id)
        failed = queued_job(client, data.id)
        message = "chat.jsonl:3: a message has no 'content'"
        store.update_job(failed, status="failed", finished_at=now(), level="error",
                         error={"code": "invalid_training_file", "message": message, "param": "training_file"},
                         events=[(f"The job failed: {message}", "failed")])
        wait = WebDriverWait(browser, 30, poll_frequency=0.2)

        # a wrong key in the URL: "not accepted", nothing listed, the key moved to sessionStorage
        browser.get(service.root + "/?key=wrong-key")
        wait.until(lambda d: d.find_element(By.ID, "key-state").get_attribute("data-state") == "rejected")
        assert text_of(browser, "#key-state").startswith("Key not accepted (HTTP 401)")
        assert text_of(browser, "#server-status") == "key not accepted"
        assert not browser.find_element(By.ID, "jobs-empty").is_displayed()
        assert browser.find_element(By.ID, "jobs-locked").is_displayed()
        assert browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr") == []
        assert "key=" not in browser.current_url
        assert browser.execute_script("return sessionStorage.getItem('qforge.apiKey')") == "wrong-key"
        assert browser.execute_script("return localStorage.getItem('qforge.apiKey')") is None
        assert "sessionStorage" in text_of(browser, "#key-where")
        screenshot(browser, tmp_path, "wrong-key")

        # the right key pasted: the three jobs, full ids
        fill(browser, "api-key", KEY)
        browser.find_element(By.ID, "save-key").click()
        wait.until(lambda d: text_of(d, "#server-status") == "connected")
        assert not browser.find_element(By.ID, "key-state").is_displayed()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 3)
        for job_id in (running, finished, failed):  # the full id, shown and on hover
            assert job_row(browser, job_id)["id"] == job_row(browser, job_id)["title"] == job_id

        # running: progress, ETA, every setting, the curves; Cancel, no download
        select_job(browser, running)
        wait.until(lambda d: text_of(d, "#detail-progress") == "step 2/4 (50%)")
        assert text_of(browser, "#detail-status") == "running"
        assert text_of(browser, "#detail-phase") == "(training)"
        assert "about" in text_of(browser, "#detail-eta") and "so far" in text_of(browser, "#detail-elapsed")
        shown = settings(browser)
        assert (shown["LoRA rank"], shown["sequence length (tokens)"], shown["max steps"], shown["batch size"]) == (
            "4", "64", "4", "2")
        assert shown["method"] == "qlora" and shown["epochs"] == "1" and shown["training file"] == data.id
        assert shown["processes"] == "1"  # hyperparameters' n_processes, resolved for every job
        assert shown["learning-rate multiplier"].startswith("1") and "1.00e-4 at the last step" in shown["learning-rate multiplier"]
        assert (points(browser, "loss-line"), points(browser, "valid-line"), points(browser, "lr-line")) == (2, 1, 2)
        assert browser.find_element(By.ID, "cancel-job").is_displayed()
        assert not browser.find_element(By.ID, "download-adapter").is_displayed()
        assert model_cell(browser, running) == ("base", "tiny")
        screenshot(browser, tmp_path, "running-job")
        add_steps(store, running, (3, 4), 4)  # every step logged, the trainer still saving: said so
        wait.until(lambda d: text_of(d, "#detail-phase") == "(all 4 steps done: saving the adapter and results)")
        assert text_of(browser, "#detail-progress") == "step 4/4 (100%)"

        # finished: its model in the list and the Playground, the download, no Cancel
        select_job(browser, finished)
        wait.until(lambda d: text_of(d, "#detail-status") == "succeeded")
        assert text_of(browser, "#detail-model") == model and text_of(browser, "#detail-progress") == "step 3/3 (100%)"
        assert model_cell(browser, finished) == ("fine-tuned", model)
        assert not browser.find_element(By.ID, "cancel-job").is_displayed()
        assert text_of(browser, "#detail-eta") == "—"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")) == 1
        service.jobs.register(store.get_job(finished), model + ":ckpt-step-1")  # a checkpoint alias is served too
        options = "return [...document.getElementById('chat-model').options].map((o) => o.value)"
        wait.until(lambda d: model + ":ckpt-step-1" in d.execute_script(options))
        wait.until(lambda d: d.execute_script("return document.getElementById('chat-model').value") == model)
        browser.find_element(By.ID, "download-adapter").click()
        wait.until(lambda d: text_of(d, "#download-status").startswith("downloaded "))
        screenshot(browser, tmp_path, "finished-job")

        # failed: the error, the base labelled, neither Cancel nor download
        select_job(browser, failed)
        wait.until(lambda d: text_of(d, "#detail-status") == "failed")
        assert message in text_of(browser, "#detail-error")
        assert model_cell(browser, failed) == ("base", "tiny")
        assert text_of(browser, "#detail-model") == "none (base tiny)"
        assert not browser.find_element(By.ID, "cancel-job").is_displayed()
        assert not browser.find_element(By.ID, "download-adapter").is_displayed()
        screenshot(browser, tmp_path, "failed-job")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "status of 401" not in e["message"]]
        assert not errors, errors
