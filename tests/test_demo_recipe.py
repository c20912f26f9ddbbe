from pathlib import Path

import yaml

from qforge.commands.demo import DEMO_RECIPE
from qforge.train.config import TrainConfig


def test_configs_demo_yaml_is_the_recipe_the_demo_runs():
    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    on_disk = yaml.safe_load(path.read_text())
    for key, value in DEMO_RECIPE.items():
        assert on_disk[key] == value, key
    TrainConfig.from_yaml(path)  # and it is a valid recipe
