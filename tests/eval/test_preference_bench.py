"""The preference task built from the demo task: the preferred reply is the row's JSON, the
non-preferred one the same JSON with exactly one field wrong; the figures follow TRL's definitions."""
import json

import pytest

from qforge.eval.preference_bench import make_pairs, preference_figures
from qforge.eval.tasks import KEYS, expected_object, make_task_rows
from qforge.train.preference_data import load_preference_rows


def test_pairs_differ_in_one_field_and_read_as_openai_rows(tmp_path):
    rows = make_task_rows(60, 0, 0, seed=3)["train"]
    pairs = make_pairs(rows, seed=1)
    wrong_keys = set()
    for row, pair in zip(rows, pairs):
        right = json.loads(pair["preferred_output"][0]["content"])
        wrong = json.loads(pair["non_preferred_output"][0]["content"])
        assert right == expected_object(row) and list(wrong) == list(KEYS)
        differ = [k for k in KEYS if right[k] != wrong[k]]
        assert len(differ) == 1 and type(right[differ[0]]) is type(wrong[differ[0]])
        wrong_keys.add(differ[0])
        assert pair["input"]["messages"] == row["messages"][:-1]
    assert wrong_keys == set(KEYS)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert load_preference_rows(path)[1] == "openai"
    assert make_pairs(rows, seed=1) == pairs  # seeded


def test_figures_follow_trl_definitions():
    policy = ([-1.0, -2.0, -3.0], [-2.0, -1.0, -5.0])
    reference = ([-1.5, -1.0, -3.0], [-1.5, -1.0, -4.0])
    f = preference_figures(policy, reference, beta=0.5)
    # rewards: chosen 0.25, -0.5, 0; rejected -0.25, 0, -0.5 -> margins 0.5, -0.5, 0.5
    assert f["reward_accuracy"] == pytest.approx(2 / 3)
    assert f["mean_margin"] == pytest.approx(0.5 / 3)
    assert f["plain_preference"] == pytest.approx(2 / 3)
    same = preference_figures(reference, reference, beta=0.1)
    assert same["reward_accuracy"] == 0.0 and same["mean_margin"] == 0.0
