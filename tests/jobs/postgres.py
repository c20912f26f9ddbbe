"""A throw-away PostgreSQL server from Debian's package for the tests: initdb into a temporary
folder, pg_ctl start on a free loopback port (as the `postgres` user through runuser when the tests
run as root, which PostgreSQL refuses to run as), a database, and pg_ctl stop at the end."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.serve.helpers import free_port


def find_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def missing_reason() -> str | None:
    if find_bin("initdb") is None or find_bin("pg_ctl") is None:
        return "PostgreSQL's initdb/pg_ctl are not installed (Debian package postgresql; `make test` installs it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as another user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


class Postgres:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="qforge-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd
            user = pwd.getpwnam("postgres")
            os.chmod(self.folder, 0o700)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/qforge"

    def _run(self, *cmd: str) -> None:
        result = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120, cwd="/tmp")
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {result.stdout[-2000:]} {result.stderr[-2000:]}")

    def start(self) -> "Postgres":
        self._run(find_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w",
                  "-t", "60", "start")
        import psycopg
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE qforge")
        return self

    def stop(self) -> None:
        try:
            self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
