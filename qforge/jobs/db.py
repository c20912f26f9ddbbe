"""Start-up checks of the job database: nothing is swept, deleted or trusted unless it is healthy.

`check_sqlite(db_path, data_dir)` runs before the store touches anything:
  - missing database: a new one is made only when the data folder holds no uploads or job folders
    (else those would be orphans of a lost database and the sweep would delete them);
  - empty (0 bytes), truncated, garbage or foreign file (not SQLite, or SQLite without our tables):
    DatabaseError with one line naming the file;
  - `PRAGMA quick_check` must answer ok;
  - the schema version (PRAGMA user_version) must be one this code knows; older ones are migrated
    in MIGRATIONS order, in one transaction each.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
OUR_TABLES = {"files", "jobs", "events", "checkpoints"}

# version -> SQL that brings a database at that version to the next one (0: the tables of the first
# release, which had no version number)
MIGRATIONS: dict[int, str] = {0: ""}


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
        while version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                if MIGRATIONS[version]:
                    db.executescript(MIGRATIONS[version])
                db.execute(f"PRAGMA user_version = {version + 1}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            version += 1
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise DatabaseError(f"the job database '{db_path}' is damaged: {exc}{hint}") from None
    finally:
        db.close()
    return False
