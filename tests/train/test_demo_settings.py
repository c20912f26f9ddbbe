"""`qforge demo` trains on what its recipe says: every data setting (train_on, eval_fraction, ...)
reaches the data it trains on, as for `qforge train` (both go through qforge.train.run.prepare).
A tiny random Llama in place of SmolLM2; generation is stubbed."""
import json
from argparse import Namespace

from qforge.train.config import TrainConfig
from qforge.train.run import prepare
from tests.model.conftest import tiny_dir  # noqa: F401 (a fixture)

ROWS = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"},
                      {"role": "assistant", "content": f"w{i + 3} w7"}]} for i in range(8)]


def test_demo_honours_every_data_setting_of_its_recipe(tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    import qforge.commands.demo as demo

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = dict(model=str(tiny_dir), data=str(data), eval_data=None, eval_fraction=0.25, train_on="all",
                  data_format="chat", method="qlora", rank=4, alpha=8, batch_size=2, max_seq_len=64, max_steps=1,
                  compute_dtype="float32", warmup_steps=0, save_every=0, eval_every=0, seed=0)
    monkeypatch.setattr(demo, "DEMO_RECIPE", recipe)
    monkeypatch.setattr(demo, "accuracy", lambda model, tok, rows, dtype: (0.0, [""] * len(rows)))
    out = tmp_path / "demo"
    assert demo.run(Namespace(output_dir=str(out), max_steps=None, eval_rows=2, skip_fidelity=True,
                              device="cpu")) == 0
    summary = json.loads((out / "summary.json").read_text())

    expected = prepare(TrainConfig(**dict(recipe, output_dir=str(tmp_path / "train"))), log=lambda *_: None)
    report = expected.data_report
    assert summary["data"] == str(report)
    assert report.eval_rows == 2 and report.train_rows == 6  # eval_fraction 0.25 of 8 rows
    # train_on "all": every token but each row's first is a label, the prompts' too
    assert report.trainable_tokens == report.tokens - report.train_rows
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
