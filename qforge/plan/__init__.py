"""The memory planner: a model of a run's memory (memory.py) and the run-time policy of `qforge train`
built on it (policy.py). `qforge plan` is qforge/commands/plan.py."""
from .memory import *  # noqa: F401,F403
from .memory import _UNITS  # noqa: F401
from .policy import *  # noqa: F401,F403
