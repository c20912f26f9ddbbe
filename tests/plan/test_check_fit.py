"""`qforge train`'s memory check: plan.check_fit / warn_if_unfit say when a run will not fit and
which single change would make it fit."""
from qforge.plan import CPU_BF16, check_fit, plan_for_config, plan_run, warn_if_unfit
from qforge.train.config import TrainConfig

GB = 10**9


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "smollm2", "method": "lora", "batch_size": 4, "max_seq_len": 256,
                          "rank": 16, "gradient_checkpointing": False, **kw})


def test_plan_for_config_is_plan_run_at_max_seq_len_with_cpu_constants():
    cfg = config()
    expected = plan_run("smollm2", "lora", seq_len=256, batch_size=4, rank=16, gradient_checkpointing=False,
                        constants=CPU_BF16, chunked_loss=True, residual_bytes=4)  # lora's default: float32
    assert plan_for_config(cfg) == expected
    narrow = plan_run("smollm2", "lora", seq_len=256, batch_size=4, rank=16, gradient_checkpointing=False,
                      constants=CPU_BF16, chunked_loss=True, residual_bytes=2)
    assert plan_for_config(config(residual_dtype="bfloat16")) == narrow
    assert plan_for_config(cfg, device="cuda").total > expected.total  # the CUDA context and slack


def test_a_run_that_fits_says_so():
    fits, message = check_fit(config(), None, 100 * GB)
    assert fits and message.startswith("plan: lora")


def test_tiny_memory_fits_nothing():
    fits, message = check_fit(config(), None, 10**6)
    assert not fits
    assert "may not fit" in message and "Nothing smaller fits" in message


def test_the_message_names_each_change_that_fits():
    cfg = config()
    need = plan_for_config(cfg).total
    qlora = plan_for_config(cfg, method="qlora").total
    checkpointing = plan_for_config(cfg, gradient_checkpointing=True).total
    budget = max(qlora, checkpointing) + 1
    assert budget < need
    fits, message = check_fit(cfg, "smollm2", budget)
    assert not fits
    assert "--method qlora" in message and "--gradient-checkpointing" in message
    assert "--batch-size" in message and "--grad-accum" in message  # a smaller batch, same effective batch


def test_a_smaller_batch_keeps_the_effective_batch():
    cfg = config(gradient_checkpointing=True, method="qlora", batch_size=8, grad_accum=2)
    budget = plan_for_config(cfg, batch_size=2).total + 1
    fits, message = check_fit(cfg, None, budget)
    assert not fits and "--batch-size 2 --grad-accum 8" in message


def test_warn_if_unfit_logs_a_warning_with_tiny_memory():
    lines = []
    assert warn_if_unfit(config(), log=lines.append, device="cpu", available_bytes=10**6) is False
    assert len(lines) == 1 and lines[0].startswith("warning: this run may not fit")
    lines.clear()
    assert warn_if_unfit(config(), log=lines.append, device="cpu", available_bytes=100 * GB) is True
    assert lines == []


def test_warn_if_unfit_reads_available_ram_and_accepts_a_transformers_config():
    from transformers import AutoConfig

    from qforge.plan import load_arch
    hf_config = AutoConfig.for_model(**load_arch("smollm2"))
    lines = []
    assert warn_if_unfit(config(method="qlora", batch_size=1), hf_config, log=lines.append, device="cpu")
    assert lines == []  # a 135M model fits this machine's RAM


def test_a_model_the_planner_cannot_read_is_not_checked(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    lines = []
    assert warn_if_unfit(config(model=str(gguf)), log=lines.append, device="cpu", available_bytes=10**6)
    assert len(lines) == 1 and "memory not checked" in lines[0]


def test_qforge_train_warns_before_loading_a_run_that_does_not_fit(monkeypatch, tmp_path):
    from qforge.plan import policy
    from qforge.train import run

    class Loaded(Exception):
        pass

    def stop_at_load(cfg, device=None):
        raise Loaded

    monkeypatch.setattr(policy, "available_memory", lambda device="cpu": 10**8)
    monkeypatch.setattr(run, "load_for_method", stop_at_load)
    lines = []
    (tmp_path / "train.jsonl").write_text('{"text": "a row: the data is checked before the plan"}\n')
    cfg = config(data=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "out"))
    try:
        run.run_training(cfg, log=lines.append)
    except Loaded:
        pass
    assert lines and lines[0].startswith("warning: this run may not fit") and "0.10 GB" in lines[0]
    assert "Would fit" in lines[0] or "Nothing smaller fits" in lines[0]


# ---- selective checkpointing: keep_base_outputs (auto, explicit) -------------------------------
def test_auto_keeps_base_outputs_only_when_the_plan_with_them_fits_in_80_percent():
    from qforge.plan import AUTO_KEEP_SHARE, keep_base_outputs_for
    cfg = config(method="qlora", gradient_checkpointing=True)
    without = plan_for_config(cfg).total
    kept = plan_for_config(cfg, keep_base_outputs=True).total
    # the term: every layer's base products, bf16, per token (SmolLM2: 30 x 5184 x 2 bytes x 1024 tokens)
    assert kept - without == 30 * (576 + 2 * 192 + 576 + 2 * 1536 + 576) * 2 * 4 * 256
    keep, why = keep_base_outputs_for(cfg, available_bytes=int(kept / AUTO_KEEP_SHARE) + 1)
    assert keep and "keeps the base products" in why
    keep, why = keep_base_outputs_for(cfg, available_bytes=int(kept / AUTO_KEEP_SHARE) - 1)
    assert not keep and "recomputes everything" in why and "80%" in why
    # an explicit setting wins; full fine-tuning and runs without checkpointing keep nothing
    assert keep_base_outputs_for(config(method="qlora", gradient_checkpointing=True, keep_base_outputs=False),
                                 available_bytes=100 * GB)[0] is False
    assert keep_base_outputs_for(config(method="qlora", gradient_checkpointing=True, keep_base_outputs=True),
                                 available_bytes=1)[0] is True
    assert keep_base_outputs_for(config(method="full", gradient_checkpointing=True), available_bytes=100 * GB) == (False, "")
    assert keep_base_outputs_for(config(method="qlora"), available_bytes=100 * GB) == (False, "")


def test_an_explicit_keep_that_does_not_fit_is_told_to_turn_it_off():
    cfg = config(method="qlora", gradient_checkpointing=True, keep_base_outputs=True)
    kept, without = plan_for_config(cfg).total, plan_for_config(cfg, keep_base_outputs=False).total
    fits, message = check_fit(cfg, None, (kept + without) // 2)
    assert not fits and "--no-keep-base-outputs" in message


def test_cli_flag_is_auto_unless_given():
    import argparse

    from qforge.commands.train import add_arguments, config_and_recipe
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_and_recipe(parser.parse_args([]))[0].keep_base_outputs is None
    assert config_and_recipe(parser.parse_args(["--keep-base-outputs"]))[0].keep_base_outputs is True
    assert config_and_recipe(parser.parse_args(["--no-keep-base-outputs"]))[0].keep_base_outputs is False
    assert "80%" in parser.format_help()


def test_on_cuda_the_keep_is_sized_from_mem_get_info(monkeypatch):
    """device "cuda": the free memory is torch.cuda.mem_get_info's (injected here), not RAM."""
    import torch

    from qforge.plan import AUTO_KEEP_SHARE, keep_base_outputs_for
    cfg = config(method="qlora", gradient_checkpointing=True)
    kept = plan_for_config(cfg, "smollm2", "cuda", keep_base_outputs=True).total
    asked = []
    for free, expected in ((int(kept / AUTO_KEEP_SHARE) + 1, True), (int(kept / AUTO_KEEP_SHARE) - 1, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: asked.append(device) or (free, 2 * free))
        assert keep_base_outputs_for(cfg, "smollm2", "cuda")[0] is expected
    assert asked == [torch.device("cuda")] * 2


def test_a_run_of_n_processes_is_sized_as_one_rank_of_n():
    """qforge train --nproc N: each process holds one rank's share (qforge.plan.per_rank), not the
    one-process run; a GPU's memory is its own, the host's RAM is shared by the machine's processes."""
    from qforge.plan import CUDA_BF16, per_rank
    cfg = config(method="qlora", gradient_checkpointing=True)
    run = dict(seq_len=256, batch_size=4, rank=16, gradient_checkpointing=True, chunked_loss=True,
               residual_bytes=4)  # qlora's default residual: float32
    one = plan_for_config(cfg, device="cuda")
    four = plan_for_config(cfg, device="cuda", world=4)
    assert one.per_gpu_total == one.total
    assert four.per_gpu_total == per_rank("smollm2", "qlora", world=4, constants=CUDA_BF16, **run)["total"]
    assert four.total == one.total  # the whole run's working set is the same
    budget = (four.per_gpu_total + one.per_gpu_total) // 2
    assert four.per_gpu_total < budget < one.per_gpu_total
    assert check_fit(cfg, None, budget, "cuda")[0] is False
    fits, message = check_fit(cfg, None, budget, "cuda", world=4)
    assert fits and "per process of 4" in message
    lines = []  # on the CPU the four processes of this machine share its RAM: a quarter each
    ram = 2 * plan_for_config(cfg, device="cpu", world=4).per_gpu_total
    assert warn_if_unfit(cfg, log=lines.append, device="cpu", available_bytes=ram, world=1) is True
    assert warn_if_unfit(cfg, log=lines.append, device="cpu", available_bytes=ram, world=4) is False
    assert len(lines) == 1 and "per process of 4" in lines[0]


def test_offload_base_sizes_the_device_side():
    """--offload-base: the plan counts the blocks of 4-bit base resident on the device, not all of it."""
    from qforge.plan import CUDA_BF16, per_rank
    cfg = config(method="qlora", gradient_checkpointing=True, offload_base=True)
    plan = plan_for_config(cfg, device="cuda")
    run = dict(seq_len=256, batch_size=4, rank=16, gradient_checkpointing=True, chunked_loss=True,
               residual_bytes=4)  # qlora's default residual: float32
    assert plan.per_gpu_total == per_rank("smollm2", "qlora", offload_base=True, constants=CUDA_BF16, **run)["total"]
    assert plan.per_gpu_total < plan.total
    fits, message = check_fit(cfg, None, (plan.per_gpu_total + plan.total) // 2, "cuda")
    assert fits and "base offloaded" in message
