"""OpenAI's files and fine-tuning jobs API, and the dashboard, on the inference server's app
(request bodies and answered objects: schemas.py).

Routes (every one but the dashboard's needs the bearer key when keys are configured):
  POST /v1/files (multipart: file, purpose "fine-tune"), GET /v1/files, GET /v1/files/{id},
  GET /v1/files/{id}/content, DELETE /v1/files/{id}
  POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id},
  DELETE /v1/fine_tuning/jobs/{id} (a finished job), POST /v1/fine_tuning/jobs/{id}/cancel, GET /v1/fine_tuning/jobs/{id}/events,
  GET /v1/fine_tuning/jobs/{id}/checkpoints
  GET / (the dashboard), /dashboard/* (its script and style)

Ownership: each file, job and fine-tuned model belongs to the key that made it; another key gets 404
for its ids (and cannot chat with its models), exactly as for ids that do not exist.

Methods (qforge.jobs.methods): 'supervised' (SFT), OpenAI's 'dpo' and qforge's 'orpo' in the same shape
({"type": "orpo", "orpo": {"hyperparameters": ...}}); an upload is stored as SFT data or preference
pairs, and a job whose method trains on the other kind is refused at creation, naming the file.

A new job is 'validating_files' while a background thread links its files into the job folder, takes
QLoRA (train's default; the plan says whether it fits) when the request names no method, writes the job's
TrainConfig; then it is 'queued' for the worker (qforge.jobs.worker). When a job has succeeded its
adapter is registered with the inference registry as `ft:<base>:<suffix>:<job id>`: at once when a
request names it or reads the job, and within a second by a watcher thread in any case; at start-up
every succeeded job's model is registered before the server answers, and names starting `ft:` are
reserved for this service (no key can register one through /v1/adapters). A model whose adapter
cannot be read (corrupt, missing) answers 503 naming the file; listings and other models go on.
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..serve.api import APIError
from ..serve.registry import AdapterError, AdapterRegistry, AdapterSlotsBusy
from . import models as ft_models
from .checks import check_storable, database_unavailable
from .db import DatabaseError
from .trainer_child import DB_ERRORS_T
from .pg import open_store
from .methods import (check_file_for, check_method, choose_method, describe, method_settings, read_upload,
                      resolve_settings, train_config)
from .schemas import JobBody, MethodBody, checkpoint_object, event_object, file_object, job_object, not_found, page
from .store import ACTIVE, FINISHED, TooManyJobs, new_id, now

WEB_DIR = Path(__file__).parent / "web"
DEFAULT_MAX_FILE_BYTES = 64 * 2 ** 20
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
WATCH_S = 1.0


@dataclass
class JobsConfig:
    data_dir: Path
    base_model: str                      # what the trainer loads: "smollm2", a model folder, a .gguf file
    memory_budget: int | None = None     # bytes for the planner; None: RAM available when a job is validated
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    poll_s: float = 0.5
    cancel_grace_s: float = 30.0
    start_worker: bool = True
    database_url: str | None = None      # postgresql://...: the shared store (qforge.jobs.pg); None: SQLite
    worker_threads: int | None = None    # the trainers' torch threads (None: torch's choice)
    worker_memory_fraction: float | None = None  # the trainers' share of the GPU's memory (None: no bound)
    worker_args: tuple[str, ...] = ()    # more worker flags (the disk-full ones)
    max_jobs_per_key: int | None = 20    # a key's jobs validating, queued or running at once (None: no bound)
    max_processes_per_job: int = 1       # a job's n_processes at most (torchrun on the worker's machine)


# ---- the service -----------------------------------------------------------------------------------
class JobService:
    """The API process's side of the job service: uploads, job creation and validation, cancel,
    the worker's supervisor, and fine-tuned models for the inference registry."""

    def __init__(self, config: JobsConfig, registry: AdapterRegistry):
        self.config, self.registry = config, registry
        self.store = open_store(config.data_dir, config.database_url)
        self.validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qforge-jobs-validate")
        self.supervisor = None
        self._register_lock = threading.Lock()
        self._unloadable: dict[str, str] = {}  # fine-tuned model -> why its adapter cannot be loaded
        self._deleted: set[str] = set()  # models their owners deleted (DELETE /v1/models) since start-up
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="qforge-jobs-models", daemon=True)

    def start(self) -> "JobService":
        """Sweep what interrupted writes left, then register every fine-tuned model before the
        server takes requests (so no name is ever free for someone else to take)."""
        from ..fileio import clean_temporaries
        self.store.sweep_orphan_files()
        for leftover in clean_temporaries(self.store.jobs_dir):
            print(f"qforge jobs: removed '{leftover.relative_to(self.store.root)}', left by an interrupted write",
                  flush=True)
        self.register_all()
        for job in self.store.list_jobs(status="validating_files", limit=10 ** 6)[0]:
            self.validator.submit(self.validate_job, job["id"])  # cut short by a crash: do it again
        if self.config.start_worker:
            from .supervisor import WorkerSupervisor, worker_args
            from .pg import worker_env
            self.supervisor = WorkerSupervisor(self.store.root, self.config.poll_s, self.config.cancel_grace_s,
                                               worker_threads=self.config.worker_threads,
                                               worker_memory_fraction=self.config.worker_memory_fraction,
                                               extra_args=worker_args(self.config))
            self.supervisor.extra_env = worker_env(self.store)
            self.supervisor.start()
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.validator.shutdown(wait=True)

    # ---- files --------------------------------------------------------------------------------
    def create_file(self, owner: str, source, filename: str) -> dict:
        """Copy the upload beside the store under a fresh id, validate it as training data (SFT rows
        or preference pairs: qforge.jobs.methods.read_upload), then record it. The bytes are in place
        (fsynced) before the row exists."""
        from ..fileio import fsync_dir
        from ..train.data import DataError

        file_id = new_id("file")
        final = self.store.file_path(file_id)
        tmp = self.store.files_dir / f".upload-{file_id}.jsonl"
        try:
            size = 0
            with open(tmp, "wb") as out:
                while chunk := source.read(2 ** 20):
                    size += len(chunk)
                    if size > self.config.max_file_bytes:
                        raise APIError(413, f"the file is larger than the limit of {self.config.max_file_bytes} "
                                       "bytes", param="file", code="file_too_large")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                rows, fmt = read_upload(tmp)
            except DataError as exc:
                raise APIError(400, f"invalid training data: {str(exc).replace(str(tmp), filename)}",
                               param="file", code="invalid_file") from None
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            from ..fileio import is_disk_full
            if is_disk_full(exc):
                raise APIError(507, "the server's disk is full: the upload was not stored; retry later",
                               "server_error", param="file", code="disk_full") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        try:
            return self.store.add_file(file_id, owner, filename, "fine-tune", size, rows, fmt)
        except BaseException:  # not recorded (a full disk under the database): the bytes go too
            final.unlink(missing_ok=True)
            raise

    # ---- jobs ---------------------------------------------------------------------------------
    def _training_file(self, owner: str, file_id: str | None, param: str) -> dict | None:
        if file_id is None:
            return None
        row = self.store.get_file(file_id, owner)
        if row is None or row["purpose"] != "fine-tune":
            raise APIError(400, f"invalid {param}: no fine-tune file '{file_id}'", param=param, code="file_not_found")
        return row

    def create_job(self, owner: str, body: JobBody) -> dict:
        check_storable(body.model_dump(exclude_none=True))
        if body.model != self.registry.base_name:
            raise APIError(400, f"model '{body.model}' cannot be fine-tuned here: this server fine-tunes its base "
                           f"model '{self.registry.base_name}'", param="model", code="model_not_available")
        if body.suffix is not None and not SUFFIX.match(body.suffix):
            raise APIError(400, "suffix: 1-40 letters, digits, '_' or '-'", param="suffix")
        if body.metadata and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512
                                                             for k, v in body.metadata.items())):
            raise APIError(400, "metadata: at most 16 keys of 64 characters, values of 512", param="metadata")
        method = body.method or MethodBody()
        kind = check_method(method)
        for param in ("training_file", "validation_file"):
            row = self._training_file(owner, getattr(body, param), param)
            if row is not None:
                check_file_for(kind, param, row, self.store.file_path(row["id"]))
        settings = resolve_settings(body.hyperparameters, method.settings(), kind, self.config.max_processes_per_job)
        if settings["method"] == "full" and kind != "supervised":  # a full fine-tune is served as its own model
            raise APIError(400, f"method 'full' trains supervised jobs only; a {kind} job trains an adapter (qlora or "
                           "lora)", param=f"method.{kind}.hyperparameters.method", code="unsupported")
        openai_hp = {k: settings[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier", "n_processes")}
        job_id = new_id("ftjob")
        job = {"id": job_id, "owner": owner, "created_at": now(), "model": body.model,
               "training_file": body.training_file, "validation_file": body.validation_file, "suffix": body.suffix,
               "seed": body.seed if body.seed is not None else random.randrange(2 ** 31), "metadata": body.metadata,
               "hyperparameters": openai_hp, "status": "validating_files",
               "method": {"type": kind, kind: {"hyperparameters": settings}}}
        try:
            row = self.store.add_job(job, [(f"Created fine-tuning job: {job_id}", "created"),
                                           (f"Validating training file: {body.training_file}", "validating")],
                                     max_active=self.config.max_jobs_per_key)
        except TooManyJobs as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="too_many_jobs",
                           headers={"Retry-After": "60"}) from None
        self.validator.submit(self.validate_job, job_id)
        return row

    def validate_job(self, job_id: str) -> None:
        """validating_files -> queued: link the files into the job folder, choose the method, write
        config.yaml. Safe to run again after a crash part-way. On a full disk it tries again with a
        doubling back-off (the job stays 'validating_files'; a restart also takes it up again)."""
        from ..fileio import is_disk_full
        delay = 1.0
        while not self._stop.is_set():
            try:
                return self._validate_job(job_id)
            except Exception as exc:  # noqa: BLE001 - a full disk waits; anything else is logged
                if not is_disk_full(exc):
                    print(f"qforge jobs: validating {job_id} failed: {exc!r}", flush=True)
                    return
                print(f"qforge jobs: validating {job_id}: the disk is full; trying again in {delay:.0f} s", flush=True)
            if self._stop.wait(delay):
                return
            delay = min(60.0, delay * 2)

    def _validate_job(self, job_id: str) -> None:
        from ..fileio import is_disk_full
        job = self.store.get_job(job_id)
        if job is None or job["status"] != "validating_files":
            return
        try:
            config, settings, steps, reason = self._prepare(job)
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the service goes on
            if is_disk_full(exc):
                raise
            param = "training_file" if isinstance(exc, FileNotFoundError) else None
            error = {"code": "invalid_training_file" if param else "validation_error", "message": str(exc),
                     "param": param}
            self.store.update_job(job_id, only_if_status=("validating_files",), status="failed", error=error,
                                  finished_at=now(), level="error", events=[(f"The job failed: {exc}", "failed")])
            return
        from ..fileio import atomic_write_bytes
        atomic_write_bytes(self.store.job_dir(job_id) / "config.yaml", config.to_yaml().encode())
        kind = job["method"]["type"]
        method = {"type": kind, kind: {"hyperparameters": settings}}
        objective = describe(kind, settings)
        events = [(f"Training method: {settings['method']} ({reason})", "method"),
                  *([(objective, "objective")] if objective else []),
                  ("Files validated, moving job to queued state", "queued")]
        self.store.update_job(job_id, only_if_status=("validating_files",), status="queued", method=method,
                              total_steps=steps, events=events)

    def _prepare(self, job: dict):
        job_dir = self.store.job_dir(job["id"])
        job_dir.mkdir(parents=True, exist_ok=True)
        rows = 0
        for param, name in (("training_file", "train.jsonl"), ("validation_file", "valid.jsonl")):
            if job[param] is None:
                continue
            row = self.store.get_file(job[param], job["owner"])
            source = self.store.file_path(job[param])
            if row is None or not source.is_file():
                raise FileNotFoundError(f"{param} '{job[param]}' was deleted before the job started")
            link_or_copy(source, job_dir / name)
            rows = rows or row["rows"]
        kind, asked = method_settings(job)
        settings = dict(asked)
        reason = "asked for"
        if settings["method"] == "auto":
            settings["method"], reason = choose_method(self.config.base_model, settings, self.memory_budget(), kind)
        from ..train.loop import total_steps_for
        steps = total_steps_for(rows, train_config(job, dict(settings, save_every=0), self.config.base_model, job_dir))
        if settings["save_every"] is None:
            settings["save_every"] = max(1, math.ceil(steps / 10))
        return train_config(job, settings, self.config.base_model, job_dir), settings, steps, reason

    def memory_budget(self) -> int:
        if self.config.memory_budget is not None:
            return self.config.memory_budget
        import psutil
        return int(psutil.virtual_memory().available)

    def cancel_job(self, owner: str, job_id: str) -> dict:
        job = self.store.get_job(job_id, owner)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        if job["status"] in FINISHED:
            if job["status"] == "cancelled":
                return job
            raise APIError(400, f"the job has already {job['status']}; it cannot be cancelled", param="id",
                           code="job_finished")
        running = job["status"] == "running"
        message = ("Cancellation requested; the training process is stopping" if running
                   else "The job was cancelled")
        self.store.update_job(job_id, only_if_status=ACTIVE, status="cancelled", finished_at=now(),
                              estimated_finish=None, events=[(message, "cancel-requested" if running else "cancelled")])
        return self.store.get_job(job_id)

    def delete_job(self, owner: str, job_id: str) -> dict:
        """DELETE /v1/fine_tuning/jobs/{id}: a finished job of the caller's (succeeded, failed, or
        cancelled and stopped) goes with its events, checkpoints, results file, models and folder.
        The folder is renamed aside first, so a crash part-way leaves a job that can be deleted again
        and never a half folder (the aside is removed at the next start)."""
        job = self.store.get_job(job_id, owner)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        if job["status"] not in FINISHED or job["train_pid"] is not None:
            what = "still stopping" if job["status"] == "cancelled" else f"{job['status']}"
            raise APIError(409, f"the job is {what}: only a finished job can be deleted (cancel it first, then "
                           "wait until it is cancelled)", param="id", code="job_not_finished")
        folder = self.store.job_dir(job_id)
        with self._register_lock:
            for name in [n for n in self.registry.names() if job["fine_tuned_model"]
                         and (n == job["fine_tuned_model"] or n.startswith(job["fine_tuned_model"] + ":"))]:
                try:
                    self.registry.remove(name)
                except AdapterError:
                    pass
            if job["fine_tuned_model"]:
                self._deleted.add(job["fine_tuned_model"])
            if folder.is_dir():
                os.replace(folder, folder.with_name(f".{job_id}.deleted.tmp"))
            files = self.store.delete_job(job_id, owner)
        shutil.rmtree(folder.with_name(f".{job_id}.deleted.tmp"), ignore_errors=True)
        for file_id, purpose in files:
            self.store.file_path(file_id, purpose).unlink(missing_ok=True)
        return {"id": job_id, "object": "fine_tuning.job", "deleted": True}

    # ---- fine-tuned models ----------------------------------------------------------------------
    def model_visible(self, name: str, key_id: str) -> bool:
        """Whether caller `key_id` may use model `name`: a job's fine-tuned model (or one of its
        checkpoint models) only by its owner (registered now if the watcher has not yet); every other
        model by everyone."""
        if not name.startswith("ft:"):
            return True
        job = ft_models.job_of_model(self.store, name)
        if job is None:
            return True
        if job["owner"] != key_id:
            return False
        if ft_models.checkpoint_of(name) is None:
            self.register(job)
        else:
            self.register(job, name)
        return True

    def register(self, job: dict, name: str | None = None) -> None:
        """Serve a succeeded job's adapter, or its checkpoint model `name`, when its adapter exists. One
        that cannot be read (corrupt, missing) is remembered with the reason, which requests naming the
        model get; nothing else is affected. Files are checked and records made only under the lock the
        deletes hold (checked before it, a model deleted just after was recorded unloadable: 503, not 404)."""
        name = name or job["fine_tuned_model"]
        if name in self.registry or name in self._unloadable or job["model"] != self.registry.base_name:
            return
        with self._register_lock:
            if name in self.registry or name in self._unloadable:
                return  # registered or refused meanwhile
            if name in self._deleted or self.store.has_event(job["id"], ft_models.deleted_key(name)):
                self._deleted.add(name)  # its owner deleted it (maybe before this process started)
                return
            folder, full = ft_models.model_folder(self.store, job, name)
            if folder is None:  # no such checkpoint
                return
            if not folder.is_dir():
                if name == job["fine_tuned_model"]:  # a succeeded job's adapter is gone: say so for this model
                    kind = "model" if full else "adapter"
                    self._unloadable[name] = f"the {kind} folder of {name} does not exist (run/{kind})"
                return
            try:
                if full:  # a whole model: its own dense engine beside the base (qforge.serve.dedicated)
                    self.registry.dedicated.add(name, folder)
                else:
                    self.registry.add(name, folder, trusted=True)
            except Exception as exc:  # noqa: BLE001 - one bad adapter never stops the others
                if not isinstance(exc, AdapterSlotsBusy):  # all slots busy: try again later
                    message = str(exc) if isinstance(exc, (AdapterError, ValueError, OSError)) else \
                        f"internal error {type(exc).__name__}"
                    self._unloadable[name] = message.replace(f"{self.store.root}/", "")
                print(f"qforge jobs: cannot serve {name}: {exc}", flush=True)

    def delete_model(self, name: str, key_id: str) -> dict | None:
        """DELETE /v1/models/{name} for a fine-tuned or checkpoint model: unload it and remove its
        adapter files (the job stays). None when `name` is no job's model (the server decides)."""
        if not name.startswith("ft:"):
            return None
        job = ft_models.job_of_model(self.store, name)
        if job is None:
            return None
        if job["owner"] != key_id:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        with self._register_lock:  # register() decides under it too: no interleaving re-registers the name
            self._deleted.add(name)  # first: nothing registers it from here on
            self._unloadable.pop(name, None)
            if name in self.registry:
                try:
                    self.registry.remove(name)
                except AdapterError:
                    pass
            folder, full = ft_models.model_folder(self.store, job, name)
            if full:  # a whole model served on its own engine: stop it
                self.registry.dedicated.remove(name)
            if folder is not None and folder.is_dir():  # recorded before the files go: a restart knows it too
                self.store.add_event(job["id"], f"The model {name} was deleted", ft_models.deleted_key(name))
            removed = ft_models.delete_adapter_files(folder)
        if not removed:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": name, "object": "model", "deleted": True}

    def model_error(self, name: str) -> str | None:
        """Why fine-tuned model `name` cannot be served, when it cannot."""
        return self._unloadable.get(name)

    def register_all(self) -> None:
        for job in self.store.succeeded_models():
            try:
                self.register(job)
            except Exception as exc:  # noqa: BLE001 - keep going (a locked database, a bad folder)
                print(f"qforge jobs: model watcher: {job['fine_tuned_model']}: {exc!r}", flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            try:
                self.register_all()
            except Exception as exc:  # noqa: BLE001 - keep watching (a locked database)
                print(f"qforge jobs: model watcher: {exc!r}", flush=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link the upload into the job folder (the job keeps its data if the file is deleted)."""
    if target.exists():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def safe_filename(raw: str | None) -> str:
    """The client's file name for display only: its last path part, printable, at most 200 characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()[:200]
    return name or "upload.jsonl"


# ---- routes --------------------------------------------------------------------------------------
def install(app: FastAPI, state, caller, service: JobService) -> None:
    """Add the files and jobs routes and the dashboard to the inference app; fine-tuned models are
    then visible only to their owners."""
    state.model_guard = service.model_visible
    state.model_deleter = service.delete_model
    state.model_error = service.model_error
    state.body_limits["/v1/files"] = service.config.max_file_bytes + 2 ** 16  # multipart framing
    app.state.jobs = service
    for kind in (DatabaseError, sqlite3.DatabaseError, *DB_ERRORS_T):
        app.add_exception_handler(kind, database_unavailable)
    _add_file_routes(app, service, caller)
    _add_job_routes(app, service, caller)
    _add_dashboard(app)


def _add_file_routes(app: FastAPI, service: JobService, caller) -> None:
    store = service.store

    @app.post("/v1/files")
    async def upload(request: Request, owner: str = Depends(caller)):
        if not request.headers.get("content-length", "").isdigit():
            raise APIError(411, "uploads need a Content-Length header", code="length_required")
        form = await request.form(max_files=1, max_fields=8)
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "fine-tune":
            raise APIError(400, f"purpose must be 'fine-tune', got {purpose!r}", param="purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing the 'file' part (multipart/form-data)", param="file")
        try:
            row = await run_in_threadpool(service.create_file, owner, upload.file, safe_filename(upload.filename))
        finally:
            await upload.close()
        return file_object(row)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10000, ge=1, le=10000), order: Literal["asc", "desc"] = "desc",
                         owner: str = Depends(caller)):
        rows, more = store.list_files(owner, purpose, after, limit, ascending=order == "asc")
        return page([file_object(r) for r in rows], more)

    def owned(file_id: str, owner: str) -> dict:
        row = store.get_file(file_id, owner)
        if row is None:
            raise not_found("file", file_id)
        return row

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, owner: str = Depends(caller)):
        return file_object(owned(file_id, owner))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, owner: str = Depends(caller)):
        row = owned(file_id, owner)
        media = "text/csv" if row["purpose"] == "fine-tune-results" else "application/jsonl"
        return FileResponse(store.file_path(file_id, row["purpose"]), media_type=media)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, owner: str = Depends(caller)):
        if not await run_in_threadpool(store.delete_file, file_id, owner):
            raise not_found("file", file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def _add_job_routes(app: FastAPI, service: JobService, caller) -> None:
    store = service.store

    def owned(job_id: str, owner: str) -> dict:
        job = store.get_job(job_id, owner)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        return job

    async def served(jobs: list[dict]) -> list[dict]:
        """Whoever reads 'succeeded' finds the model registered (the watcher may not have run yet)."""
        for job in jobs:
            if job["status"] == "succeeded" and job["fine_tuned_model"] not in service.registry:
                try:
                    await run_in_threadpool(service.register, job)
                except Exception as exc:  # noqa: BLE001 - a listing never fails for one job's model
                    print(f"qforge jobs: cannot serve {job['fine_tuned_model']}: {exc!r}", flush=True)
        return jobs

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(body: JobBody, owner: str = Depends(caller)):
        return job_object(await run_in_threadpool(service.create_job, owner, body))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                        owner: str = Depends(caller)):
        wanted = ft_models.metadata_filter(request.query_params)  # metadata[key]=value, as OpenAI's
        if not wanted:
            rows, more = store.list_jobs(owner, after, limit)
        else:
            every = [r for r in store.list_jobs(owner, after, 10 ** 6)[0] if ft_models.matches_metadata(r, wanted)]
            rows, more = every[:limit], len(every) > limit
        return page([job_object(r) for r in await served(rows)], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str, owner: str = Depends(caller)):
        return job_object((await served([owned(job_id, owner)]))[0])

    @app.delete("/v1/fine_tuning/jobs/{job_id}")
    async def delete_job(job_id: str, owner: str = Depends(caller)):
        return await run_in_threadpool(service.delete_job, owner, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, owner: str = Depends(caller)):
        return job_object(await run_in_threadpool(service.cancel_job, owner, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                          owner: str = Depends(caller)):
        owned(job_id, owner)
        rows, more = store.list_events(job_id, after, limit)
        return page([event_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=1000),
                               owner: str = Depends(caller)):
        job = owned(job_id, owner)
        rows, more = store.list_checkpoints(job_id, after, limit)
        return page([checkpoint_object(r, job) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/adapter")
    async def download_adapter(job_id: str, owner: str = Depends(caller)):
        """The succeeded job's adapter folder as a zip, to the job's owner only (qforge.jobs.download)."""
        from .download import adapter_download
        return await run_in_threadpool(adapter_download, store, owned(job_id, owner))


def _add_dashboard(app: FastAPI) -> None:
    index = (WEB_DIR / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(index)

    app.mount("/dashboard", StaticFiles(directory=WEB_DIR), name="dashboard")
