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
