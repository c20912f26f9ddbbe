"""Following a training run's folder for the jobs worker: metrics.jsonl lines become the job's
'metrics' events (exactly once: each event is keyed by its step), checkpoint folders its checkpoint
rows, and the run's metrics a results CSV."""
from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from pathlib import Path

from .db import DatabaseError
from .store import JobStore, now
from .trainer_child import DB_ERRORS_T


def _parse_metric_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        # a record cut short by a kill, with the next run's record appended to it: keep the last one
        start = line.rfind('{"step"')
        try:
            return json.loads(line[start:]) if start > 0 else None
        except json.JSONDecodeError:
            return None


# A preference step's metrics (qforge.train.preference, TRL's names): copied into its event's data as
# they are, and its evaluation's (eval_<name> in metrics.jsonl) as valid_<name>, as eval_loss is valid_loss
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def metric_event(record: dict, total_steps: int | None) -> dict:
    """One metrics.jsonl record -> the keyword arguments of its 'metrics' event (OpenAI's data keys:
    step, train_loss, valid_loss, ...; a DPO/ORPO step adds its rewards and log-probs)."""
    step = int(record["step"])
    data = {"step": step, "train_loss": record.get("loss"), "total_steps": total_steps,
            "learning_rate": record.get("lr"), "tokens": record.get("tokens"), "grad_norm": record.get("grad_norm")}
    message = f"Step {step}/{total_steps or '?'}: training loss={record.get('loss', float('nan')):.4f}"
    if record.get("rewards/accuracies") is not None:
        message += f", reward accuracy={record['rewards/accuracies']:.2f}"
    if record.get("rewards/margins") is not None:
        message += f", reward margin={record['rewards/margins']:.4f}"
    if record.get("eval_loss") is not None:
        data["valid_loss"] = record["eval_loss"]
        message += f", validation loss={record['eval_loss']:.4f}"
    for name in PREFERENCE_METRICS:
        if record.get(name) is not None:
            data[name] = record[name]
        if record.get(f"eval_{name}") is not None:
            data[f"valid_{name}"] = record[f"eval_{name}"]
    if data.get("valid_rewards/accuracies") is not None:
        message += f", validation reward accuracy={data['valid_rewards/accuracies']:.2f}"
    return {"message": message, "key": f"step:{step}", "type": "metrics", "data": data}


class Progress:
    """Follows one job's run folder: new metric lines become events, new checkpoints rows."""

    def __init__(self, store: JobStore, job: dict):
        self.store, self.job = store, job
        self.run_dir = store.job_dir(job["id"]) / "run"
        self.offset = 0
        try:
            self.steps_seen = store.metric_steps(job["id"])
        except (sqlite3.Error, DatabaseError, *DB_ERRORS_T):  # the database is down: the keys keep events single
            self.steps_seen = set()
        self.checkpoints_seen: set[int] = set()
        self.timing: list[tuple[float, int]] = []  # (monotonic, step) of this attempt's records

    def sync(self) -> None:
        self._sync_metrics()
        self._sync_checkpoints()

    def _sync_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:
                    self.offset = 0  # a fresh run truncated it
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for its newline
        events, steps, timing = [], set(), []
        for line in complete.decode(errors="replace").split("\n"):
            record = _parse_metric_line(line) if line.strip() else None
            if record is None or "step" not in record:
                continue
            step = int(record["step"])
            timing.append((time.monotonic(), step))
            if step not in self.steps_seen and step not in steps:
                steps.add(step)
                events.append(metric_event(record, self.job.get("total_steps")))
        # Stored first, then remembered: when the database is down these lines are read again at the
        # next sync (events are keyed by step, so a batch stored twice is stored once).
        self.store.add_events(self.job["id"], events)
        self.offset += len(complete)
        self.steps_seen |= steps
        self.timing += timing
        if events:
            self._estimate_finish()

    def _estimate_finish(self) -> None:
        total = self.job.get("total_steps")
        if not total or len(self.timing) < 2:
            return
        (t0, s0), (t1, s1) = self.timing[0], self.timing[-1]
        if s1 > s0:
            eta = now() + int((total - s1) * (t1 - t0) / (s1 - s0))
            self.store.update_job(self.job["id"], only_if_status=("running",), estimated_finish=eta)

    def _sync_checkpoints(self) -> None:
        folder = self.run_dir / "checkpoints"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("step-*")):
            state_file = path / "state.json"
            try:
                step = int(path.name.removeprefix("step-"))
            except ValueError:
                continue
            if step in self.checkpoints_seen or not state_file.is_file():
                continue
            state = json.loads(state_file.read_text())
            metrics = {"step": step, "train_loss": state["losses"][-1] if state.get("losses") else None}
            evals = state.get("eval_losses") or []
            if evals and evals[-1][0] == step:
                metrics["valid_loss"] = evals[-1][1]
            self.store.add_checkpoint(self.job["id"], step, metrics, str(path.relative_to(self.store.root)),
                                      created_at=int(state_file.stat().st_mtime))
            self.checkpoints_seen.add(step)


def results_csv(run_dir: Path) -> bytes:
    """step,train_loss,valid_loss,learning_rate,tokens: one row per step (a replayed step once); a
    preference run adds a column for each of its metrics (qforge.jobs.worker.PREFERENCE_METRICS)."""
    rows: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            record = _parse_metric_line(line) if line.strip() else None
            if record and "step" in record:
                rows.setdefault(int(record["step"]), record)
    extra = [n for n in PREFERENCE_METRICS if any(r.get(n) is not None for r in rows.values())]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "train_loss", "valid_loss", "learning_rate", "tokens", *extra])
    for step in sorted(rows):
        r = rows[step]
        writer.writerow([step, r.get("loss"), r.get("eval_loss", ""), r.get("lr"), r.get("tokens"),
                         *(r.get(n, "") for n in extra)])
    return out.getvalue().encode()


# ---- the worker ------------------------------------------------------------------------------
