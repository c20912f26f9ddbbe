"""lm-evaluation-harness against `qforge serve`: the `lm_eval` command with `--model local-completions`
on an adapter served over the embedded SmolLM2-135M-Instruct's NF4 base gives the same metrics as
lm-eval's own `hf` backend on the merged model (dequantised base + adapter, float32), on the two
offline tasks that qforge ships (a log-likelihood multiple choice and a generate-until task). Then
`qforge eval` runs both tasks for the base and two adapters on one server and writes its table."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qforge.adapters import save_merged
from qforge.app import ServeConfig, build_server
from qforge.eval import harness

from tests.serve.helpers import LiveServer, saved_random_adapter

pytestmark = pytest.mark.slow
TASKS = ["qforge_mc", "qforge_gen"]


def lm_eval_cli(url, model, tokenizer, include, out):
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"base_url={url}/completions,model={model},tokenizer={tokenizer},tokenizer_backend=huggingface",
           "--tasks", ",".join(TASKS), "--include_path", str(include), "--output_path", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"}, timeout=900)
    found = sorted(out.rglob("results*.json"))
    return {t: harness._metrics(v) for t, v in json.loads(found[-1].read_text())["results"].items()}


def test_lm_eval_through_the_server_matches_the_hf_backend_on_the_merged_model(tmp_path):
    app, engine = build_server(ServeConfig(dtype="float32", max_batch=4))
    model, tokenizer = engine.model, engine.tokenizer
    folder = saved_random_adapter(model, tmp_path, "tuned", seed=1, scale=0.02, keep=True,
                                  base_model_name_or_path="smollm2")
    engine.registry.attach("tuned")
    merged = save_merged(model, tokenizer, tmp_path / "merged", name="tuned", dtype=torch.float32)
    include = harness.prepare_tasks(tmp_path / "work")
    try:
        with LiveServer(app) as live:
            ours = lm_eval_cli(live.url, "tuned", merged, include, tmp_path / "out")
    finally:
        engine.stop()
    assert folder.is_dir()
    del model, engine, app
    theirs = harness.evaluate("hf", {"pretrained": str(merged), "dtype": "float32", "device": "cpu"}, TASKS, include)
    print("served:", ours, "\nhf merged:", theirs)
    assert set(ours) == set(theirs) == set(TASKS)
    for task in TASKS:
        assert set(ours[task]) == set(theirs[task])
        for metric, value in theirs[task].items():
            assert abs(ours[task][metric] - value) <= 0.005, (task, metric, ours[task][metric], value)
    assert ours["qforge_mc"]["acc"] > 0.5  # the model really answers (a random pick scores 0.25)
