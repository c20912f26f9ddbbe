"""Portable adapter files: base_model_name_or_path is a Hub id or an absolute path, so PEFT's
AutoPeftModelForCausalLM finds the base in the Hugging Face cache (offline) or on disk; model cards."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from qforge.adapters import save_adapter
from qforge.adapters.model_card import CARD_MARKER, model_card, portable_base_id, write_card

from .conftest import dequantized_base, logits, qforge_with_adapter, rel_err, tiny_dense, VOCAB

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

READER = """
import sys, torch
from peft import AutoPeftModelForCausalLM
ids = torch.load(sys.argv[1])
for i, adapter in enumerate(sys.argv[3:]):
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, f"{sys.argv[2]}.{i}")
"""


def test_portable_base_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    assert portable_base_id("smollm2") == portable_base_id("SmolLM2") == HUB_ID
    assert portable_base_id("base") == str(tmp_path / "base")
    assert portable_base_id("org/some-model") == "org/some-model" and portable_base_id(None) is None


def fill_hub_cache(cache: Path, repo_id: str, model) -> Path:
    """A Hugging Face cache holding `model` under `repo_id`, as hf_hub_download lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    model.save_pretrained(str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_auto_peft_model_finds_the_base_offline(tmp_path, monkeypatch):
    dense = tiny_dense()
    qmodel = qforge_with_adapter(dense)
    base = dequantized_base(qmodel, dense)   # the base the adapter was trained against, as plain weights
    fill_hub_cache(tmp_path / "hub", HUB_ID, base)
    base.save_pretrained(str(tmp_path / "local-base"))
    save_adapter(qmodel, tmp_path / "ad-hub", base_model_name_or_path="smollm2")
    monkeypatch.chdir(tmp_path)
    save_adapter(qmodel, tmp_path / "ad-path", base_model_name_or_path="local-base")   # relative: made absolute
    assert json.loads((tmp_path / "ad-hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert json.loads((tmp_path / "ad-path" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "local-base")
    card = (tmp_path / "ad-hub" / "README.md").read_text()
    assert f"base_model: {HUB_ID}" in card and "library_name: peft" in card

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "ids.pt"), str(tmp_path / "out"),
                           str(tmp_path / "ad-hub"), str(tmp_path / "ad-path")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runtime = logits(qmodel, ids)
    for i in range(2):
        assert rel_err(torch.load(tmp_path / f"out.{i}"), runtime) < 1e-4


def test_model_card_says_the_run_and_never_replaces_a_foreign_readme(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": "qlora", "steps_done": 20, "final_loss": 0.41234567,
                                                  "final_eval_loss": 0.5}))
    (run / "config.yaml").write_text("data: chats.jsonl\nquant_type: nf4\n")
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": False}
    card = model_card(HUB_ID, cfg, "merged", run / "adapter")
    for fact in (f"base_model: {HUB_ID}", "library_name: transformers", "**Training method:** qlora",
                 "**Training data:** chats.jsonl", "**Steps:** 20", "**Final training loss:** 0.4123",
                 "**Final eval loss:** 0.5", "r=8, alpha=16", CARD_MARKER):
        assert fact in card, fact
    assert write_card(tmp_path, card) == tmp_path / "README.md"
    (tmp_path / "README.md").write_text("# my own notes\n")
    assert write_card(tmp_path, card) is None and (tmp_path / "README.md").read_text() == "# my own notes\n"
