"""Float32 adapters, BF16 adapters, or BF16 adapters with a float32 master copy: step time, losses,
and the adapter elements each step leaves unchanged.

    .venv/bin/python benchmarks/adapter_dtype.py [--steps 8] [--warmup 2] [--repeats 2] [--lr 1e-4]

QLoRA of the embedded model (SmolLM2-135M-Instruct, NF4 + double quantisation), the demo task's
first batches (8 rows of ~80 tokens), r=16 / alpha 32 on every linear layer, dropout 0.05, bf16
autocast, gradient checkpointing as `qforge train` chooses it, qforge's 8-bit AdamW at a constant
--lr, the same A initialisation (seed 0) for every variant:

    float32       --adapter-dtype float32 (the default): the weights are float32, their products
                  run in BF16 (cast per forward, as PEFT's under autocast); the optimiser updates
                  float32 weights and gradients arrive in float32
    bfloat16      --adapter-dtype bfloat16: BF16 weights, updated in place (the update is computed
                  in float32 and rounded to BF16 once)
    bf16-master   BF16 weights and gradients, the optimiser stepping a float32 master copy and
                  copying it back rounded (the other way to keep every update; built here only)

Each variant runs in a fresh process, the variants interleaved, --repeats times; the first
--warmup steps of a process are not timed; step time is the median of the timed steps of all its
processes. Unchanged elements: per step, the share of lora_A and lora_B elements whose stored
value the step did not change (for bf16-master: of the float32 master). A's gradient is zero at
step 1 (B starts at zero), so step 1 leaves every A element unchanged in every variant.
Last line: fp32_vs_bf16_step_time=X master_vs_bf16_step_time=Y bf16_unchanged_A=U fp32_unchanged_A=V
(U, V: the mean share of A elements left unchanged over steps 2..N).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("float32", "bfloat16", "bf16-master")


class MasterAdamW:
    """qforge's AdamW8bit stepping float32 master copies of BF16 parameters; each step copies the
    updated masters back into the parameters (rounded to BF16 once)."""

    def __init__(self, params, lr: float):
        import torch
        from qforge.optim import AdamW8bit
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.inner = AdamW8bit(self.masters, lr=lr, weight_decay=0.0)
        self._torch = torch

    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        with self._torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def child(variant: str, steps: int, warmup: int, lr: float) -> dict:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_quality import lora_modules, shared_start, snapshot, unchanged_elements
    from qforge.eval.tasks import demo_task_paths
    from qforge.optim import AdamW8bit
    from qforge.train.config import TrainConfig
    from qforge.train.data import build_dataset, collate
    from qforge.train.loss import causal_lm_loss
    from qforge.train.run import load_for_method

    torch.manual_seed(0)
    cfg = TrainConfig(model="smollm2", method="qlora", rank=16, alpha=32, dropout=0.05, device="cpu",
                      adapter_dtype="float32" if variant == "float32" else "bfloat16")
    model, tok = load_for_method(cfg)
    shared_start(model)
    train, _, _ = build_dataset(demo_task_paths()["train"], tok, max_seq_len=256)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [collate([train[s * 8 + i] for i in range(8)], pad) for s in range(steps)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MasterAdamW(params, lr) if variant == "bf16-master" else AdamW8bit(params, lr=lr, weight_decay=0.0)

    def state():  # what the optimiser updates: the parameters, or the masters
        if variant != "bf16-master":
            return snapshot(model)
        index = {id(p): m for p, m in zip(opt.params, opt.masters)}
        return {n: (index[id(A)].detach().clone(), index[id(B)].detach().clone())
                for n, (A, B) in lora_modules(model).items()}

    model.train()
    times, losses, unchanged = [], [], []
    before = state()
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        after = state()
        unchanged.append(unchanged_elements(before, after))
        before = after
    return {"variant": variant, "times": times, "losses": losses, "unchanged": unchanged,
            "adapter_dtype": str(params[0].dtype).removeprefix("torch.")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="steps per process (default: 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: 2)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per variant (default: 2)")
    ap.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (default: 1e-4)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.lr)))
        return
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--lr", str(args.lr)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {v} failed (exit {proc.returncode})")
            runs[v].append(json.loads(lines[-1]))
    print(f"SmolLM2-135M QLoRA, batch 8 x ~80 tokens, r=16, lr {args.lr:g} constant, {args.steps} steps "
          f"({args.warmup} untimed), {args.repeats} processes per variant")
    print("| variant | stored dtype | median step (s) | losses | unchanged A by step | unchanged B by step |")
    print("|---|---|---:|---|---|---|")
    med, mean_a = {}, {}
    for v, rs in runs.items():
        r = rs[0]
        med[v] = statistics.median(t for x in rs for t in x["times"])
        ua = [u["A"][0] / u["A"][1] for u in r["unchanged"]]
        ub = [u["B"][0] / u["B"][1] for u in r["unchanged"]]
        mean_a[v] = statistics.mean(ua[1:]) if len(ua) > 1 else ua[0]
        print(f"| {v} | {r['adapter_dtype']} | {med[v]:.3f} | {[round(x, 4) for x in r['losses']]} "
              f"| {' '.join(f'{x:.1%}' for x in ua)} | {' '.join(f'{x:.1%}' for x in ub)} |")
    print(f"fp32_vs_bf16_step_time={med['float32'] / med['bfloat16']:.3f} "
          f"master_vs_bf16_step_time={med['bf16-master'] / med['bfloat16']:.3f} "
          f"bf16_unchanged_A={mean_a['bfloat16']:.4f} fp32_unchanged_A={mean_a['float32']:.4f}")


if __name__ == "__main__":
    main()
