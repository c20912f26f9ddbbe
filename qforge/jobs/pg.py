"""The job store on PostgreSQL: many workers on any number of machines, several API replicas.

`open_store(storage, database_url)` is the one way in: no URL (or a sqlite: one) gives the embedded
SQLite store (qforge.jobs.store.JobStore); `postgresql://...` gives `PgStore`, the same interface
over PostgreSQL. Files and job folders live under `storage`, a path every worker and replica mounts.

PgStore runs JobStore's own SQL through a thin translation (placeholders, INSERT OR IGNORE, JSON
access), so both backends share one implementation of every query; the schema comes from the same
Alembic migrations as SQLite's (qforge/jobs/migrations), applied at start-up under an advisory lock.

Claims: `SELECT ... FOR UPDATE SKIP LOCKED` picks the oldest queued job, or a running one whose
lease has expired (its worker stopped renewing: killed, partitioned, frozen), and the claimer takes
the lease (`lease_owner` = host:pid, `lease_expires`). A worker renews the lease on every poll; a
worker that finds its lease gone stops its trainer at once and records nothing, so no job runs
twice at once. The new holder resumes from the job's last checkpoint on the shared storage.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

from .db import DatabaseError, migrate, redacted
from .store import JobStore, now

DEFAULT_LEASE_S = 30.0
ORPHAN_GRACE_S = 3600.0  # replicas upload concurrently: only old orphans are swept

_INSERT_OR_IGNORE = re.compile(r"^\s*INSERT OR IGNORE INTO", re.IGNORECASE)
_JSON_EXTRACT = re.compile(r"json_extract\((\w+), '\$\.(\w+)'\)")


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg")


def open_store(storage: str | Path, database_url: str | None = None) -> JobStore:
    """The job store: SQLite under `storage` (the default), or PostgreSQL at `database_url`."""
    database_url = database_url or None
    if database_url is None or database_url.startswith("sqlite"):
        return JobStore(storage)
    if not is_postgres(database_url):
        raise ValueError(f"--database-url must be postgresql://USER@HOST:PORT/DB (or none for SQLite), got "
                         f"'{redacted(database_url)}'")
    return PgStore(database_url, storage)


def translate(sql: str) -> str:
    """JobStore's SQLite dialect -> PostgreSQL (only the constructs JobStore uses)."""
    sql = _JSON_EXTRACT.sub(r"((\1)::json->>'\2')::bigint", sql)
    if _INSERT_OR_IGNORE.match(sql):
        sql = _INSERT_OR_IGNORE.sub("INSERT INTO", sql) + " ON CONFLICT DO NOTHING"
    return sql.replace("%", "%%").replace("?", "%s")


class Row(dict):
    """A result row: by column name like a dict, and by position like a tuple."""

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def _row_factory(cursor):
    names = [c.name for c in cursor.description or ()]
    return lambda values: Row(zip(names, values))


class _Connection:
    """A psycopg connection that speaks JobStore's SQL."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, args=()):
        cur = self.conn.cursor(row_factory=_row_factory)
        cur.execute(translate(sql), tuple(args))
        return cur


class PgStore(JobStore):
    """JobStore over PostgreSQL (see the module's notes)."""

    single_worker = False
    orphan_grace_s = ORPHAN_GRACE_S

    def __init__(self, database_url: str, storage: str | Path, lease_s: float = DEFAULT_LEASE_S):
        import psycopg

        self.url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.lease_s = lease_s
        self.root = Path(storage).expanduser().resolve()
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        for folder in (self.root, self.files_dir, self.jobs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db_path = None
        self._psycopg = psycopg
        migrate(self.url)

    @contextlib.contextmanager
    def _connect(self):
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        except self._psycopg.Error as exc:
            raise DatabaseError(f"cannot reach the job database '{redacted(self.url)}': "
                                f"{str(exc).strip().splitlines()[0]}") from None
        try:
            yield _Connection(conn)
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self):
        with self._connect() as db:
            with db.conn.transaction():
                yield db

    # ---- claims and leases ------------------------------------------------------------------
    @staticmethod
    def lease_owner(worker_pid: int) -> str:
        return f"{socket.gethostname()}:{worker_pid}"

    def claim_next_job(self, worker_pid: int) -> dict | None:
        """The oldest job to run, claimed with a lease: a running one whose lease expired (it
        resumes), else the oldest queued one. Rows other workers are claiming are skipped."""
        owner = self.lease_owner(worker_pid)
        with self.transaction() as db:
            # a lease that expired, or one this worker holds but is not running (it was cut off from
            # the database mid-job and came back), is taken over; else the next queued job, fairly
            row = db.execute("SELECT id, status, train_pid, lease_owner FROM jobs WHERE status = 'running' AND "
                             "(lease_expires IS NULL OR lease_expires < ? OR lease_owner = ?) "
                             "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED", (time.time(), owner)).fetchone()
            row = row or self.next_queued(db, " FOR UPDATE SKIP LOCKED")
            if row is None:
                return None
            resumed = row["status"] == "running"
            db.execute("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), "
                       "attempts = attempts + 1, worker_pid = ?, train_pid = NULL, lease_owner = ?, "
                       "lease_expires = ? WHERE id = ?",
                       (now(), worker_pid, owner, time.time() + self.lease_s, row["id"]))
            if resumed and row["lease_owner"] == owner:
                self._event(db, row["id"], f"The worker {owner} lost the job database while running the job; "
                            "it takes the job up again", level="warn")
            elif resumed:
                self._event(db, row["id"], f"The worker holding the job ({row['lease_owner']}) stopped renewing "
                            f"its lease; {owner} takes it over", level="warn")
            else:
                self._event(db, row["id"], "Fine-tuning job started", key="started")
        job = self.get_job(row["id"])
        job["resumed"], job["stale_train_pid"] = resumed, row["train_pid"]
        return job

    def _lock_owner(self, db, owner: str) -> None:
        """Job creation for one owner, one transaction at a time (the per-key limit is counted inside)."""
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (owner,))

    def renew_lease(self, job_id: str, worker_pid: int) -> bool:
        """Extend this worker's lease on the job; False when another worker holds it now."""
        with self.transaction() as db:
            return db.execute("UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ?",
                              (time.time() + self.lease_s, job_id, self.lease_owner(worker_pid))).rowcount == 1


def worker_env(store: JobStore) -> dict:
    """What a trainer subprocess needs to open the same store (the URL in the environment, not on
    the command line)."""
    url = getattr(store, "url", None)
    return {"QFORGE_DATABASE_URL": url} if url else {}


def store_from_env(storage: str | Path) -> JobStore:
    return open_store(storage, os.environ.get("QFORGE_DATABASE_URL") or None)
