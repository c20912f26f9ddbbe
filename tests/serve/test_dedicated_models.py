"""DedicatedModels without a job: loads run in the background (a request meanwhile is told to
retry), at most max_models stay loaded (the least recently used idle one is stopped), a folder
that cannot load is a clear error for its requests, and the routing engine sends a dedicated
model's requests to its own engine as that engine's base."""
import pytest
import torch

from qforge.serve.dedicated import DedicatedModels
from qforge.serve.engine import QueueFull, RequestError

from tests.fixtures import tiny_model_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedicated")
    return [tiny_model_folder(root / name) for name in ("m1", "m2", "m3")]


@pytest.mark.slow
def test_loads_in_the_background_and_keeps_at_most_max_models(folders):
    models = DedicatedModels(torch.float32, torch.device("cpu"), max_models=2)
    try:
        for folder in folders:
            models.add(folder.name, folder, preload=False)
        with pytest.raises(QueueFull, match="'m1' is being loaded; retry"):
            models.engine("m1")
        first = models.wait_loaded("m1", timeout=120)
        assert models.engine("m1") is first and first.alive
        models.wait_loaded("m2", timeout=120)
        third = models.wait_loaded("m3", timeout=120)  # m1, the least recently used, makes room
        assert not first.alive and third.alive and sorted(models._engines) == ["m2", "m3"]
        assert third.generate([1, 2, 3], params=None).output_ids  # a real engine over m3's weights
    finally:
        models.stop()


def test_a_folder_that_cannot_load_is_a_clear_error(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folders[0] / "config.json").read_text())  # no weights
    models = DedicatedModels(torch.float32, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="holds no model"):
        models.add("none", tmp_path)
    models.add("broken", broken)
    with pytest.raises(RequestError, match="model 'broken' cannot be served") as err:
        models.wait_loaded("broken", timeout=60)
    assert err.value.param == "model"
    models.stop()


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_only_a_full_run_writes_a_whole_model(method, tiny_base, tmp_path):
    """Run.save: an adapter for qlora (no model folder, so the jobs service serves it as an adapter),
    the whole model (transformers loads it, with the trained weights) for full."""
    import json

    from transformers import AutoModelForCausalLM

    from qforge.train.config import TrainConfig
    from qforge.train.run import prepare
    from tests.jobs.helpers import chat_rows, jsonl

    (tmp_path / "train.jsonl").write_bytes(jsonl(chat_rows(4)))
    cfg = TrainConfig(model=str(tiny_base), data=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "run"),
                      method=method, max_steps=1, batch_size=2, max_seq_len=64, compute_dtype="float32",
                      save_every=0, lr=1e-2)
    run = prepare(cfg, log=lambda *_: None)
    run.train()
    summary = run.save()
    out = tmp_path / "run"
    assert summary["model"] == str(tiny_base)  # the base, as before
    assert (out / "model").exists() == (method == "full") == ("model_dir" in summary)
    assert (out / "adapter").exists() == (method != "full")
    if method == "full":
        saved = AutoModelForCausalLM.from_pretrained(summary["model_dir"], dtype=torch.float32).state_dict()
        trained = run.model.state_dict()
        common = [k for k in saved if k in trained]
        assert len(common) == len(saved) and all(torch.equal(saved[k], trained[k].float()) for k in common)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).state_dict()
        assert not torch.equal(saved["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
        assert json.loads((out / "summary.json").read_text()) == summary
