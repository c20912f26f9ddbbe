"""Preference tuning through the jobs API, driven by the official openai client: OpenAI's
`method={"type": "dpo", "dpo": {"hyperparameters": {...}}}` (and qforge's `orpo` in the same shape)
on a file of preference pairs is queued with a TrainConfig of that objective and beta, which the
trainer process passes on to the training run; the wrong kind of file for the method, a bad pair
and an unknown hyperparameter are 400s that say what is wrong; a DPO step's metrics become the job's
events and results columns. The end-to-end run (a DPO job trained by the worker) needs the training
run to take objective dpo (qforge.train.run.prepare): until it does, that test is an expected failure
naming why."""
import csv
import io
import json

import openai
import pytest
import torch

from qforge.jobs.api import JobsConfig, JobService, install
from qforge.jobs.worker import metric_event, results_csv
from qforge.model.load import load_model
from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app
from qforge.train.config import TrainConfig

from tests.serve.helpers import LiveServer

from .helpers import TINY_HP, InProcessService, chat_rows, jsonl, pair_rows, wait_for

KEY = "pref-key"
DPO_STEP = {"step": 3, "loss": 0.61, "lr": 1e-4, "tokens": 96, "grad_norm": 0.5, "rewards/chosen": 0.02,
            "rewards/rejected": -0.03, "rewards/accuracies": 0.75, "rewards/margins": 0.05, "logps/chosen": -12.5,
            "logps/rejected": -14.0}


@pytest.fixture(scope="module")
def live(tiny_base, tmp_path_factory):
    """The API without a worker: jobs are validated and queued, nothing trains."""
    model, tokenizer = load_model(str(tiny_base), compute_dtype=torch.float32)
    registry = AdapterRegistry(model, "tiny")
    engine = Engine(model, tokenizer, registry, max_batch=2)
    config = JobsConfig(data_dir=tmp_path_factory.mktemp("pref-jobs"), base_model=str(tiny_base), start_worker=False)
    jobs = JobService(config, registry)
    app = create_app(engine, registry, api_keys=[KEY],
                     extensions=[lambda app, state, caller: install(app, state, caller, jobs)])
    jobs.start()
    with LiveServer(app) as server:
        server.jobs = jobs
        yield server
    jobs.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pairs_file(client):
    return client.files.create(file=("pairs.jsonl", jsonl(pair_rows(6))), purpose="fine-tune")


@pytest.fixture(scope="module")
def sft_file(client):
    return client.files.create(file=("train.jsonl", jsonl(chat_rows(6))), purpose="fine-tune")


def queued(client, job_id):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status != "validating_files" and j,
                    30, what="validation")


def dpo(**hp) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": {**TINY_HP, **hp}}}


def test_a_dpo_job_on_preference_pairs_is_queued_with_its_beta(client, pairs_file, live):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, validation_file=pairs_file.id,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job.status == "validating_files" and job.method.type == "dpo"
    job = queued(client, job.id)
    assert job.status == "queued", job.error
    hp = job.method.dpo.hyperparameters.model_dump()
    assert hp["beta"] == 0.2 and hp["n_epochs"] >= 1 and hp["learning_rate_multiplier"] == 1.0
    assert hp["label_smoothing"] == 0.0 and hp["method"] in ("qlora", "lora")
    cfg = TrainConfig.from_yaml(live.jobs.store.job_dir(job.id) / "config.yaml")
    assert cfg.objective == "dpo" and cfg.beta == 0.2 and cfg.label_smoothing == 0.0
    assert cfg.data.endswith("train.jsonl") and cfg.eval_data.endswith("valid.jsonl")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)]
    assert any(m.startswith("Preference tuning: DPO, beta 0.2;") for m in messages), messages
    assert messages[0] == "Files validated, moving job to queued state"


def test_openais_dpo_hyperparameters_and_qforges_own_settings(client, pairs_file, live):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, method=dpo(
        beta=0.5, n_epochs=2, learning_rate_multiplier=2.0, batch_size=2, label_smoothing=0.1))
    job = queued(client, job.id)
    cfg = TrainConfig.from_yaml(live.jobs.store.job_dir(job.id) / "config.yaml")
    assert (cfg.objective, cfg.beta, cfg.label_smoothing, cfg.epochs, cfg.batch_size) == ("dpo", 0.5, 0.1, 2, 2)
    assert cfg.lr == pytest.approx(2 * TrainConfig().lr)
    assert (cfg.method, cfg.rank, cfg.max_seq_len) == ("qlora", TINY_HP["rank"], TINY_HP["max_seq_len"])
    auto_hp = {"beta": "auto", "n_epochs": "auto"}
    auto = client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id,
                                          method={"type": "dpo", "dpo": {"hyperparameters": auto_hp}})
    hp = queued(client, auto.id).method.dpo.hyperparameters.model_dump()
    assert hp["beta"] == TrainConfig().beta and hp["n_epochs"] == TrainConfig().epochs


def test_an_orpo_job_in_openais_shape(client, pairs_file, live):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id,
                                         method={"type": "orpo", "orpo": {"hyperparameters": {"beta": 0.3}}})
    job = queued(client, job.id)
    assert job.method.type == "orpo"
    cfg = TrainConfig.from_yaml(live.jobs.store.job_dir(job.id) / "config.yaml")
    assert cfg.objective == "orpo" and cfg.beta == 0.3
    with pytest.raises(openai.BadRequestError) as caught:  # DPO's smoothing is not ORPO's
        client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id,
                                       method={"type": "orpo", "orpo": {"hyperparameters": {"label_smoothing": 0.1}}})
    assert caught.value.body["param"] == "method.orpo.hyperparameters.label_smoothing"


def test_a_supervised_file_for_a_dpo_job_is_refused_naming_the_file_and_line(client, sft_file, live):
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, method=dpo(beta=0.2))
    body = caught.value.body
    assert body["param"] == "training_file" and body["code"] == "invalid_training_file"
    assert "train.jsonl:1: not a preference row" in body["message"] and "preferred_output" in body["message"]
    assert str(live.jobs.store.root) not in body["message"] and sft_file.id not in body["message"]


def test_a_preference_file_for_a_supervised_job_is_refused(client, pairs_file, sft_file):
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id)
    body = caught.value.body
    assert body["param"] == "training_file" and "'pairs.jsonl'" in body["message"]
    assert "preference pairs" in body["message"] and "'dpo'" in body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # the validation file too
        client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, validation_file=pairs_file.id)
    assert caught.value.body["param"] == "validation_file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, validation_file=sft_file.id,
                                       method=dpo())
    assert caught.value.body["param"] == "validation_file" and "train.jsonl:1" in caught.value.body["message"]


def test_an_unknown_hyperparameter_is_refused_with_the_accepted_ones(client, pairs_file):
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id,
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "gamma": 1}}})
    body = caught.value.body
    assert body["param"] == "method.dpo.hyperparameters.gamma" and body["code"] == "unknown_parameter"
    accepted = body["message"].split("accepted: ", 1)[1].split(", ")
    assert {"beta", "batch_size", "learning_rate_multiplier", "n_epochs", "label_smoothing", "rank"} <= set(accepted)
    assert "'gamma'" in body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # supervised: the same, without beta
        client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, method={
            "type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}})
    assert caught.value.body["param"] == "method.supervised.hyperparameters.beta"
    assert "rank" in caught.value.body["message"].split("accepted: ", 1)[1]
    for method, param in (({"type": "dpo", "supervised": {"hyperparameters": {}}}, "method.supervised"),
                          ({"type": "reinforcement"}, "method.type"),
                          (dpo(beta=0), "method.dpo.hyperparameters.beta"),
                          (dpo(label_smoothing=0.5), "method.dpo.hyperparameters.label_smoothing")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, method=method)
        assert caught.value.body["param"] == param, caught.value.body


def test_a_bad_pair_is_refused_at_upload_with_its_line(client, live):
    rows = pair_rows(3)
    del rows[1]["non_preferred_output"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("mine.jsonl", jsonl(rows)), purpose="fine-tune")
    message = caught.value.body["message"]
    assert "mine.jsonl:2:" in message and "non_preferred_output" in message
    assert str(live.jobs.store.root) not in message
    trl = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]  # TRL's shape is stored as pairs too
    stored = client.files.create(file=("trl.jsonl", jsonl(trl)), purpose="fine-tune")
    assert live.jobs.store.get_file(stored.id)["format"] == "preference-trl"


def test_the_trainer_process_passes_the_objective_to_the_training_run(client, pairs_file, live, monkeypatch):
    from qforge.jobs import trainer_child
    from qforge.train import run as train_run

    job = queued(client, client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id,
                                                        method=dpo(beta=0.25, label_smoothing=0.05)).id)
    seen = {}

    class FakeRun:
        def train(self):
            return type("Result", (), {"interrupted": False})()

        def save(self):
            return {"tokens": 1}

    def prepare(cfg, log=print, group=None):
        seen["cfg"] = cfg
        return FakeRun()

    monkeypatch.setattr(train_run, "prepare", prepare)
    outcome = trainer_child.train(live.jobs.store.job_dir(job.id), job.id, live.jobs.store)
    assert outcome["status"] == "succeeded"
    cfg = seen["cfg"]
    assert (cfg.objective, cfg.beta, cfg.label_smoothing) == ("dpo", 0.25, 0.05)
    assert cfg.data == str(live.jobs.store.job_dir(job.id) / "train.jsonl")


def test_a_dpo_steps_metrics_become_its_event_and_results_columns(tmp_path):
    event = metric_event({**DPO_STEP, "eval_loss": 0.7, "eval_rewards/accuracies": 0.5}, total_steps=10)
    data = event["data"]
    assert event["type"] == "metrics" and data["step"] == 3 and data["train_loss"] == 0.61
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert data[name] == DPO_STEP[name]
    assert data["valid_loss"] == 0.7 and data["valid_rewards/accuracies"] == 0.5
    assert "reward accuracy=0.75" in event["message"] and "reward margin=0.0500" in event["message"]
    sft = metric_event({"step": 1, "loss": 2.0, "lr": 1e-4, "tokens": 9}, total_steps=2)
    assert not any(k.startswith("rewards/") for k in sft["data"]) and "reward" not in sft["message"]

    (tmp_path / "metrics.jsonl").write_text(json.dumps(DPO_STEP) + "\n")
    table = list(csv.DictReader(io.StringIO(results_csv(tmp_path).decode())))
    assert table[0]["rewards/accuracies"] == "0.75" and table[0]["train_loss"] == "0.61"


# ---- end to end: the worker trains a DPO job ---------------------------------------------------------
def test_a_dpo_job_runs_to_success_with_reward_events(tiny_base, tmp_path):
    with InProcessService(tiny_base, tmp_path / "data") as service:
        client = openai.OpenAI(base_url=service.url, api_key="none", max_retries=0, timeout=60)
        pairs = client.files.create(file=("pairs.jsonl", jsonl(pair_rows(8))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=pairs.id, suffix="dpo",
                                             method=dpo(beta=0.2, max_steps=3))
        job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in (
            "succeeded", "failed", "cancelled") and j, 300, 0.5, "the DPO job to finish")
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:tiny:dpo:{job.id}"
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))[::-1]
        metrics = [e.data for e in events if e.type == "metrics"]
        assert [m["step"] for m in metrics] == [1, 2, 3]
        for m in metrics:
            assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(m), m
            assert 0.0 <= m["rewards/accuracies"] <= 1.0
        header = client.files.content(job.result_files[0]).text.splitlines()[0]
        assert "rewards/accuracies" in header and "rewards/margins" in header
