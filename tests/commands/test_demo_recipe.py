from pathlib import Path

import yaml

from qforge.commands.demo import DEMO_RECIPE
from qforge.eval.bench import BENCH_RECIPE
from qforge.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_configs_demo_yaml_is_the_recipe_the_demo_and_the_bench_run():
    path = ROOT / "configs" / "demo.yaml"
    on_disk = yaml.safe_load(path.read_text())
    for key, value in DEMO_RECIPE.items():
        if key in ("data", "eval_data"):  # relative to the repository in the file, absolute in the package
            assert Path(value).resolve() == (ROOT / on_disk[key]).resolve(), key
        else:
            assert on_disk[key] == value, key
    for key in ("rank", "alpha", "lr", "batch_size", "max_seq_len", "optimizer", "seed"):
        assert BENCH_RECIPE[key] == on_disk[key], key
    TrainConfig.from_yaml(path)  # and it is a valid recipe
