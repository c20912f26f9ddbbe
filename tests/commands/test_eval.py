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
def test_adapters_of_two_bases_are_evaluated_on_two_servers(tmp_path, capsys):
    """An adapter trained on the NF4 base and one trained on the dense base (their qforge_base.json):
    `qforge eval` serves each on its own base, one table; the dense one's scores equal those of
    --adapter-base overriding nothing, and serving it on NF4 instead is what --adapter-base d=nf4 does."""
    from qforge.model.serving import load_serving_model

    base = tiny_model_folder(tmp_path / "tiny")
    nf4_model, _ = load_model(str(base), compute_dtype=torch.float32)
    dense_model, _ = load_serving_model(str(base), "none", compute_dtype=torch.float32)
    paths = {**save_random_adapters(nf4_model, tmp_path / "adapters", ["q"], seed=5),
             **save_random_adapters(dense_model, tmp_path / "adapters", ["d"], seed=6)}
    assert json.loads((paths["d"] / "qforge_base.json").read_text())["quant_type"] == "none"
    out = tmp_path / "eval"
    argv = ["eval", "--base", str(base), "--adapter", f"q={paths['q']}", "--adapter", f"d={paths['d']}",
            "--models", "base,q,d", "--tasks", "qforge_mc", "--output-dir", str(out), "--limit", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "server 1 on " in printed and "(nf4): base, q" in printed and "server 2 on " in printed
    assert "(dense): d" in printed and "server 3" not in printed
    report = json.loads((out / "eval.json").read_text())
    assert list(report["results"]) == ["base", "q", "d"] and report["served_on"]["d"].endswith("(dense)")
    assert main(argv + ["--adapter-base", "d=nf4", "--output-dir", str(tmp_path / "eval2")]) == 0
    assert "server 2" not in capsys.readouterr().out  # one server: both adapters on NF4


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


def test_bench_eval_tasks_serves_each_method_on_its_own_base(monkeypatch, tmp_path):
    from qforge.commands import bench, eval as eval_command

    seen = {}
    monkeypatch.setattr(eval_command, "evaluate_adapters",
                        lambda base, adapters, tasks, out, limit, full: seen.update(
                            base=base, adapters=adapters, tasks=tasks, limit=limit, full=full) or {})
    records = [{"method": m, "status": s, "adapter_dir": f"/runs/{m}/adapter" if m != "full" else None,
                **({"model_dir": "/runs/full/model"} if m == "full" else {})}
               for m, s in (("qlora", "ok"), ("lora", "ok"), ("full", "ok"), ("loftq", "ok"), ("qdora", "failed"))]
    bench.bench_eval(records, "smollm2", "qforge_mc, qforge_extract", tmp_path, 5)
    assert seen == {"base": "smollm2", "adapters": {"qlora": "/runs/qlora/adapter", "lora": "/runs/lora/adapter"},
                    "tasks": ["qforge_mc", "qforge_extract"], "limit": 5, "full": {"full": "/runs/full/model"}}
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--eval-tasks", "qforge_mc", "--eval-limit", "3"])
    assert (args.eval_tasks, args.eval_limit) == ("qforge_mc", 3)


def _adapter_folder(root, name, record=None, run_config=None):
    folder = root / name / "adapter"
    folder.mkdir(parents=True)
    if record is not None:
        (folder / "qforge_base.json").write_text(json.dumps(record))
    if run_config is not None:
        (folder.parent / "config.yaml").write_text(run_config)
    return folder


def test_each_adapter_is_evaluated_on_the_base_it_was_trained_on(tmp_path):
    from qforge.commands.eval import EvalOptions, adapter_base, server_plans

    nf4 = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16"}
    dense = {"quant_type": "none", "blocksize": None, "double_quant": None, "compute_dtype": "bfloat16"}
    folders = {"qlora": _adapter_folder(tmp_path, "qlora", nf4), "lora": _adapter_folder(tmp_path, "lora", dense),
               "old_lora": _adapter_folder(tmp_path, "old_lora", None, "method: lora\n"),
               "old_hqq": _adapter_folder(tmp_path, "old_hqq", None, "method: qlora\nquant_type: hqq4\n"),
               "peft": _adapter_folder(tmp_path, "peft")}
    assert [adapter_base(f) for f in folders.values()] == ["nf4", "none", "none", "hqq4", "nf4"]
    assert adapter_base(folders["lora"], "nf4") == "nf4"  # --adapter-base wins over the record
    options = EvalOptions(base="tiny", adapters=list(folders.items()), full=[("full", tmp_path / "ft")],
                          adapter_bases={"peft": "none"})
    plans = server_plans(options, ["base", "qlora", "lora", "full", "old_lora", "old_hqq", "peft"])
    assert [(p.base, p.quant_type) for p in plans] == [("tiny", "nf4"), ("tiny", "none"), (str(tmp_path / "ft"), "none"),
                                                       ("tiny", "hqq4")]
    assert [list(p.models) for p in plans] == [["base", "qlora"], ["lora", "old_lora", "peft"], ["full"], ["old_hqq"]]
    assert [n for n, _ in plans[1].adapters] == ["lora", "old_lora", "peft"] and plans[2].adapters == []
    assert plans[0].models == {"base": None, "qlora": "qlora"}
    with pytest.raises(ValueError, match="'nope'.*--adapter or --full"):
        server_plans(options, ["nope"])


def test_two_bases_make_two_servers_and_one_table(tmp_path, monkeypatch):
    """evaluate_models with an adapter on NF4 and one on the dense base: two servers, each given only
    its models, and one report with every model in the asked order and the base it was served on."""
    from qforge.commands import eval as eval_command

    folders = {"q": _adapter_folder(tmp_path, "q", {"quant_type": "nf4"}),
               "d": _adapter_folder(tmp_path, "d", {"quant_type": "none"})}
    started = []

    def fake_server(plan, options, tasks, include, tokenizer):
        started.append((plan.quant_type, dict(plan.adapters), list(plan.models)))
        return {m: {"qforge_mc": {"acc": 0.5 if plan.quant_type == "nf4" else 0.75}} for m in plan.models}

    monkeypatch.setattr(eval_command, "_on_server", fake_server)
    monkeypatch.setattr(harness, "check_tasks", lambda tasks, include: None)
    options = eval_command.EvalOptions(base="tiny", adapters=list(folders.items()), output_dir=str(tmp_path / "out"))
    results = eval_command.evaluate_models(options, ["d", "base", "q"], ["qforge_mc"])
    assert started == [("none", {"d": folders["d"]}, ["d"]), ("nf4", {"q": folders["q"]}, ["base", "q"])]
    assert list(results) == ["d", "base", "q"] and results["d"]["qforge_mc"]["acc"] == 0.75
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["served_on"] == {"d": "tiny (dense)", "base": "tiny (nf4)", "q": "tiny (nf4)"}
    table = (tmp_path / "out" / "eval.md").read_text()
    assert "| d | 75.0 |" in table and "| q | 50.0 |" in table


def test_bad_adapter_base_flags_are_one_line_errors(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "o")]
    assert main(["eval", "--adapter", f"a={tmp_path}", "--adapter-base", "a=int8"] + out) == 2
    assert "--adapter-base" in capsys.readouterr().err
    assert main(["eval", "--adapter", f"a={tmp_path}", "--adapter-base", "b=none"] + out) == 2
    assert "which no --adapter gives" in capsys.readouterr().err
    assert main(["eval", "--full", "nodir"] + out) == 2
    assert "--full 'nodir': expected NAME=VALUE" in capsys.readouterr().err
