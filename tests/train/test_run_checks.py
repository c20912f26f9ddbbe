"""A run's checks before loading, its TensorBoard events, its chat template saved with the adapter, and
parameter counts as PEFT prints them. Tiny random Llama; a run takes seconds."""
import json

import pytest

from qforge.train.config import TrainConfig
from qforge.train.data import DataError
from tests.model.conftest import tiny_dir, tiny_tokenizer, write_tiny  # noqa: F401 (tiny_dir: a fixture)

ROWS = [{"conversations": [{"from": "human", "value": f"w{i} w{i + 1}"}, {"from": "gpt", "value": f"w{i + 2} w7"}]}
        for i in range(6)]


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A tiny Llama folder whose tokenizer has no chat template."""
    folder = write_tiny(tmp_path_factory.mktemp("bare"))
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(str(folder))
    return folder


def recipe(tmp_path, model_dir, **kw):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = dict(model=str(model_dir), data=str(data), method="qlora", rank=4, alpha=8, batch_size=2,
                    max_seq_len=64, max_steps=2, compute_dtype="float32", output_dir=str(tmp_path / "out"),
                    eval_fraction=0.34, eval_every=1, warmup_steps=0, lr=1e-3)
    return TrainConfig(**{**settings, **kw})


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model is a test failure: the checks must fail first."""
    import qforge.train.run as run

    def refuse(*_args, **_kw):
        raise AssertionError("the model was loaded before the checks failed")
    monkeypatch.setattr(run, "load_for_method", refuse)


@pytest.mark.parametrize("change, error, message", [
    ({"data": "missing.jsonl"}, DataError, r"missing\.jsonl: no such file"),
    ({"bad_row": True}, DataError, r"chats\.jsonl:7: conversations\[0\]: unknown from 'bot'"),
    ({"output_dir": "a_file"}, ValueError, r"output_dir '.*a_file' is a file"),
    ({"chat_template": "zephyr"}, ValueError, r"chat template 'zephyr': not a built-in"),
    ({"model": "no/such-model"}, FileNotFoundError, r"model 'no/such-model' is not in the Hugging Face cache"),
    ({"model": "./nowhere"}, FileNotFoundError, r"model './nowhere' not found"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, bare_model, no_model_load, monkeypatch,
                                                  change, error, message):
    from qforge.train.run import run_training
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "a_file").write_text("")
    bad_row = change.pop("bad_row", False)
    cfg = recipe(tmp_path, bare_model, **change)
    if bad_row:
        with open(cfg.data, "a") as f:
            f.write(json.dumps({"conversations": [{"from": "bot", "value": "w1"}]}) + "\n")
    with pytest.raises(error, match=message):
        run_training(cfg, log=lambda *_: None)


def test_wandb_without_its_package_is_a_clear_error(tmp_path, bare_model, no_model_load):
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    from qforge.train.run import run_training
    with pytest.raises(ValueError, match=r"--report-to wandb needs the wandb package \(pip install wandb\)"):
        run_training(recipe(tmp_path, bare_model, report_to="tensorboard,wandb"), log=lambda *_: None)


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {tag: [t.tensor_proto.string_val[0].decode() for t in events.Tensors(tag)]
             for tag in events.Tags()["tensors"]}
    return scalars, texts


def test_run_with_chat_template_and_tensorboard(tmp_path, bare_model):
    """chat rows on a tokenizer with no template train with chat_template=chatml; the template is
    saved with the adapter's tokenizer; TensorBoard's events hold the metrics.jsonl values."""
    pytest.importorskip("tensorboard")
    from qforge.train.run import run_training
    from qforge.model.templates import read_template

    cfg = recipe(tmp_path, bare_model, chat_template="chatml", report_to="tensorboard")
    result, summary = run_training(cfg, log=lambda *_: None)
    out = tmp_path / "out"
    saved = json.loads((out / "adapter" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == read_template("chatml")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, texts = read_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx([r["lr"] for r in records], rel=1e-6)
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([r["eval_loss"] for r in records], rel=1e-6)
    assert all(v > 0 for _, v in scalars["train/tokens_per_second"] + scalars["train/memory_mib"])
    assert "chat_template: chatml" in texts["recipe/text_summary"][0]


def test_parameter_counts_match_peft(tiny_dir):
    """A 4-bit weight counts its elements (as PEFT prints them), not its packed bytes."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from qforge.train.run import count_parameters, load_for_method

    model, _ = load_for_method(TrainConfig(model=str(tiny_dir), rank=4, alpha=8, compute_dtype="float32",
                                           keep_base_outputs=False))
    oracle = peft.get_peft_model(LlamaForCausalLM.from_pretrained(str(tiny_dir)),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert count_parameters(model) == oracle.get_nb_trainable_parameters()


def test_wandb_runs_offline_unless_logged_in_with_the_recipe_as_config(tmp_path, monkeypatch):
    """W&B through its own client (a stand-in module here): offline without a login, the recipe as
    the run's config, one log call per step with the same scalars TensorBoard gets."""
    import sys
    import types

    from qforge.train.tracking import Trackers

    calls = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = TrainConfig(report_to="wandb", rank=8, wandb_project="p1")
    trackers = Trackers(cfg, tmp_path)
    trackers.log({"step": 1, "loss": 2.5, "lr": 1e-4, "tokens": 100, "elapsed_s": 2.0, "grad_norm": 0.5})
    trackers.log({"step": 2, "loss": 2.0, "lr": 2e-4, "tokens": 300, "elapsed_s": 3.0, "eval_loss": 1.5})
    trackers.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "p1"
    assert calls["init"]["config"]["rank"] == 8 and calls["init"]["config"]["report_to"] == "wandb"
    (s1, v1), (s2, v2) = calls["log"]
    assert (s1, s2) == (1, 2) and v1["train/loss"] == 2.5 and v2["eval/loss"] == 1.5
    assert (v1["train/tokens_per_second"], v2["train/tokens_per_second"]) == (50.0, 200.0)
    assert calls["finished"]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    Trackers(cfg, tmp_path).close()
    assert calls["init"]["mode"] == "online"


def test_training_on_a_hub_id_from_the_cache(tmp_path, bare_model, monkeypatch):
    """`model: ORG/NAME` trains on the cached snapshot; the adapter names the Hub id as its base."""
    import shutil

    from qforge.train.run import run_training

    repo = tmp_path / "hub" / "models--tinyorg--bare"
    shutil.copytree(bare_model, repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = recipe(tmp_path, "tinyorg/bare", chat_template="chatml", max_steps=1, eval_fraction=0.0, eval_every=0)
    _, summary = run_training(cfg, log=lambda *_: None)
    assert summary["steps_done"] == 1
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tinyorg/bare"


def test_prepare_decides_once_and_train_calls_back_beside_the_trackers(tmp_path, bare_model):
    """prepare(cfg) -> Run: cfg final (keep_base_outputs decided by the plan, per-epoch settings
    resolved), the model, data and device set up and config.yaml written, nothing trained; Run.train
    calls on_step after every step; Run.save writes the adapter and summary.json."""
    from qforge.train.run import Plan, prepare

    cfg = recipe(tmp_path, bare_model, chat_template="chatml", evals_per_epoch=1, eval_every=0)
    run = prepare(cfg, log=lambda *_: None)
    assert run.cfg.keep_base_outputs is not None and isinstance(run.plan, Plan)
    assert run.plan.keep_base_outputs == run.cfg.keep_base_outputs
    assert run.cfg.eval_every == 2  # evals_per_epoch 1 over 4 training rows in batches of 2
    assert run.device.type == "cpu" and run.sharding == {}
    assert len(run.train_set) == 4 and len(run.eval_set) == 2
    assert 0 < run.trainable_parameters < run.total_parameters
    assert (run.output_dir / "config.yaml").is_file() and not (run.output_dir / "summary.json").exists()
    steps = []
    result = run.train(on_step=lambda record: steps.append(record["step"]))
    assert steps == [1, 2] and len(result.losses) == 2
    summary = run.save()
    assert json.loads((run.output_dir / "summary.json").read_text()) == summary
    assert (run.output_dir / "adapter" / "adapter_model.safetensors").is_file()
