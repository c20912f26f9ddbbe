"""What each of the CPU training-step changes of the kernels issue buys, in one process.

    .venv/bin/python benchmarks/train_step_ablation.py [--rounds 4]

The setting of benchmarks/train_step.py (SmolLM2-135M, batch 4 of demo-task rows, r=16 on every
linear layer, dropout 0.05, gradient checkpointing, 8-bit AdamW, bf16 autocast), one qforge QLoRA
model, with the changes switched on one after another:

  before           full recomputation, SDPA attention, the 8-bit AdamW as torch operations
  + selective      gradient checkpointing keeps the base products (qforge.nn.recompute), and
                   the LoRA variant adds B's product onto the base output with one addmm
  + attention      qforge.nn.attention (matrix products for short CPU training rows)
  + native adamw   the 8-bit AdamW step in the native kernel (= qforge's defaults)

Each round runs every configuration for 2 steps on the same 2 batches, the configurations
interleaved so that a slow spell of a shared machine hits them alike; the table gives the fastest
and the median step per token. Last line: speedup=X (before's median over the defaults' median).
"""
import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    from qforge.nn import attention, recompute
    from qforge.optim import adamw8bit
    from qforge.train.loss import causal_lm_loss

    native = adamw8bit._native_step
    torch.manual_seed(0)
    from qforge.eval.tasks import demo_task_paths
    from qforge.optim import AdamW8bit
    from qforge.train.config import TrainConfig
    from qforge.train.data import build_dataset, collate
    from qforge.train.run import load_for_method
    model, tok = load_for_method(TrainConfig(model="smollm2", method="qlora", rank=16, alpha=32, dropout=0.05))
    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train, _, _ = build_dataset(demo_task_paths()["train"], tok, max_seq_len=256)
    data = [collate([train[s * 4 + i] for i in range(4)], tok.pad_token_id) for s in range(4)]
    model.train()

    def configure(selective, attn, native_adamw):
        adamw8bit._native_step = native if native_adamw else (lambda *a: False)
        kwargs = {"use_reentrant": False,
                  "context_fn": recompute.keep_base_outputs if selective else recompute.recompute_everything}
        model.gradient_checkpointing_disable()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.set_attn_implementation(attention.register() if attn else "sdpa")

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    configs = {"before": (0, 0, 0), "+ selective": (1, 0, 0), "+ attention": (1, 1, 0), "+ native adamw": (1, 1, 1)}
    for batch in data[:2]:  # warm-up
        step(batch)
    per_token = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, flags in configs.items():
            configure(*flags)
            for batch in data[2:]:
                t = time.perf_counter()
                step(batch)
                per_token[name].append((time.perf_counter() - t) / int(batch["attention_mask"].sum()) * 1e3)
    configure(1, 1, 1)
    print(f"SmolLM2-135M QLoRA, batch 4, r=16, {args.rounds} rounds x 2 steps per configuration")
    print("| configuration | fastest (ms/token) | median (ms/token) | median vs before |")
    print("|---|---:|---:|---:|")
    base = statistics.median(per_token["before"])
    for name, values in per_token.items():
        med = statistics.median(values)
        print(f"| {name} | {min(values):.2f} | {med:.2f} | {base / med:.2f}x |")
    print(f"speedup={base / statistics.median(per_token['+ native adamw']):.2f}")


if __name__ == "__main__":
    main()
