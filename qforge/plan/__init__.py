"""The memory planner: reading architectures (arch.py), units (units.py), a model of a run's memory (memory.py), one rank's share of it (ranks.py) and the
run-time policy of `qforge train` built on it (policy.py). `qforge plan` is qforge/commands/plan.py."""
from .arch import *  # noqa: F401,F403
from .units import *  # noqa: F401,F403
from .memory import *  # noqa: F401,F403
from .policy import *  # noqa: F401,F403
from .ranks import *  # noqa: F401,F403
