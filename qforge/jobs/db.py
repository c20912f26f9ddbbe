"""The job database's schema and start-up checks: nothing is swept, deleted or trusted unless it is healthy.

The schema has one source, the Alembic migrations in qforge/jobs/migrations (SQLAlchemy Core, one
script per revision, rendered for SQLite and PostgreSQL alike); `migrate(url)` brings either
database to the newest revision. SQLite's PRAGMA user_version mirrors the revision number
(SCHEMA_VERSION), so `check_sqlite` can refuse a newer database before anything is touched.

`check_sqlite(db_path, data_dir)` runs before the store touches anything:
  - missing database: a new one is made only when the data folder holds no uploads or job folders
    (else those would be orphans of a lost database and the sweep would delete them);
  - empty (0 bytes), truncated, garbage or foreign file (not SQLite, or SQLite without our tables):
    DatabaseError with one line naming the file;
  - `PRAGMA quick_check` must answer ok;
  - the schema version (PRAGMA user_version) must not be newer than this code's.
"""
from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HEAD_REVISION = "0001"  # the newest script in migrations/versions (a test checks it against Alembic's head)
SCHEMA_VERSION = int(HEAD_REVISION)
SQLITE_MAGIC = b"SQLite format 3\x00"
OUR_TABLES = {"files", "jobs", "events", "checkpoints"}
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseError(ValueError):
    """The job database cannot be trusted; the message is one line naming the file."""


def _has_data(data_dir: Path) -> list[str]:
    found = []
    for sub in ("files", "jobs"):
        folder = data_dir / sub
        if folder.is_dir() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
            found.append(f"{sub}/")
    return found


def check_sqlite(db_path: Path, data_dir: Path) -> bool:
    """Check the database at `db_path` (see the module's notes); True when it must be created."""
    data = _has_data(data_dir)
    hint = " (restore it from a backup, or move the data folder aside to start empty)"
    if not db_path.exists():
        if data:
            raise DatabaseError(f"the job database '{db_path}' is missing but {' and '.join(data)} under '{data_dir}' "
                                f"hold data; refusing to start{hint}")
        return True
    if not db_path.is_file():
        raise DatabaseError(f"the job database '{db_path}' is not a file")
    size = db_path.stat().st_size
    if size == 0:
        if data:
            raise DatabaseError(f"the job database '{db_path}' is empty (0 bytes) but {' and '.join(data)} hold "
                                f"data; refusing to start{hint}")
        return True
    with open(db_path, "rb") as fh:
        head = fh.read(100)
    if not head.startswith(SQLITE_MAGIC):
        raise DatabaseError(f"the job database '{db_path}' is not a SQLite database (foreign or overwritten "
                            f"file){hint}")
    if len(head) < 100 or size < 512:
        raise DatabaseError(f"the job database '{db_path}' is truncated ({size} bytes){hint}")
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=rw", uri=True, timeout=30, isolation_level=None)
    except sqlite3.Error as exc:
        raise DatabaseError(f"the job database '{db_path}' cannot be opened: {exc}") from None
    try:
        verdict = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if verdict != ["ok"]:
            raise DatabaseError(f"the job database '{db_path}' fails its integrity check: {verdict[0]}{hint}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if not OUR_TABLES <= tables:
            what = "holds no tables" if not tables else f"holds other tables ({', '.join(sorted(tables)[:4])})"
            raise DatabaseError(f"the job database '{db_path}' {what}: not a qforge job database{hint}")
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"the job database '{db_path}' has schema version {version}, newer than this "
                                f"qforge's {SCHEMA_VERSION}; upgrade qforge")
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise DatabaseError(f"the job database '{db_path}' is damaged: {exc}{hint}") from None
    finally:
        db.close()
    return False


# ---- migrations --------------------------------------------------------------------------------
def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_version(db_path: Path) -> tuple[str | None, int]:
    """(the Alembic revision a SQLite job database is at or None, its user_version)."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        try:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:  # no such table: new, or made before the schema was Alembic's
            return None, version
    return (row[0] if row else None), version


def migrate_sqlite(db_path: Path) -> None:
    """Bring a SQLite job database to HEAD_REVISION and record SCHEMA_VERSION in user_version. Other
    processes opening the same store wait on a lock file beside it; at the head nothing is imported."""
    current = (HEAD_REVISION, SCHEMA_VERSION)
    if sqlite_version(db_path) == current:
        return
    with open(db_path.with_name(db_path.name + ".migrate-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if sqlite_version(db_path)[0] != HEAD_REVISION:
            adopt_unversioned_sqlite(db_path)
            migrate(f"sqlite:///{db_path}")
        with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def adopt_unversioned_sqlite(db_path: Path) -> None:
    """A database made before the schema was Alembic's holds revision 0001's tables less the two
    lease columns: add them and record the revision, so the migrations take it from there."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30, isolation_level=None)) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not OUR_TABLES <= tables or "alembic_version" in tables:
            return
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
        db.execute("BEGIN IMMEDIATE")
        for name, kind in (("lease_owner", "TEXT"), ("lease_expires", "FLOAT")):
            if name not in columns:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('0001')")
        db.execute("COMMIT")


def migrate(url: str) -> None:
    """Bring the database at `url` (sqlite:///PATH or postgresql://...) to the newest revision with
    Alembic; DatabaseError, one line, when it cannot be."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.exc import SQLAlchemyError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("postgresql://", "postgresql+psycopg://", 1)
                           .replace("%", "%%"))
    try:
        command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise DatabaseError(f"the job database '{redacted(url)}' cannot be brought to the current schema: "
                            f"{first}") from None
