"""`import qforge` is cheap (no torch), and its lazy names are the real objects."""
import subprocess
import sys


def test_import_qforge_does_not_import_torch():
    code = "import sys, qforge; print('torch' in sys.modules, qforge.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def test_lazy_names_resolve_to_their_modules():
    import qforge
    from qforge.adapters.merge import save_merged
    from qforge.model.load import load_model
    from qforge.nn import LoraSpec
    from qforge.quant import dequantize, quantize
    from qforge.train.config import TrainConfig
    from qforge.train.run import prepare, run_training

    assert qforge.load_model is load_model and qforge.LoraSpec is LoraSpec and qforge.TrainConfig is TrainConfig
    assert qforge.quantize is quantize and qforge.dequantize is dequantize
    assert callable(qforge.train) and qforge.merge is save_merged
    assert qforge.train.run.run_training is run_training  # and it is still the package
    assert qforge.prepare is prepare
    assert sorted(set(dir(qforge)) - {"__version__"}) == sorted(qforge._EXPORTS)


def test_qforge_train_runs_a_training(tmp_path):
    import json

    import qforge
    rows = [{"text": f"count {i} {i + 1} {i + 2}"} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tests.fixtures import smollm2_tokenizer, tiny_llama
    folder = tmp_path / "tiny"
    tiny_llama(layers=1, vocab=49152).save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    cfg = qforge.TrainConfig(model=str(folder), data=str(data), output_dir=str(tmp_path / "run"), max_steps=2,
                             batch_size=2, compute_dtype="float32", device="cpu")
    result, summary = qforge.train(cfg, log=lambda *_: None)
    assert summary["steps_done"] == 2 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_ten_line_script_quantises_and_round_trips():
    import torch

    import qforge
    w = torch.randn(64, 128)
    state = qforge.quantize(w, "nf4", 64, True)
    back = qforge.dequantize(state, torch.float32)
    assert back.shape == w.shape and 0 < float((back - w).pow(2).mean() / w.pow(2).mean()) < 0.02
