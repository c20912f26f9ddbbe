"""A full disk while a job trains, and the worker's limits, for real: the job service in this process
without its own worker, and `qforge worker --storage` as a subprocess whose trainers run with a
`sitecustomize` that makes the checkpoint writer raise ENOSPC (or torch's zip-writer RuntimeError)
a set number of times. A job that meets a full disk says so in its events, waits for room, resumes
from its last checkpoint and ends with the adapter an uninterrupted run makes; one whose disk never
frees fails naming the full disk; nothing half-written is left. The trainer reports the thread
count and the GPU memory share it was given."""
import argparse
import os
import sqlite3
import subprocess
import sys
import textwrap

import httpx
import openai
import pytest

from .helpers import REPO, InProcessService, chat_rows, job_create_body, jsonl, wait_for

FINISHED = ("succeeded", "failed", "cancelled")

# The trainer's checkpoint writes: the first SKIP succeed, the next FAIL run out of space half-way
# (in turn as OSError ENOSPC, as safetensors and as torch's zip writer report it), the rest succeed.
SITECUSTOMIZE = textwrap.dedent('''
    import errno, os
    _plan = os.environ.get("QFORGE_TEST_ENOSPC")
    if _plan:
        import qforge.fileio as _fileio
        _original = _fileio.atomic_folder

        def atomic_folder(final, write, markers=None):
            if not os.path.basename(str(final)).startswith("step-") or not os.path.exists(_plan):
                return _original(final, write, markers)
            skip, fail, failed = (int(x) for x in open(_plan).read().split())
            if skip > 0 or fail == 0:
                open(_plan, "w").write(f"{max(skip - 1, 0)} {fail} {failed}")
                return _original(final, write, markers)
            open(_plan, "w").write(f"0 {fail - 1} {failed + 1}")

            def half_written(tmp):
                (tmp / "trainable.safetensors").write_bytes(bytes(100))
                if failed % 3 == 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                if failed % 3 == 1:  # safetensors' save_file (a plain Exception: the errno is only in its text)
                    from safetensors import SafetensorError
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4632")
            return _original(final, half_written, markers)

        _fileio.atomic_folder = atomic_folder
''')


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory):
    data = tmp_path_factory.mktemp("disk-full-data")
    inject = tmp_path_factory.mktemp("inject")
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    plan = inject / "plan.txt"
    plan.write_text("0 0 0")
    with InProcessService(tiny_base, data, start_worker=False) as svc:
        env = {**os.environ, "QFORGE_TEST_ENOSPC": str(plan), "QFORGE_API_KEY": "",
               "PYTHONPATH": os.pathsep.join([str(inject), str(REPO), os.environ.get("PYTHONPATH", "")])}
        log = open(data / "worker-test.log", "ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "qforge", "worker", "--storage", str(data), "--poll", "0.2",
             "--worker-threads", "1", "--worker-memory-fraction", "0.5", "--disk-full-retries", "3",
             "--disk-full-backoff", "0.2", "--disk-full-wait", "60"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        svc.client = openai.OpenAI(base_url=svc.url, api_key="none", max_retries=0, timeout=60)
        svc.store, svc.plan = svc.jobs.store, plan
        svc.file = svc.client.files.create(file=("train.jsonl", jsonl(chat_rows(8))), purpose="fine-tune")
        try:
            yield svc
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            log.close()


def run_job(service, plan: str, steps: int = 5):
    service.plan.write_text(plan)
    job = service.client.fine_tuning.jobs.create(**job_create_body(service.file.id, "tiny", max_steps=steps),
                                                 seed=7)
    job = wait_for(lambda: (j := service.client.fine_tuning.jobs.retrieve(job.id)).status in FINISHED and j,
                   300, 0.3, f"job {job.id} to finish")
    messages = [e.message for e in service.client.fine_tuning.jobs.list_events(job.id, limit=1000)][::-1]
    return job, messages


def adapter_bytes(service, job_id: str) -> bytes:
    return (service.store.job_dir(job_id) / "run" / "adapter" / "adapter_model.safetensors").read_bytes()


def leftovers(service, job_id: str) -> list[str]:
    return [str(p) for p in service.store.job_dir(job_id).rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
def test_a_full_disk_is_named_waited_out_and_the_adapter_is_an_uninterrupted_runs(service):
    clean, clean_messages = run_job(service, "0 0 0")
    assert clean.status == "succeeded", clean.error
    # the trainer ran with the bounds it was given, and says so
    assert ("The training process uses 1 CPU thread(s); GPU memory fraction 0.5 recorded (no CUDA device: not "
            "applied)") in clean_messages

    job, messages = run_job(service, "2 3 0")  # checkpoints 1 and 2 written, then three writes run out of space
    assert job.status == "succeeded", job.error
    full = [m for m in messages if m.startswith("Disk full:")]
    assert len(full) == 3, messages
    assert "no space left on the device while writing 'run/checkpoints/step-000003'" in full[0]
    assert "retry 1 of 3" in full[0] and "retry 2 of 3" in full[1] and "retry 3 of 3" in full[2]
    assert sum(m.startswith("The storage has room again") for m in messages) == 3
    assert any(m.startswith("resumed from run/checkpoints/step-000002") for m in messages), messages
    assert service.plan.read_text().split() == ["0", "0", "3"]  # all three failures happened
    assert adapter_bytes(service, job.id) == adapter_bytes(service, clean.id)
    assert leftovers(service, job.id) == []
    steps = sorted(c.step_number for c in service.client.fine_tuning.jobs.checkpoints.list(job.id, limit=100))
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_disk_that_never_frees_fails_the_job_naming_it(service):
    job, messages = run_job(service, "0 1000 0")
    assert job.status == "failed"
    assert job.error.code == "disk_full"
    assert job.error.message.startswith("disk full: no space left on the device while writing "
                                        "'run/checkpoints/step-000001'"), job.error.message
    assert "the disk was full on 4 attempts in a row" in job.error.message
    assert sum(m.startswith("Disk full:") for m in messages) == 3
    assert leftovers(service, job.id) == []
    assert not (service.store.job_dir(job.id) / "run" / "checkpoints" / "step-000001").exists()


def test_an_upload_the_database_cannot_record_is_507_and_leaves_no_file(service, monkeypatch):
    def full(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(service.store, "add_file", full)
    before = sorted(p.name for p in service.store.files_dir.iterdir())
    r = httpx.post(service.url + "/files", files={"file": ("t.jsonl", jsonl(chat_rows(2)))},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "disk_full" and "disk is full" in r.json()["error"]["message"]
    assert sorted(p.name for p in service.store.files_dir.iterdir()) == before


def parse(command: str, *argv: str):
    from qforge.commands import serve, worker
    parser = argparse.ArgumentParser(prog=f"qforge {command}")
    (serve if command == "serve" else worker).add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("flag, value, expected", [
    ("--worker-threads", "0", "a whole number >= 1"), ("--worker-threads", "two", "a whole number >= 1"),
    ("--worker-memory-fraction", "0", "a fraction in (0, 1]"),
    ("--worker-memory-fraction", "1.5", "a fraction in (0, 1]"),
    ("--worker-memory-fraction", "nan", "a fraction in (0, 1]"),
    ("--disk-full-retries", "0", "a whole number >= 1")])
def test_worker_limit_flags_are_validated(command, flag, value, expected, capsys):
    storage = () if command == "serve" else ("--storage", "s")
    with pytest.raises(SystemExit):
        parse(command, *storage, flag, value)
    assert expected in capsys.readouterr().err


def test_serve_jobs_leaves_the_server_cores_and_passes_the_limits_on(monkeypatch):
    from qforge.commands import serve
    from qforge.jobs import limits

    monkeypatch.setattr(limits.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    config = serve.jobs_config(parse("serve", "--jobs"))
    assert config.worker_threads == 1 and config.worker_memory_fraction is None
    monkeypatch.setattr(limits.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert serve.jobs_config(parse("serve", "--jobs")).worker_threads == 8
    assert limits.serving_threads(8) == 8 and limits.serving_threads(16) == 1
    config = serve.jobs_config(parse("serve", "--jobs", "--worker-threads", "3", "--worker-memory-fraction", "0.25",
                                     "--disk-full-retries", "2"))
    assert (config.worker_threads, config.worker_memory_fraction) == (3, 0.25)
    assert config.worker_args[config.worker_args.index("--disk-full-retries") + 1] == "2"
    args = parse("worker", "--storage", "s", "--worker-threads", "2", "--worker-memory-fraction", "1")
    assert (args.worker_threads, args.worker_memory_fraction) == (2, 1.0)
    assert limits.trainer_env(2, 0.5) == {"QFORGE_TRAIN_THREADS": "2", "OMP_NUM_THREADS": "2",
                                          "MKL_NUM_THREADS": "2", "QFORGE_TRAIN_MEMORY_FRACTION": "0.5"}
