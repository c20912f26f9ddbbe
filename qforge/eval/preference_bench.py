"""The preference bench: the demo task as preference pairs, SFT then DPO from SFT's adapter, against SFT alone.

The pairs (make_pairs): the demo task's prompt (system + sentence), the right JSON as the preferred
reply and the same JSON with ONE field wrong as the non-preferred one, in OpenAI's preference format:

    {"input": {"messages": [system, user]},
     "preferred_output": [{"role": "assistant", "content": "{\"name\": \"Maria Lopez\", \"age\": 34, ...}"}],
     "non_preferred_output": [{"role": "assistant", "content": "{\"name\": \"Maria Lopez\", \"age\": 41, ...}"}]}

The wrong field is drawn per row (seeded): another name from the task's lists, the age moved by 1-9
years, another city or another job; every other field and the key order are the right answer's.

Two phases, each `prepare(cfg) -> Run` in a fresh process (so its peak memory is its own):
    sft  the demo recipe on the demo task's train rows (batch_size rows per step)
    dpo  objective dpo on the pairs built from the same train rows, batch_size / 2 pairs per step (the
         same number of sequences, so about the same tokens per step as SFT), --adapter = SFT's
         adapter (continued) and --ref-adapter = SFT's adapter (the reference)
After DPO the model holds both adapters ("default": SFT+DPO, "reference": SFT alone), so one
process measures both on the held-out pairs (from the demo task's test rows, people never trained on):
    reward accuracy  TRL's: the share of pairs whose implicit reward beta (log pi - log ref), with
                     the SFT adapter as ref, is higher for the preferred reply (SFT alone: its rewards
                     are 0, so 0 by this definition)
    mean margin      mean of beta ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))
    plain preference the share of pairs whose summed log-prob of the right reply is higher than of
                     the wrong one, under the model alone (no reference)
    exact match      greedy generation on the test rows (qforge.eval.bench.held_out_exact_match)
Each phase's training peak is its process' peak RSS from the end of loading to the end of training
(VmHWM, reset after loading; CUDA: max_memory_allocated), so DPO's is read against SFT's at the same
sequences per step. `qforge bench --preference` and benchmarks/preference.py run it.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from .tasks import CITIES, FIRST_NAMES, JOBS, LAST_NAMES, KEYS, expected_object, prompt_messages

WRONG_KEYS = KEYS  # which field the non-preferred reply gets wrong: any of them


def wrong_value(key: str, value, rng: random.Random):
    """A different value of the same type for field `key`."""
    if key == "age":
        return value + rng.choice([-1, 1]) * rng.randint(1, 9)
    pool = {"city": CITIES, "job": JOBS}.get(key)
    if pool is None:  # name: another full name from the task's lists
        pool = [f"{f} {l}" for f in rng.sample(FIRST_NAMES, 3) for l in rng.sample(LAST_NAMES, 3)]
    choice = rng.choice(pool)
    while choice == value:
        choice = rng.choice(pool)
    return choice


def make_pair(row: dict, rng: random.Random) -> dict:
    """One demo-task chat row -> an OpenAI preference row (see the module docstring)."""
    right = expected_object(row)
    key = rng.choice(WRONG_KEYS)
    wrong = dict(right, **{key: wrong_value(key, right[key], rng)})
    reply = lambda obj: [{"role": "assistant", "content": json.dumps(obj, ensure_ascii=False)}]  # noqa: E731
    return {"input": {"messages": prompt_messages(row)}, "preferred_output": reply(right),
            "non_preferred_output": reply(wrong)}


def make_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_pair(row, rng) for row in rows]


def write_pairs(rows: list[dict], path: Path, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in make_pairs(rows, seed)),
                    encoding="utf-8")
    return path


def pair_logps(model, tok, pairs: list[dict], cfg, device, adapter: str | None, batch_pairs: int = 8):
    """Summed completion log-probs (chosen [N], rejected [N], float32 lists) of tokenised pairs under
    `adapter` (None: the base), in eval mode without gradients."""
    import torch

    from ..train.loop import autocast, collate_rows
    from ..train.preference import adapter_active, sequence_logps

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(cfg, device), adapter_active(model, adapter):
        for start in range(0, len(pairs), batch_pairs):
            batch = {k: v.to(device) for k, v in collate_rows(pairs[start:start + batch_pairs], cfg, pad_id).items()}
            logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            c, r = logps.chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
    model.train(was_training)
    return chosen, rejected


def preference_figures(policy: tuple[list, list], reference: tuple[list, list], beta: float) -> dict:
    """Reward accuracy and mean margin (TRL's definitions, reference = `reference`) and the policy's
    plain preference, from pair_logps' outputs."""
    (pc, pr), (rc, rr) = policy, reference
    rewards = [(beta * (a - b), beta * (c - d)) for a, b, c, d in zip(pc, rc, pr, rr)]
    n = max(len(rewards), 1)
    return {"reward_accuracy": sum(c > r for c, r in rewards) / n,
            "mean_margin": sum(c - r for c, r in rewards) / n,
            "plain_preference": sum(a > b for a, b in zip(pc, pr)) / n,
            "mean_logp_right": sum(pc) / n, "mean_logp_wrong": sum(pr) / n}


# ---- the two phases, each in its own process ------------------------------------------------------
DEFAULTS = {"steps": 20, "train_rows": 160, "test_rows": 100, "batch_size": 8, "beta": 0.1, "dpo_lr": 5e-5,
            "max_seq_len": 128, "model": "smollm2", "device": "auto"}


def write_task(spec: dict, out: Path) -> None:
    """The SFT rows, the DPO pairs of the same rows, the held-out rows and their pairs, under out."""
    from ..train.data import read_jsonl
    from .tasks import demo_task_paths

    paths = demo_task_paths()
    train = read_jsonl(paths["train"])[:spec["train_rows"]]
    test = read_jsonl(paths["test"])[:spec["test_rows"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    (out / "test_rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test))
    write_pairs(train, out / "dpo_train.jsonl", seed=1)
    write_pairs(test, out / "test_pairs.jsonl", seed=2)


def phase_config(phase: str, spec: dict, out: Path):
    """The TrainConfig of a phase: the demo recipe, spec's steps, batch and length; DPO with half
    the batch in pairs, SFT's adapter continued and as the reference."""
    from ..train.config import TrainConfig
    from .tasks import demo_recipe

    recipe = {k: v for k, v in demo_recipe().items() if k not in ("data", "eval_data", "output_dir")}
    recipe.update(model=spec["model"], device=spec["device"], max_steps=spec["steps"], batch_size=spec["batch_size"],
                  max_seq_len=spec["max_seq_len"], save_every=0, eval_every=0)
    if phase == "sft":
        return TrainConfig(**recipe, data=str(out / "sft_train.jsonl"), output_dir=str(out / "sft"))
    sft_adapter = str(out / "sft" / "adapter")
    return TrainConfig(**dict(recipe, batch_size=max(1, spec["batch_size"] // 2), lr=spec["dpo_lr"]),
                       objective="dpo", beta=spec["beta"], data=str(out / "dpo_train.jsonl"), adapter=sft_adapter,
                       ref_adapter=sft_adapter, output_dir=str(out / "dpo"))


def _training_peak(device, reset: bool = False) -> int:
    """Peak memory since the last reset: CUDA's max_memory_allocated, else VmHWM (Linux)."""
    import torch
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.max_memory_allocated(device))
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_phase(phase: str, spec: dict, out: Path) -> dict:
    """prepare + train + save one phase, with its training peak; DPO then measures both adapters."""
    from ..train.run import prepare

    t0 = time.perf_counter()
    run = prepare(phase_config(phase, spec, out))
    load_s = time.perf_counter() - t0
    _training_peak(run.device, reset=True)
    result = run.train()
    record = {"load_seconds": round(load_s, 1), "train_seconds": round(result.seconds, 1), "tokens": result.tokens,
              "train_peak_bytes": _training_peak(run.device), "losses": result.losses, "summary": run.save()}
    if phase == "dpo":
        record.update(measure(run, spec, out))
    return record


def measure(run, spec: dict, out: Path) -> dict:
    """The held-out figures of SFT alone ("reference") and SFT+DPO ("default")."""
    from ..model.surgery import set_active_adapter
    from ..train.preference_data import load_preference_rows, tokenize_pairs
    from .bench import held_out_exact_match

    model, tok, cfg, device = run.model, run.tokenizer, run.cfg, run.device
    pairs, _ = tokenize_pairs(load_preference_rows(out / "test_pairs.jsonl")[0], tok, cfg.max_seq_len)
    sft = pair_logps(model, tok, pairs, cfg, device, "reference")
    dpo = pair_logps(model, tok, pairs, cfg, device, "default")
    figures = {"held_out_pairs": len(pairs), "sft_alone": preference_figures(sft, sft, cfg.beta),
               "sft_dpo": preference_figures(dpo, sft, cfg.beta)}
    for name, adapter in (("sft_alone", "reference"), ("sft_dpo", "default")):
        set_active_adapter(model, adapter)
        figures[name].update(held_out_exact_match(model, tok, cfg, device, str(out / "test_rows.jsonl"),
                                                  spec["test_rows"]))
    set_active_adapter(model, "default")
    return figures


def run_in_child(phase: str, spec: dict, out: Path) -> dict:
    """run_phase in a fresh process (its peak memory its own); its record, or RuntimeError with the
    tail of its log."""
    from ..train.child import RESULT_NAME, train_in_child
    from .bench import bench_env

    folder = out / phase
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    code, result = train_in_child("qforge.eval.preference_bench", [phase, str(out)], folder / RESULT_NAME,
                                  out / f"{phase}.log", bench_env())
    if code != 0 or result is None:
        tail = (out / f"{phase}.log").read_text(errors="replace").strip().splitlines()[-8:]
        raise RuntimeError(f"preference bench: {phase} failed (exit status {code}):\n" + "\n".join(tail))
    return result


def run_preference_bench(out: str | Path, log=print, **settings) -> dict:
    """SFT then DPO (each in its own process), measured; writes out/preference.json and
    out/preference.md. Returns {"spec", "sft", "dpo", "table", "line"}."""
    out = Path(out)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown preference bench setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    spec = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    write_task(spec, out)
    t0 = time.perf_counter()
    sft = run_in_child("sft", spec, out)
    log(f"sft: {sft['train_seconds']} s training, final loss {sft['losses'][-1]:.4f}")
    dpo = run_in_child("dpo", spec, out)
    log(f"dpo: {dpo['train_seconds']} s training, final loss {dpo['losses'][-1]:.4f}")
    table, line = format_report(sft, dpo)
    summary = {"spec": spec, "sft": sft, "dpo": dpo, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "preference.json").write_text(json.dumps(summary, indent=2))
    (out / "preference.md").write_text(table + "\n\n" + line + "\n")
    return {**summary, "table": table, "line": line}


def format_report(sft: dict, dpo: dict) -> tuple[str, str]:
    """(markdown table, last line of name=value figures)."""
    a, b = dpo["sft_alone"], dpo["sft_dpo"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    head = ("| model | reward accuracy | mean margin | plain preference | exact match | training peak (GB) "
            "| tokens/s |")
    lines = [head, "|" + "---|" * 7]
    for name, f, phase in (("SFT alone", a, sft), ("SFT + DPO", b, dpo)):
        lines.append(f"| {name} | {pct(f['reward_accuracy'])} | {f['mean_margin']:.3f} | "
                     f"{pct(f['plain_preference'])} | {pct(f['exact_match'])} | {phase['train_peak_bytes'] / 1e9:.2f} "
                     f"| {phase['tokens'] / max(phase['train_seconds'], 1e-9):.0f} |")
    em = lambda x: float("nan") if x is None else x  # noqa: E731
    line = (f"reward_accuracy={b['reward_accuracy']:.3f} mean_margin={b['mean_margin']:.4f} "
            f"plain_pref_sft={a['plain_preference']:.3f} plain_pref_dpo={b['plain_preference']:.3f} "
            f"exact_sft={em(a['exact_match']):.3f} exact_dpo={em(b['exact_match']):.3f} "
            f"peak_ratio={dpo['train_peak_bytes'] / sft['train_peak_bytes']:.3f}")
    return "\n".join(lines), line


def _child_main(argv: list[str]) -> int:
    """`PHASE OUT`: run phase sft or dpo from OUT/PHASE/spec.json; result.json beside it."""
    from ..train.child import RESULT_NAME, write_result
    if len(argv) != 2 or argv[0] not in ("sft", "dpo"):
        print("usage: python -m qforge.eval.preference_bench sft|dpo OUT", file=sys.stderr)
        return 2
    phase, out = argv[0], Path(argv[1])
    spec = json.loads((out / phase / "spec.json").read_text())
    write_result(out / phase / RESULT_NAME, run_phase(phase, spec, out))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
