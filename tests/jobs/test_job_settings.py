"""The jobs API takes qforge's settings where users put them: the top-level `hyperparameters` (as in
OpenAI's older API) and `method.<type>.hyperparameters`, one schema; an unknown key is a 400 that
lists the accepted ones. No worker: jobs stay queued, nothing trains."""
import openai
import pytest

from qforge.jobs.schemas import DpoHyperparameters, QForgeHyperparameters

from .helpers import InProcessService, chat_rows, jsonl, wait_for

KEY = "settings-key"


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory):
    with InProcessService(tiny_base, tmp_path_factory.mktemp("settings"), keys=[KEY], start_worker=False) as live:
        yield live


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sft_file(client):
    return client.files.create(file=("chat.jsonl", jsonl(chat_rows(6))), purpose="fine-tune")


def settings_of(client, job_id: str) -> dict:
    job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status != "validating_files" and j,
                   30, what="validation")
    assert job.status == "queued", job.error
    return job.method.supervised.hyperparameters.model_dump()


def test_qforge_settings_at_the_top_level_are_taken(client, sft_file):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, hyperparameters={
        "max_steps": 3, "max_seq_len": 96, "rank": 4, "n_epochs": 2, "method": "lora"})
    hp = settings_of(client, job.id)
    assert (hp["max_steps"], hp["max_seq_len"], hp["rank"], hp["n_epochs"], hp["method"]) == (3, 96, 4, 2, "lora")
    assert hp["alpha"] == 8.0  # 2 x the rank given at the top level


def test_the_methods_own_settings_win_over_the_top_level(client, sft_file):
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=sft_file.id, hyperparameters={"rank": 4, "max_steps": 2},
        method={"type": "supervised", "supervised": {"hyperparameters": {"rank": 8}}})
    hp = settings_of(client, job.id)
    assert hp["rank"] == 8 and hp["max_steps"] == 2


@pytest.mark.parametrize("hyperparameters, unknown", [
    ({"max_steps": 3, "learning_rate": 0.1}, "learning_rate"),
    ({"beta": 0.2}, "beta"),  # a preference setting, not a supervised one
])
def test_an_unknown_top_level_key_lists_the_accepted_ones(client, sft_file, hyperparameters, unknown):
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, hyperparameters=hyperparameters)
    body = caught.value.body
    assert body["param"] == f"hyperparameters.{unknown}" and body["code"] == "unknown_parameter"
    assert f"'{unknown}'" in body["message"]
    accepted = body["message"].split("accepted: ", 1)[1].split(", ")
    assert accepted == list(QForgeHyperparameters.model_fields)
    assert {"max_steps", "max_seq_len", "rank", "n_epochs"} <= set(accepted) and "beta" not in accepted


def test_a_bad_top_level_value_names_its_field(client, sft_file):
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, hyperparameters={"max_seq_len": 4})
    assert caught.value.body["param"] == "hyperparameters.max_seq_len"


def test_the_two_places_share_one_schema():
    from qforge.jobs.schemas import JobBody, TopHyperparameters

    assert JobBody.model_fields["hyperparameters"].annotation == TopHyperparameters | None
    assert set(TopHyperparameters.model_fields) == set(DpoHyperparameters.model_fields)
