"""The job service's state: one SQLite database (WAL mode) beside the uploaded files and job folders.

  <data dir>/qforge.db          files, jobs, events, checkpoints (schema: qforge/jobs/migrations)
  <data dir>/files/<file id>    uploaded training data, and result CSVs; names never come from clients
  <data dir>/jobs/<job id>/     config.yaml (the TrainConfig), train.jsonl / valid.jsonl (hard links to
                                the uploads), run/ (checkpoints, metrics.jsonl, adapter), train.log

Two processes write: the API (uploads, new jobs, validation, cancel) and the worker (claims, progress,
results). Every write is one short `BEGIN IMMEDIATE` transaction; readers never block writers (WAL).
Idempotence is in the keys: an event with a `key` is stored once per job (a training step replayed
after a crash does not add a second metric event), a checkpoint once per (job, step), a results file
under an id derived from its job. So whatever was committed before a kill -9 is there after it, once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from pathlib import Path

from .db import check_sqlite, migrate_sqlite

BUSY_TIMEOUT_S = 30.0
OUR_FILE = re.compile(r"^file-[A-Za-z0-9]+\.(jsonl|csv)$")  # the only names the orphan sweep may remove
ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")

_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_COLUMNS = {"metadata", "hyperparameters", "method", "error", "result_files", "data", "metrics"}


class TooManyJobs(Exception):
    """The owner already has `limit` jobs validating, queued or running."""

    def __init__(self, limit: int, active: int):
        super().__init__(f"{active} jobs are already validating, queued or running for this key: the limit is "
                         f"{limit} (--max-jobs-per-key); wait for one to finish or cancel one")
        self.limit, self.active = limit, active


def new_id(prefix: str) -> str:
    """'<prefix>-' and 24 random hex digits: unguessable, so ids can be handed out safely."""
    return f"{prefix}-{secrets.token_hex(12)}"


def derived_id(prefix: str, *parts: object) -> str:
    """A stable id for something derived from other ids (a job's checkpoint or results file), so that
    writing it twice after a crash names the same row."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:24]
    return f"{prefix}-{digest}"


def now() -> int:
    return int(time.time())


def _row(row: sqlite3.Row | None) -> dict | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = _load(out[key])
    return out


def _load(text: str):
    """A JSON column, as JSON can give it back: NaN/Infinity (which older versions stored) become
    null and lone surrogates U+FFFD, so no stored row can make a listing fail."""
    value = json.loads(text, parse_constant=lambda name: None)
    return _valid_text(value) if "\\ud" in text.lower() else value


def _valid_text(value):
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    return value


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)


class JobStore:
    """The database and the folders under `data_dir`; safe to use from many threads and processes
    (each call opens its own connection). qforge.jobs.pg.PgStore is the same over PostgreSQL."""

    single_worker = True  # one worker per data dir (a file lock); PostgreSQL's store allows many
    orphan_grace_s = 0.0  # the sweep runs before any upload is in flight (one server per SQLite store)

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir).expanduser().resolve()
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        for folder in (self.root, self.files_dir, self.jobs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "qforge.db"
        check_sqlite(self.db_path, self.root)  # DatabaseError (one line) for a bad database
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
        migrate_sqlite(self.db_path)  # the tables come from the migrations, as on PostgreSQL
        # One idle connection held for the store's life: SQLite removes the -wal and -shm files when
        # its last connection closes and makes them again at the next open, which fails on a full
        # disk ("disk I/O error" on a mere read). Held open, they stay, and reads go on.
        self._keeper = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self._keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()

    @contextlib.contextmanager
    def _connect(self):
        db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")  # a committed row survives the machine, not only the process
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction, taking the write lock at once (no upgrade deadlocks)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _one(self, sql: str, args=()) -> dict | None:
        with self._connect() as db:
            return _row(db.execute(sql, args).fetchone())

    def _all(self, sql: str, args=()) -> list[dict]:
        with self._connect() as db:
            return [_row(r) for r in db.execute(sql, args).fetchall()]

    # ---- paths ------------------------------------------------------------------------------
    def file_path(self, file_id: str, purpose: str = "fine-tune") -> Path:
        return self.files_dir / (file_id + (".csv" if purpose == "fine-tune-results" else ".jsonl"))

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ---- files ------------------------------------------------------------------------------
    def add_file(self, file_id: str, owner: str, filename: str, purpose: str, size: int, rows: int | None,
                 fmt: str | None, db: sqlite3.Connection | None = None) -> dict:
        """Record a stored file; a second call with the same id is a no-op (results files)."""
        sql = ("INSERT OR IGNORE INTO files (id, owner, filename, purpose, bytes, created_at, rows, format) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        args = (file_id, owner, filename, purpose, size, now(), rows, fmt)
        if db is not None:
            db.execute(sql, args)
            return {}
        with self.transaction() as tx:
            tx.execute(sql, args)
        return self.get_file(file_id, owner)

    def get_file(self, file_id: str, owner: str | None = None) -> dict | None:
        """The file's row; None when it does not exist or (with `owner`) belongs to someone else."""
        row = self._one("SELECT * FROM files WHERE id = ?", (file_id,))
        return row if row is not None and (owner is None or row["owner"] == owner) else None

    def list_files(self, owner: str, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   ascending: bool = False) -> tuple[list[dict], bool]:
        """(rows, has_more), newest first unless `ascending`; `after` is the id the last page ended with."""
        where, args = ["owner = ?"], [owner]
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            # the cursor must be the caller's own: another key's id pages like an unknown one
            where.append(f"seq {'>' if ascending else '<'} (SELECT seq FROM files WHERE id = ? AND owner = ?)")
            args += [after, owner]
        sql = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?"
        rows = self._all(sql, (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def delete_file(self, file_id: str, owner: str) -> bool:
        """Forget the file's row, then remove its bytes (a crash between leaves an orphan that
        `sweep_orphan_files` removes at the next start; never a row without bytes)."""
        with self.transaction() as db:
            row = _row(db.execute("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone())
            if row is None:
                return False
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id, row["purpose"]).unlink(missing_ok=True)
        return True

    def sweep_orphan_files(self) -> list[str]:
        """Remove files under files/ that no row names (an upload or delete cut short), older than
        `orphan_grace_s` (PostgreSQL: other replicas may be between storing an upload and recording
        it). Call before this server's uploads can be in flight."""
        with self._connect() as db:
            known = {r[0] for r in db.execute("SELECT id FROM files")}
        removed, cutoff = [], time.time() - self.orphan_grace_s
        for path in self.files_dir.iterdir():
            ours = OUR_FILE.match(path.name) or path.name.startswith(".upload-file-")
            orphan = path.name.startswith(".") or path.name.split(".")[0] not in known
            if ours and orphan and path.is_file() and (not self.orphan_grace_s or path.stat().st_mtime < cutoff):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    # ---- jobs -------------------------------------------------------------------------------
    def add_job(self, job: dict, events: list[tuple[str, str | None]] = (), max_active: int | None = None) -> dict:
        """Insert a new job (status validating_files) with its first message events [(message, key)].
        With `max_active`: TooManyJobs (nothing stored) when the owner already has that many jobs
        validating, queued or running (counted in the same transaction, so concurrent creates cannot
        both slip under the limit)."""
        columns = ("id", "owner", "created_at", "model", "training_file", "validation_file", "suffix", "seed",
                   "metadata", "hyperparameters", "method", "status")
        values = [job[c] if c not in _JSON_COLUMNS else _dump(job[c]) for c in columns]
        with self.transaction() as db:
            if max_active is not None:
                self._lock_owner(db, job["owner"])
                active = self.active_jobs(job["owner"], db)
                if active >= max_active:
                    raise TooManyJobs(max_active, active)
            db.execute(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values)
            for message, key in events:
                self._event(db, job["id"], message, key=key)
        return self.get_job(job["id"])

    def get_job(self, job_id: str, owner: str | None = None) -> dict | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return row if row is not None and (owner is None or row["owner"] == owner) else None

    def job_status(self, job_id: str) -> str | None:
        row = self._one("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else row["status"]

    def succeeded_models(self) -> list[dict]:
        """id, owner, model and fine_tuned_model of every succeeded job, oldest first."""
        return self._all("SELECT id, owner, model, fine_tuned_model FROM jobs WHERE status = 'succeeded' "
                         "AND fine_tuned_model IS NOT NULL ORDER BY seq")

    def job_for_model(self, model: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ?", (model,))

    def list_jobs(self, owner: str | None = None, after: str | None = None, limit: int = 20,
                  status: str | None = None) -> tuple[list[dict], bool]:
        """(rows, has_more), newest first; `after` is the job id the previous page ended with."""
        where, args = ["1 = 1"], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if after:  # with an owner, the cursor must be its own: another key's id pages like an unknown one
            where.append("seq < (SELECT seq FROM jobs WHERE id = ?" + (" AND owner = ?)" if owner is not None else ")"))
            args += [after] + ([owner] if owner is not None else [])
        rows = self._all(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                         (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def update_job(self, job_id: str, only_if_status: tuple[str, ...] | None = None,
                   events: list[tuple[str, str | None]] = (), level: str = "info", **fields) -> bool:
        """Set `fields` on the job (JSON columns encoded), and add message events, in one
        transaction; with `only_if_status`, only while the job has one of those statuses. Returns
        whether the job was updated (events are added only then)."""
        sets = ", ".join(f"{k} = ?" for k in fields) or "id = id"
        args = [(_dump(v) if k in _JSON_COLUMNS else v) for k, v in fields.items()]
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args.append(job_id)
        if only_if_status:
            sql += f" AND status IN ({', '.join('?' * len(only_if_status))})"
            args += list(only_if_status)
        with self.transaction() as db:
            updated = db.execute(sql, args).rowcount == 1
            if updated:
                for message, key in events:
                    self._event(db, job_id, message, key=key, level=level)
        return updated

    def claim_next_job(self, worker_pid: int) -> dict | None:
        """Atomically take the next job to run: one left 'running' by a worker that died (it
        resumes), else the next 'queued' one in the fair order (`next_queued`), which becomes
        'running'. None when there is none. A job another live worker is running is never taken."""
        with self.transaction() as db:
            running = db.execute("SELECT id, status, train_pid, worker_pid FROM jobs WHERE status = 'running' "
                                 "ORDER BY seq").fetchall()
            row = next((r for r in running if r["worker_pid"] in (None, worker_pid)
                        or not worker_alive(r["worker_pid"])), None) or self.next_queued(db)
            if row is None:
                return None
            resumed = row["status"] == "running"
            db.execute("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), "
                       "attempts = attempts + 1, worker_pid = ?, train_pid = NULL WHERE id = ?",
                       (now(), worker_pid, row["id"]))
            if not resumed:
                self._event(db, row["id"], "Fine-tuning job started", key="started")
        job = self.get_job(row["id"])
        job["resumed"], job["stale_train_pid"] = resumed, row["train_pid"]
        return job

    def next_queued(self, db, lock: str = ""):
        """The queued job to start next, round robin by owner: the owner with the fewest running
        jobs, then the one whose last job started longest ago, then the one that started fewest, goes
        first, with its oldest queued job; so one key's thousand queued jobs delay another key's
        first job by at most one job per worker. `lock`: PostgreSQL's row-locking clause."""
        owners = db.execute(
            "SELECT owner, SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS running, "
            "COALESCE(MAX(started_at), 0) AS last_start, COUNT(started_at) AS started, "
            "MIN(CASE WHEN status = 'queued' THEN seq END) AS oldest FROM jobs "
            "WHERE owner IN (SELECT owner FROM jobs WHERE status = 'queued') GROUP BY owner").fetchall()
        for owner in sorted(owners, key=lambda r: (r["running"], r["last_start"], r["started"], r["oldest"])):
            row = db.execute("SELECT id, status, train_pid, worker_pid, lease_owner FROM jobs WHERE status = 'queued' "
                             f"AND owner = ? ORDER BY seq LIMIT 1{lock}", (owner["owner"],)).fetchone()
            if row is not None:
                return row
        return None

    def active_jobs(self, owner: str, db=None) -> int:
        """How many of `owner`'s jobs are validating, queued or running."""
        sql = f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ({', '.join('?' * len(ACTIVE))})"
        if db is not None:
            return db.execute(sql, (owner, *ACTIVE)).fetchone()[0]
        with self._connect() as conn:
            return conn.execute(sql, (owner, *ACTIVE)).fetchone()[0]

    def _lock_owner(self, db, owner: str) -> None:
        """Serialise job creation per owner (SQLite: BEGIN IMMEDIATE already serialises every write)."""

    def renew_lease(self, job_id: str, worker_pid: int) -> bool:
        """One worker per SQLite store: its hold on a job never lapses (see PgStore for leases)."""
        return True

    def complete_job(self, job_id: str, fine_tuned_model: str, trained_tokens: int | None,
                     results_file: dict | None) -> bool:
        """Mark a running job succeeded, with its model name and results file row, in one
        transaction; False (and nothing written) when the job is no longer running (cancelled)."""
        with self.transaction() as db:
            row = db.execute("SELECT status, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "running":
                return False
            result_files = []
            if results_file is not None:
                self.add_file(owner=row["owner"], db=db, **results_file)
                result_files.append(results_file["file_id"])
            db.execute("UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?, finished_at = ?, "
                       "trained_tokens = ?, result_files = ?, train_pid = NULL, estimated_finish = NULL "
                       "WHERE id = ?", (fine_tuned_model, now(), trained_tokens, json.dumps(result_files), job_id))
            self._event(db, job_id, f"New fine-tuned model created: {fine_tuned_model}", key="model-created",
                        data={"fine_tuned_model": fine_tuned_model})
            self._event(db, job_id, "The job has successfully completed", key="succeeded")
        return True

    def delete_job(self, job_id: str, owner: str) -> list[tuple[str, str]]:
        """Forget a finished job of `owner`: its row, events, checkpoint rows and results file rows, in
        one transaction. Returns the results files' (id, purpose), whose bytes the caller removes."""
        with self.transaction() as db:
            row = _row(db.execute("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)).fetchone())
            if row is None:
                return []
            files = []
            for file_id in row["result_files"] or []:
                found = db.execute("SELECT purpose FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone()
                if found is not None:
                    files.append((file_id, found["purpose"]))
                    db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            for table in ("events", "checkpoints"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return files

    # ---- events -----------------------------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, job_id: str, message: str, key: str | None = None, level: str = "info",
               type: str = "message", data: dict | None = None) -> None:
        db.execute("INSERT OR IGNORE INTO events (id, job_id, created_at, level, type, message, data, key) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (new_id("ftevent"), job_id, now(), level, type, message, _dump(data), key))

    def add_event(self, job_id: str, message: str, key: str | None = None, level: str = "info",
                  type: str = "message", data: dict | None = None) -> None:
        """Add an event; one with a `key` already stored for the job is ignored."""
        with self.transaction() as db:
            self._event(db, job_id, message, key, level, type, data)

    def add_events(self, job_id: str, events: list[dict]) -> None:
        """Several keyword-argument dicts of `add_event` in one transaction."""
        if events:
            with self.transaction() as db:
                for event in events:
                    self._event(db, job_id, **event)

    def has_event(self, job_id: str, key: str) -> bool:
        """Whether the job has the event with `key` (a fact recorded once, e.g. a model's deletion)."""
        return self._one("SELECT id FROM events WHERE job_id = ? AND key = ?", (job_id, key)) is not None

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """(rows, has_more), newest first; `after`: the event id the previous page ended with."""
        return self._page("events", "seq", job_id, after, limit)

    def metric_steps(self, job_id: str) -> set[int]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT json_extract(data, '$.step') FROM events "
                                              "WHERE job_id = ? AND type = 'metrics'", (job_id,))}

    # ---- checkpoints ------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str, created_at: int | None = None) -> bool:
        """Record checkpoint `step` of a job once; True when it is new."""
        with self.transaction() as db:
            added = db.execute("INSERT OR IGNORE INTO checkpoints (id, job_id, step, created_at, metrics, path) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (derived_id("ftckpt", job_id, step), job_id, step, created_at or now(),
                                json.dumps(metrics), path)).rowcount == 1
            if added:
                self._event(db, job_id, f"Checkpoint created at step {step}", key=f"checkpoint:{step}")
        return added

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        """(rows, has_more), the latest step first."""
        return self._page("checkpoints", "step", job_id, after, limit)

    def _page(self, table: str, order: str, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """One page of a job's rows of `table` (a fixed name, never client input), descending by
        `order`; `after`: the id of the row the previous page ended with."""
        args: list = [job_id]
        sql = f"SELECT * FROM {table} WHERE job_id = ?"
        if after:
            sql += f" AND {order} < (SELECT {order} FROM {table} WHERE id = ? AND job_id = ?)"  # this job's only
            args += [after, job_id]
        rows = self._all(sql + f" ORDER BY {order} DESC LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit


def worker_alive(pid: int | None) -> bool:
    """Whether `pid` is a live qforge process (not a recycled pid of something else)."""
    try:
        return pid_alive(pid) and b"qforge" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid_alive(pid)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """'ft:<base>:<suffix>:<job id>', with the base's characters that a model name cannot hold
    (see serve.registry.NAME_PATTERN) replaced by '-'."""
    safe_base = "".join(c if c.isalnum() or c in "_-+@" else "-" for c in base)[:40]
    return f"ft:{safe_base}:{suffix or ''}:{job_id}"
