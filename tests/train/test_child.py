"""qforge.train.child: a training in a child process and its result read back (the jobs worker's
trainer and the bench's methods both run through it). A stand-in child module writes the result."""
import os

from qforge.train.child import read_result, train_in_child

CHILD = """import sys
from qforge.train.child import write_result
if sys.argv[2] == "die":
    raise SystemExit(7)
write_result(sys.argv[1], {"status": "succeeded", "losses": [1.5, 1.25]})
print("trained")
"""


def run_child(tmp_path, monkeypatch, how: str):
    (tmp_path / "stand_in_trainer.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = tmp_path / "result.json"
    return train_in_child("stand_in_trainer", [str(result), how], result, tmp_path / "log.txt")


def test_the_childs_result_is_read_back_and_its_output_logged(tmp_path, monkeypatch):
    code, result = run_child(tmp_path, monkeypatch, "train")
    assert code == 0 and result == {"status": "succeeded", "losses": [1.5, 1.25]}
    assert "trained" in (tmp_path / "log.txt").read_text()


def test_a_child_that_dies_has_no_result_even_over_a_stale_file(tmp_path, monkeypatch):
    (tmp_path / "result.json").write_text('{"status": "succeeded"}')  # an earlier run's
    code, result = run_child(tmp_path, monkeypatch, "die")
    assert code == 7 and result is None
    assert read_result(tmp_path / "missing.json") is None
