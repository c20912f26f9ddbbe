"""benchmarks/long_context.py's pure parts: the rows both sides train on, the table's cells, the
last line's three ratios (nan where a side did not fit), the watchdog's kill (no model is run here)."""
import json
import math
import subprocess
import sys
import threading

import pytest

from benchmarks import long_context as lc


def rec(side, seq_len, peak, status="ok", baseline=1e8, planned=None, losses=(2.5, 2.4, 2.3)):
    return {"side": side, "seq_len": seq_len, "status": status, "peak_rss": peak, "peak_anon": peak * 0.9,
            "baseline_rss": baseline, "tokens_per_s": 100.0, "step_s": [9.0, 2.0, 4.0], "losses": list(losses),
            "planned": planned, "watchdog_max_rss": peak, "last_rss": peak}


def test_rows_follow_the_stream_and_cycle():
    assert lc.stream_rows([1, 2, 3, 4, 5], 3, 3) == [[1, 2, 3], [4, 5, 1], [2, 3, 4]]
    assert lc.stream_rows([7], 2, 1) == [[7, 7]]
    with pytest.raises(ValueError, match="stream"):
        lc.stream_rows([], 4, 1)


def test_final_line_is_the_two_growths_and_the_16k_ratio():
    results = {"qforge": {1024: rec("qforge", 1024, 1e9), 16384: rec("qforge", 16384, 1.5e9)},
               "peft": {1024: rec("peft", 1024, 2e9), 16384: rec("peft", 16384, 6e9)}}
    line, notes = lc.final_line(results)
    assert line == "qforge_growth_16k_vs_1k=1.50 peft_growth_16k_vs_1k=3.00 qforge_mem_16k_vs_peft=0.25"
    assert notes == []


def test_final_line_is_nan_where_a_side_did_not_fit_and_says_so():
    results = {"qforge": {1024: rec("qforge", 1024, 1e9), 16384: rec("qforge", 16384, 1.5e9)},
               "peft": {1024: rec("peft", 1024, 2e9), 16384: rec("peft", 16384, 2.1e10, status="did not fit")}}
    line, notes = lc.final_line(results)
    assert line == "qforge_growth_16k_vs_1k=1.50 peft_growth_16k_vs_1k=nan qforge_mem_16k_vs_peft=nan"
    assert notes == ["peft at 16384: did not fit"]
    line, notes = lc.final_line({"qforge": {1024: rec("qforge", 1024, 1e9)}})
    assert line.split() == ["qforge_growth_16k_vs_1k=nan", "peft_growth_16k_vs_1k=nan", "qforge_mem_16k_vs_peft=nan"]
    assert "peft at 1024: not run" in notes and "qforge at 16384: not run" in notes


def test_table_row_has_both_sides_the_ratio_and_the_planner_error():
    q = rec("qforge", 2048, 1.1e9, baseline=1e8, planned=1.2e9)
    p = rec("peft", 2048, 2.2e9)
    cells = [c.strip() for c in lc.table_row(2048, q, p).strip("|").split("|")]
    assert len(cells) == lc.HEADER.splitlines()[0].count("|") - 1
    assert cells[:6] == ["2048", "1.10", "0.99", "100", "3.0", "2.500"]  # step (s): the mean of steps 2..N
    assert cells[6] == "2.20" and cells[11] == "0.50"
    assert cells[12] == "1.20" and cells[13] == "+20.0%"  # planned over the peak above the import baseline
    assert cells[14] == "-"
    cells = [c.strip() for c in lc.table_row(2048, {**q, "checkpointing": "full"}, p).strip("|").split("|")]
    assert cells[14] == "full"


def test_table_row_says_what_happened_to_a_side_that_did_not_run_to_the_end():
    q = rec("qforge", 16384, 3e9)
    p = rec("peft", 16384, 2.05e10, status="did not fit", losses=())
    cells = [c.strip() for c in lc.table_row(16384, q, p).strip("|").split("|")]
    assert cells[6] == "did not fit (last 20.50 GB)" and cells[7:11] == ["-", "-", "-", "-"]
    assert cells[11] == "-"
    cells = [c.strip() for c in lc.table_row(16384, q, None).strip("|").split("|")]
    assert cells[6] == "not run"


def test_parse_list_names_the_option():
    assert lc.parse_list("1024, 2048") == [1024, 2048]
    assert lc.parse_list("peft", lc.SIDES, "--sides") == ["peft"]
    with pytest.raises(SystemExit, match="--lengths: expected comma-separated integers"):
        lc.parse_list("1k", name="--lengths")
    with pytest.raises(SystemExit, match="--sides: expected a comma-separated subset of qforge, peft"):
        lc.parse_list("trl", lc.SIDES, "--sides")


def test_watchdog_kills_a_child_above_the_limit():
    proc = subprocess.Popen([sys.executable, "-c", "import time; b = b\"x\" * (64 << 20); time.sleep(60)"])
    watch, done = {"max_rss": 0, "killed": False}, threading.Event()
    lc.watchdog(proc, 32 << 20, watch, done, every=0.05)  # returns once it has killed the child
    assert proc.wait(timeout=30) != 0
    assert watch["killed"] and watch["max_rss"] > 32 << 20


def test_watchdog_leaves_a_child_below_the_limit_alone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    watch, done = {"max_rss": 0, "killed": False}, threading.Event()
    lc.watchdog(proc, 1 << 40, watch, done, every=0.05)
    assert proc.wait(timeout=30) == 0 and not watch["killed"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "--steps: expected >= 2"),
    (["--lengths", "1024,16k"], "--lengths: expected comma-separated integers"),
    (["--lengths", "1"], "--lengths: expected integers >= 2"),
    (["--limit-gib", "0"], "--limit-gib: expected > 0"),
    (["--sides", "qforge,trl"], "--sides: expected a comma-separated subset"),
])
def test_bad_options_are_one_line_errors_naming_the_option(monkeypatch, argv, message):
    monkeypatch.setattr(sys, "argv", ["long_context.py", *argv])
    with pytest.raises(SystemExit, match=message):
        lc.main()


def test_resume_reuses_only_a_result_with_the_same_steps(tmp_path):
    path = tmp_path / "peft-1024.result.json"
    assert lc.reusable(path, 3) is None                      # nothing recorded yet
    path.write_text(json.dumps({**rec("peft", 1024, 2e9), "steps": 3}))
    assert lc.reusable(path, 3)["peak_rss"] == 2e9
    assert lc.reusable(path, 4) is None                      # another --steps: run again
    path.write_text("{")
    assert lc.reusable(path, 3) is None                      # a torn file: run again
