"""The bench's HQQ methods: QLoRA over HQQ 4/3/2-bit bases, beside NF4 QLoRA and BF16 LoRA."""
from qforge.eval import bench


def test_hqq_methods_map_to_their_train_configs(tmp_path):
    recipe = bench.default_recipe()
    for bits in (4, 3, 2):
        cfg = bench.method_config(f"qlora-hqq{bits}", recipe, tmp_path / str(bits))
        assert (cfg.method, cfg.quant_type, cfg.hqq_group_size) == ("qlora", f"hqq{bits}", 64)
        assert (cfg.max_steps, cfg.lr, cfg.seed) == (recipe["max_steps"], recipe["lr"], recipe["seed"])
    assert {"qlora-hqq4", "qlora-hqq3", "qlora-hqq2"} <= set(bench.BENCH_METHODS)


def test_prepare_model_builds_no_bitsandbytes_copy_for_hqq(monkeypatch):
    from qforge.model import load
    built = []
    monkeypatch.setattr(load, "smollm2_folder", lambda: None)
    monkeypatch.setattr(load, "smollm2_quantized_folder", lambda quant: built.append(quant["quant_type"]))
    bench.prepare_model("smollm2", ["qlora", "qlora-hqq3", "qlora-hqq2", "lora"])
    assert built == ["nf4"]
