"""The shapes of the jobs API: request bodies (pydantic, strict where OpenAI's types are) and the
OpenAI objects answered (file, fine_tuning.job, its events and checkpoints, list pages)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..serve.api import APIError
from .store import fine_tuned_model_name


# ---- request bodies ------------------------------------------------------------------------------
class Hyperparameters(BaseModel):
    """OpenAI's three; 'auto' resolves to TrainConfig's epochs and batch size and multiplier 1 (its lr)."""
    model_config = ConfigDict(extra="forbid", strict=True)  # "n_epochs": "2" is a 400, not 2

    # the bounds on the number, not the union ("auto" has no bound); the number first, so that its
    # bound is the error a client reads
    n_epochs: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] | None = None


class QForgeHyperparameters(Hyperparameters):
    """method.supervised.hyperparameters: OpenAI's three and qforge's own settings (TrainConfig names).
    Unknown keys are kept (extra="allow") only so that the service can refuse them with the list of
    the accepted ones (qforge.jobs.methods.check_known_keys), which pydantic's message does not give."""
    model_config = ConfigDict(extra="allow", strict=True)

    method: Literal["qlora", "lora", "full", "auto"] | None = None
    rank: int | None = Field(None, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: str | list[str] | None = None
    quant_type: Literal["nf4", "fp4"] | None = None
    double_quant: bool | None = None
    max_seq_len: int | None = Field(None, ge=8, le=131072)
    max_steps: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    grad_accum: int | None = Field(None, ge=1, le=1024)
    compute_dtype: Literal["bfloat16", "float32"] | None = None
    # processes the job trains in (torchrun on the worker's machine; qlora only); the upper bound is the
    # service's --max-processes-per-job, checked with the method (qforge.jobs.methods.check_processes)
    n_processes: int | None = Field(None, ge=1)


class OrpoHyperparameters(QForgeHyperparameters):
    """method.orpo.hyperparameters (qforge's own method, in OpenAI's shape): the supervised settings
    and beta, ORPO's lambda (the weight of the odds-ratio term; TRL calls it beta too)."""
    beta: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] | None = None


class DpoHyperparameters(OrpoHyperparameters):
    """method.dpo.hyperparameters: OpenAI's (beta, batch_size, learning_rate_multiplier, n_epochs),
    qforge's supervised settings, and label_smoothing (conservative DPO's share of flipped pairs)."""
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)


class TopHyperparameters(DpoHyperparameters):
    """The request's top-level `hyperparameters`: the same settings as the method's own (one schema;
    where OpenAI's clients and users put them). The method's type decides which are accepted
    (qforge.jobs.methods.resolve_settings refuses the others, listing the accepted ones)."""


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: QForgeHyperparameters | None = None


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Orpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: OrpoHyperparameters | None = None


class MethodBody(BaseModel):
    """OpenAI's `method`: its type and that type's settings under the key of the same name."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["supervised", "dpo", "orpo", "reinforcement"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    orpo: Orpo | None = None

    def settings(self) -> QForgeHyperparameters | None:
        """The hyperparameters given under this method's own key (None when none)."""
        part = getattr(self, self.type, None)
        return part.hyperparameters if part is not None else None


class JobBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2 ** 31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: TopHyperparameters | None = None
    method: MethodBody | None = None
    integrations: list | None = None


# ---- OpenAI objects ------------------------------------------------------------------------------
def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}


def job_object(row: dict) -> dict:
    hp = row["hyperparameters"]
    return {"object": "fine_tuning.job", "id": row["id"], "created_at": row["created_at"], "error": row["error"],
            "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
            "hyperparameters": hp, "model": row["model"], "organization_id": "org-qforge",
            "result_files": row["result_files"], "seed": row["seed"], "status": row["status"],
            "trained_tokens": row["trained_tokens"], "training_file": row["training_file"],
            "validation_file": row["validation_file"], "estimated_finish": row["estimated_finish"],
            "integrations": [], "metadata": row["metadata"], "method": row["method"],
            "user_provided_suffix": row["suffix"]}


def event_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"], "type": row["type"]}


def checkpoint_object(row: dict, job: dict) -> dict:
    model = fine_tuned_model_name(job["model"], job["suffix"], job["id"])
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{row['step']}", "fine_tuning_job_id": job["id"],
            "metrics": row["metrics"], "step_number": row["step"]}


def page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"No such {kind}: '{ident}'", "invalid_request_error", param="id", code="not_found")
