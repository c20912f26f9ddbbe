"""Issue 28, finding 4: every trainer write path reports a full disk as disk-full, whatever library
wrapped the errno. The three messages below are the real ones, recorded on a 1 MiB tmpfs with
safetensors' save_file and torch.save (torch raises its zip writer's error while handling the C++
stream's); each is injected into the checkpoint write (qforge.fileio.atomic_folder, which
save_checkpoint uses) and into the trainer's outcome (qforge.jobs.trainer_child.train)."""
import errno
import types

import pytest
from safetensors import SafetensorError

from qforge import fileio
from qforge.fileio import DiskFull, atomic_folder, is_disk_full


def safetensors_full() -> Exception:
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def torch_save_full() -> Exception:
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as exc:  # `from None` hides the context from tracebacks; it is still there
        exc.__suppress_context__ = False
        return exc


def iostream_full() -> Exception:
    return RuntimeError("basic_ios::clear: iostream error")


def oserror_full() -> Exception:
    return OSError(errno.ENOSPC, "No space left on device")


MESSAGES = {"safetensors": safetensors_full, "torch.save": torch_save_full, "iostream": iostream_full,
            "OSError": oserror_full}


@pytest.fixture
def disk_is_full(monkeypatch):
    monkeypatch.setattr(fileio, "free_bytes", lambda path: 4096)


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_a_checkpoint_write_that_runs_out_of_space_is_disk_full(kind, tmp_path, disk_is_full):
    def write(tmp):
        (tmp / "trainable.safetensors").write_bytes(bytes(100))
        raise MESSAGES[kind]()

    with pytest.raises(DiskFull) as caught:
        atomic_folder(tmp_path / "step-000003", write)
    assert "no space left on the device while writing" in str(caught.value)
    assert caught.value.path.endswith("step-000003")
    assert list(tmp_path.iterdir()) == []  # nothing half-written stays


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_the_message_is_found_anywhere_in_the_exception_chain(kind, disk_is_full, tmp_path):
    try:
        try:
            raise MESSAGES[kind]()
        except Exception as inner:
            raise ValueError("saving the checkpoint failed") from inner
    except ValueError as outer:
        assert is_disk_full(outer, tmp_path)
    try:  # raised while handling it, without `from`
        try:
            raise MESSAGES[kind]()
        except Exception:
            raise KeyError("state")
    except KeyError as outer:
        assert is_disk_full(outer, tmp_path)


def test_the_bare_iostream_error_is_disk_full_only_when_the_disk_is(monkeypatch, tmp_path):
    monkeypatch.setattr(fileio, "free_bytes", lambda path: 50 * 2 ** 30)
    assert not is_disk_full(iostream_full(), tmp_path)
    assert not is_disk_full(iostream_full())  # no folder to ask: not claimed
    with pytest.raises(RuntimeError, match="basic_ios") as caught:
        atomic_folder(tmp_path / "step-000001", lambda tmp: (_ for _ in ()).throw(iostream_full()))
    assert not isinstance(caught.value, DiskFull)
    assert not is_disk_full(RuntimeError("CUDA error: an illegal memory access"), tmp_path)
    assert not is_disk_full(SafetensorError("Error while deserializing header: HeaderTooLarge"), tmp_path)


class FakeStore:
    def __init__(self):
        self.events = []

    def get_job(self, job_id):
        return {"model": "tiny"}

    def add_event(self, job_id, message, **kw):
        self.events.append(message)


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_the_trainer_reports_each_message_as_disk_full_not_a_training_error(kind, monkeypatch, tmp_path,
                                                                             disk_is_full):
    from qforge.jobs import trainer_child
    import qforge.train.config
    import qforge.train.run

    monkeypatch.setattr(qforge.train.config.TrainConfig, "from_yaml", staticmethod(lambda path: None))
    monkeypatch.setattr(trainer_child, "with_tensorboard", lambda cfg: types.SimpleNamespace(model="tiny"))
    monkeypatch.setattr(trainer_child, "resources_message", lambda world=1: "resources")

    def prepare(cfg, log, group=None):
        raise MESSAGES[kind]()

    monkeypatch.setattr(qforge.train.run, "prepare", prepare)
    outcome = trainer_child.train(tmp_path, "ftjob-x", FakeStore())
    assert outcome["status"] == "disk_full", outcome
    assert outcome["error"]["code"] == "disk_full"
    assert outcome["error"]["message"].startswith("no space left on the device while training")
