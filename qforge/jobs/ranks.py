"""A job's trainer in several processes: torchrun, run inside this process, starts one
qforge.jobs.trainer_child per rank on this machine (the worker starts this module in place of the
trainer when the job's hyperparameters ask for n_processes > 1).

    python -m qforge.jobs.ranks JOB_DIR JOB_ID DATA_DIR PARENT_PID NPROC

    worker ─ ranks (this: torchrun's agent, its own process group) ─┬─ trainer_child rank 0 (writes)
                                                                     └─ trainer_child rank 1 ...

Every rank trains the job's config.yaml with the 4-bit base sharded across them (qforge.train.run
with a qforge.dist group, gloo on the CPU, NCCL on GPUs); rank 0 alone reports events and writes
metrics, checkpoints, the adapter and result.json, so the worker follows the job exactly as it
follows a one-process trainer.

- Rendezvous: torchrun's standalone c10d rendezvous on localhost port 0, so each job gets a free
  port from the system and two jobs on one machine never collide.
- Cancel: the worker's SIGINT reaches this process (torchrun starts each rank in a session of its
  own); torchrun passes it to every rank, whose loop agrees on the step to checkpoint after
  (qforge.dist.Group.any) and exits; torchrun SIGKILLs a rank still alive 30 s later.
- Death: this process dies with the worker and each rank with this process (PR_SET_PDEATHSIG);
  the worker also SIGKILLs every process under it (qforge.jobs.processes.kill_tree).
- A rank that dies: torchrun stops the others; this writes result.json with status 'crashed' and a
  message naming the rank, unless rank 0 wrote an outcome. The worker treats it as a trainer crash:
  the job resumes from its last checkpoint, and fails after MAX_CRASHES with that message.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from .processes import die_with_parent
from .trainer_child import RANK_LOST_EXIT, TRAINER_MODULE

RANKS_MODULE = "qforge.jobs.ranks"


def job_processes(job: dict) -> int:
    """The processes a stored job trains in: its method's n_processes (1 for jobs stored before the
    setting existed)."""
    kind = job["method"]["type"]
    return int(job["method"][kind]["hyperparameters"].get("n_processes") or 1)


def torchrun_args(job_dir: Path, job_id: str, data_dir: Path, nproc: int) -> list[str]:
    """torchrun's arguments for the job's `nproc` ranks; each rank's parent pid is this process's."""
    return ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", TRAINER_MODULE,
            str(job_dir), job_id, str(data_dir), str(os.getpid())]


def failed_rank(failures: dict, nproc: int) -> str:
    """The rank that failed first, in one line, from torchrun's {rank: ProcessFailure}: a rank that
    lost contact with another (exit status RANK_LOST_EXIT) or that torchrun stopped once another had
    failed (SIGTERM) is a consequence, not the cause."""
    consequences = (RANK_LOST_EXIT, -signal.SIGTERM)
    causes = {r: f for r, f in failures.items() if f.exitcode not in consequences} or failures
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    code = causes[rank].exitcode
    how = f"killed by signal {causes[rank].signal_name()}" if code < 0 else f"exited with status {code}"
    return f"rank {rank} of {nproc} {how}"


def main(argv: list[str]) -> int:
    """Run the job's ranks to their end: 0 when every rank exited 0, 1 when one failed (its outcome
    in result.json), 130 when a signal stopped the run (the ranks saw it too)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from ..train.child import RESULT_NAME, read_result, write_result

    job_dir, job_id, data_dir, parent_pid, nproc = argv
    die_with_parent(int(parent_pid) or None)
    nproc, job_dir = int(nproc), Path(job_dir)
    print(f"qforge jobs: training job {job_id} in {nproc} processes (torchrun, standalone rendezvous)", flush=True)
    try:
        torchrun(torchrun_args(job_dir, job_id, Path(data_dir), nproc))
    except ChildFailedError as exc:
        why = failed_rank(exc.failures, nproc)
        print(f"qforge jobs: {why}", flush=True)
        if read_result(job_dir / RESULT_NAME) is None:  # rank 0's own outcome, when it wrote one, stands
            write_result(job_dir / RESULT_NAME, {"status": "crashed", "error": {
                "code": "training_crashed", "message": why, "param": None}})
        return 1
    except SignalException as exc:  # the worker's SIGINT: torchrun passed it on to the ranks
        print(f"qforge jobs: {exc}; the ranks were stopped", flush=True)
        return 130
    except KeyboardInterrupt:  # before the ranks started (they die with this process otherwise)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
