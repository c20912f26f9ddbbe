"""`qforge eval`: one server (started in-process) for a tiny base and two adapters, both shipped lm-eval
tasks per model, one table (markdown + JSON) and a bar chart; and the report's pure parts."""
import json

import pytest
import torch

from qforge.cli import main
from qforge.eval import harness
from qforge.model.load import load_model

from tests.fixtures import tiny_model_folder
from tests.serve.helpers import save_random_adapters


@pytest.mark.slow
def test_qforge_eval_writes_one_table_for_base_and_adapters(tmp_path, capsys):
    base = tiny_model_folder(tmp_path / "tiny")
    model, _ = load_model(str(base), compute_dtype=torch.float32)
    paths = save_random_adapters(model, tmp_path / "adapters", ["a", "b"], seed=5)
    out = tmp_path / "eval"
    rc = main(["eval", "--base", str(base), "--adapter", f"a={paths['a']}", "--adapter", f"b={paths['b']}",
               "--models", "base,a,b", "--tasks", "qforge_mc,qforge_gen", "--output-dir", str(out), "--limit", "4"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert list(report["results"]) == ["base", "a", "b"]
    for by_task in report["results"].values():
        assert set(by_task) == {"qforge_mc", "qforge_gen"}
        assert set(by_task["qforge_mc"]) == {"acc", "acc_norm"} and set(by_task["qforge_gen"]) == {"exact_match"}
        assert all(0 <= v <= 1 for m in by_task.values() for v in m.values())
    table = (out / "eval.md").read_text().splitlines()
    assert table[2] == "| model | qforge_gen exact_match | qforge_mc acc | qforge_mc acc_norm |"
    rows = {line.split(" | ")[0].strip("| "): line for line in table[4:]}
    assert set(rows) == {"base", "a", "b"}
    assert f"{100 * report['results']['a']['qforge_mc']['acc']:.1f}" in rows["a"]
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "table:" in capsys.readouterr().out


@pytest.mark.slow
def test_unknown_models_and_tasks_are_one_line_errors(tmp_path, capsys):
    base = tiny_model_folder(tmp_path / "tiny")
    assert main(["eval", "--base", str(base), "--models", "base,nope", "--output-dir", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", "--base", str(base), "--tasks", "no_such_task", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_markdown_table_in_percent():
    results = {"base": {"t": {"acc": 0.5}}, "x": {"t": {"acc": 0.75}, "u": {"em": 1.0}}}
    assert harness.markdown_table(results).splitlines() == [
        "| model | t acc | u em |", "|---|---:|---:|", "| base | 50.0 | - |", "| x | 75.0 | 100.0 |"]


def test_bench_eval_tasks_serves_the_adapters_of_the_nf4_base(monkeypatch, tmp_path):
    from qforge.commands import bench, eval as eval_command

    seen = {}
    monkeypatch.setattr(eval_command, "evaluate_adapters",
                        lambda base, adapters, tasks, out, limit: seen.update(base=base, adapters=adapters,
                                                                              tasks=tasks, limit=limit) or {})
    records = [{"method": m, "status": s, "adapter_dir": f"/runs/{m}/adapter" if m != "full" else None}
               for m, s in (("qlora", "ok"), ("lora", "ok"), ("full", "ok"), ("loftq", "ok"), ("qdora", "failed"))]
    bench.bench_eval(records, "smollm2", "qforge_mc, qforge_extract", tmp_path, 5)
    assert seen == {"base": "smollm2", "adapters": {"qlora": "/runs/qlora/adapter", "lora": "/runs/lora/adapter"},
                    "tasks": ["qforge_mc", "qforge_extract"], "limit": 5}
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--eval-tasks", "qforge_mc", "--eval-limit", "3"])
    assert (args.eval_tasks, args.eval_limit) == ("qforge_mc", 3)
