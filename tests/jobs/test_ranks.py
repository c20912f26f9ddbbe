"""qforge.jobs.ranks without processes: the job's process count as stored, torchrun's arguments, and
which rank a failed multi-process attempt names (the cause, not the ranks that stopped because of it)."""
import signal
from types import SimpleNamespace

from qforge.jobs.ranks import failed_rank, job_processes, torchrun_args
from qforge.jobs.trainer_child import RANK_LOST_EXIT, TRAINER_MODULE


def failure(exitcode: int, timestamp: int = 100):
    names = {-signal.SIGKILL: "SIGKILL", -signal.SIGTERM: "SIGTERM"}
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, signal_name=lambda: names.get(exitcode, "?"))


def test_the_rank_that_died_is_named_not_those_stopped_after_it():
    failures = {0: failure(-signal.SIGTERM), 1: failure(-signal.SIGKILL), 2: failure(RANK_LOST_EXIT)}
    assert failed_rank(failures, 4) == "rank 1 of 4 killed by signal SIGKILL"
    assert failed_rank({0: failure(RANK_LOST_EXIT), 3: failure(1)}, 4) == "rank 3 of 4 exited with status 1"
    # only consequences: the earliest of them (then the lowest rank) stands in for the cause
    assert failed_rank({1: failure(RANK_LOST_EXIT, 5), 0: failure(RANK_LOST_EXIT, 9)}, 2) == \
        f"rank 1 of 2 exited with status {RANK_LOST_EXIT}"


def test_processes_of_a_stored_job():
    job = {"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_processes": 3}}}}
    assert job_processes(job) == 3
    assert job_processes({"method": {"type": "supervised", "supervised": {"hyperparameters": {}}}}) == 1  # older rows


def test_torchrun_gets_a_free_port_and_no_restarts(tmp_path):
    args = torchrun_args(tmp_path, "ftjob-x", tmp_path, 2)
    assert args[:3] == ["--standalone", "--nproc-per-node=2", "--max-restarts=0"]  # standalone: port 0, a free one
    assert args[3:6] == ["-m", TRAINER_MODULE, str(tmp_path)] and args[6] == "ftjob-x"


def test_max_processes_per_job_is_a_flag_of_both_commands_and_reaches_the_worker(capsys):
    import argparse

    import pytest

    from qforge.commands import serve, worker

    def parse(command, *argv):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return parser.parse_args(list(argv))

    assert parse(worker, "--storage", "s").max_processes_per_job == 1  # one process unless the operator says so
    assert parse(worker, "--storage", "s", "--max-processes-per-job", "4").max_processes_per_job == 4
    with pytest.raises(SystemExit):
        parse(worker, "--storage", "s", "--max-processes-per-job", "0")
    assert "a whole number >= 1" in capsys.readouterr().err
    config = serve.jobs_config(parse(serve, "--jobs", "--max-processes-per-job", "2"))
    assert config.max_processes_per_job == 2  # the API's bound on n_processes
    from qforge.jobs.supervisor import worker_args
    args = worker_args(config)  # the worker subprocess's flags, as the server starts it
    assert args[args.index("--max-processes-per-job") + 1] == "2"
