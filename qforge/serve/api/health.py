"""What /health adds to the engine's state: the parts of the service that report themselves
degraded (the jobs store, when its database is unreachable or corrupt).

Each check is a blocking callable () -> problem text or None, registered by name in
AppState.health_checks. It runs on a worker thread, never the event loop, and at most one run
per check is in flight: a database that hangs holds one thread, however often /health is asked
(a new request waits on the run in flight). A run that has not answered within CHECK_S is
reported as degraded, and left to finish.
"""
from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool

CHECK_S = 2.0


class HealthProbes:
    """The in-flight run of each named check (module docstring)."""

    def __init__(self):
        self._running: dict[str, asyncio.Task] = {}

    async def problems(self, checks: dict) -> dict[str, str]:
        """name -> why that part is degraded, for every check that finds a problem."""
        found = {}
        for name, check in list(checks.items()):
            problem = await self._probe(name, check)
            if problem:
                found[name] = problem
        return found

    async def _probe(self, name: str, check) -> str | None:
        task = self._running.get(name)
        if task is None or task.done():
            task = self._running[name] = asyncio.ensure_future(run_in_threadpool(check))
        done, _ = await asyncio.wait({task}, timeout=CHECK_S)
        if not done:
            return f"no answer within {CHECK_S:g} s"
        exc = task.exception()
        if exc is not None:  # a failing check is the degradation it reports
            text = str(exc).splitlines()[0] if str(exc) else ""
            return f"{type(exc).__name__}: {text}".rstrip(": ")
        return task.result()
