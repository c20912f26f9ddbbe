"""POST /v1/embeddings: OpenAI's embeddings route over the served base model or any of its adapters.

An input's embedding is the model's last hidden state (the output of the final norm, the vector the
LM head reads) averaged over the input's own tokens (padding excluded), in float32: a plain,
untrained pooling, useful for similarity between texts the same model reads, not a trained
retrieval embedding. `encoding_format` "float" gives a list of numbers, "base64" the float32 values
little-endian, base64-encoded (what the openai client asks for by default and decodes).

Bounded work: the inputs' tokens summed are checked against the server's max_request_tokens before
any forward (400 naming the limit), and the inputs run in chunks of at most embed_chunk_tokens
padded tokens (api/limits.py), each chunk one forward between the engine's steps: memory follows
the chunk, and generation keeps going between chunks.
"""
from __future__ import annotations

import base64
from typing import Literal

import torch

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .engine import QueueFull
from .guards import lone_surrogate
from .registry import AdapterError

MAX_INPUTS = 256


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def _items(raw, api_error) -> list:
    """The inputs as a list (a string or one token list is one input); 400 for a count out of range or
    text that cannot be UTF-8 (a lone surrogate)."""
    items = [raw] if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)) else raw
    if not items or len(items) > MAX_INPUTS:
        raise api_error(400, f"input: give 1 to {MAX_INPUTS} inputs", param="input")
    for i, item in enumerate(items):
        if isinstance(item, str) and lone_surrogate(item):
            raise api_error(400, f"input[{i}]: the text holds a lone surrogate (not valid Unicode)", param="input",
                            code="invalid_value")
    return items


def _inputs(state, raw, api_error) -> list[list[int]]:
    """Token ids of each input: a string, strings, a token list, or token lists (as for completions)."""
    items = _items(raw, api_error)
    vocab, out = len(state.tokenizer), []
    for i, item in enumerate(items):
        ids = state.tokenizer(item, add_special_tokens=False).input_ids if isinstance(item, str) else list(item)
        if not ids:
            raise api_error(400, f"input[{i}] is empty", param="input")
        if any(not 0 <= t < vocab for t in ids):
            raise api_error(400, f"input[{i}] holds token ids outside [0, {vocab})", param="input")
        if len(ids) > state.engine.context_len:
            raise api_error(400, f"input[{i}] has {len(ids)} tokens; this model's context is "
                            f"{state.engine.context_len}", param="input")
        out.append(ids)
    state.limits.check_tokens(sum(len(ids) for ids in out), "the inputs' tokens summed", "input")
    return out


def _embed_chunks(state, prompts: list[list[int]], adapter: str | None) -> torch.Tensor:
    """(N, H) float32: the inputs' embeddings, one forward per bounded chunk (see api/limits.py)."""
    from .api.limits import embedding_chunks
    parts = [state.engine.embed(chunk, adapter) for chunk in embedding_chunks(prompts, state.limits.embed_chunk_tokens)]
    return torch.cat(parts)


def _encode(vector, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def add_embedding_routes(app: FastAPI, state, caller, api_error) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, key_id: str = Depends(caller)):
        for field in ("model", "user"):
            if lone_surrogate(getattr(body, field)):
                raise api_error(400, f"{field}: the text holds a lone surrogate (not valid Unicode)", param=field,
                                code="invalid_value")
        adapter = await run_in_threadpool(state.resolve_model, body.model, key_id)  # the jobs' guard reads a database
        prompts = await state.off_loop.run(_inputs, state, body.input, api_error)
        try:
            hidden = await run_in_threadpool(_embed_chunks, state, prompts, adapter)   # (N, H)
        except QueueFull as exc:
            raise api_error(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                            code="queue_full", headers={"Retry-After": "1"}) from exc
        except AdapterError as exc:
            raise api_error(exc.status, str(exc), param="model", code=exc.code) from exc
        if body.dimensions is not None and body.dimensions != hidden.shape[1]:
            raise api_error(400, f"dimensions: this model's embeddings have {hidden.shape[1]}", param="dimensions")
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(hidden)]
        tokens = sum(len(p) for p in prompts)
        state.usage.record(body.model, key_id, tokens, 0)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
