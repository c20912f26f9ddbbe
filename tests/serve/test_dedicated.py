"""A full fine-tuning job through the jobs API, served as a dedicated dense model in the same
server: its completions equal transformers' greedy output on the job's saved folder, its echo
log-probs transformers' log-softmax there (not the base's); deleting the model stops serving it;
a DPO job cannot be `full`."""
import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.jobs.helpers import InProcessService, chat_rows, job_create_body, jsonl, pair_rows, wait_for

pytestmark = pytest.mark.slow  # a real trainer subprocess
PROMPT = "Who is Ada?"


@torch.no_grad()
def hf_greedy_and_logprobs(folder, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return out, logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_a_full_job_is_served_as_its_own_model(tmp_path, tiny_base):
    with InProcessService(tiny_base, tmp_path / "data") as service, httpx.Client(base_url=service.url,
                                                                                timeout=120) as http:
        upload = http.post("/files", data={"purpose": "fine-tune"},
                           files={"file": ("chat.jsonl", jsonl(chat_rows(8)))}).json()
        body = job_create_body(upload["id"], "tiny", method="full", max_steps=2)
        body |= {"hyperparameters": {"learning_rate_multiplier": 20}, "seed": 0}
        job = http.post("/fine_tuning/jobs", json=body).json()
        assert "id" in job, job
        job = wait_for(lambda: (j := http.get(f"/fine_tuning/jobs/{job['id']}").json())["status"] in
                       ("succeeded", "failed", "cancelled") and j, 600, 1.0, "the full job to finish")
        assert job["status"] == "succeeded", job.get("error")
        name, folder = job["fine_tuned_model"], service.jobs.store.job_dir(job["id"]) / "run" / "model"
        assert (folder / "config.json").is_file()
        wait_for(lambda: name in [m["id"] for m in http.get("/models").json()["data"]], 60, 0.5,
                 "the watcher to register the model")

        ids = AutoTokenizer.from_pretrained(str(folder))(PROMPT, add_special_tokens=False).input_ids
        r = wait_for(lambda: (got := http.post("/completions", json={"model": name, "prompt": ids, "max_tokens": 8,
                                                                     "temperature": 0})).status_code != 429 and got,
                     120, 0.5, "the full model to load")  # 429 while it loads in the background
        echo = http.post("/completions", json={"model": name, "prompt": ids, "max_tokens": 0, "echo": True,
                                               "logprobs": 1})
        base_echo = http.post("/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                                    "logprobs": 1})
        greedy, theirs = hf_greedy_and_logprobs(folder, ids, 8)  # before the model is deleted
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        deleted = http.delete(f"/models/{name}")
        after = http.post("/completions", json={"model": name, "prompt": ids, "max_tokens": 1})
        assert deleted.status_code == 200 and deleted.json()["deleted"] and not folder.exists()
        assert after.status_code == 404 and name not in service.jobs.registry.dedicated
    assert r.status_code == echo.status_code == base_echo.status_code == 200, (r.text, echo.text)
    _, base = hf_greedy_and_logprobs(tiny_base, ids, 8)
    assert r.json()["choices"][0]["text"] == tokenizer.decode(greedy, skip_special_tokens=True)
    ours = torch.tensor(echo.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - base).abs().max() > 1e-3  # the full fine-tune, not the base, answered
    served_base = torch.tensor(base_echo.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert (served_base - theirs).abs().max() > 1e-3


def test_full_is_for_supervised_jobs_only(tmp_path, tiny_base):
    with InProcessService(tiny_base, tmp_path / "data", start_worker=False) as service, \
            httpx.Client(base_url=service.url, timeout=60) as http:
        upload = http.post("/files", data={"purpose": "fine-tune"},
                           files={"file": ("pairs.jsonl", jsonl(pair_rows(4)))}).json()
        r = http.post("/fine_tuning/jobs", json={"model": "tiny", "training_file": upload["id"], "method": {
            "type": "dpo", "dpo": {"hyperparameters": {"method": "full"}}}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "method.dpo.hyperparameters.method" and "supervised jobs only" in error["message"]
    assert json.dumps(error)  # a plain JSON error, no traceback
