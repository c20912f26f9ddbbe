"""Continuous batching over one base (4-bit, HQQ or dense) and many adapters, in a background thread.

Each iteration of the engine thread:
  1. admits waiting requests, oldest first, while the batch has room and the registry can pin the
     request's adapter (loading it if it was evicted);
  2. prefills the admitted prompts in one forward pass (left-padded, each row with its own adapter)
     and samples each one's first token;
  3. appends their KV cache to the running batch's; and
  4. runs one decode step over every running request: input (B, 1) holding each row's last token,
     per-row position ids, an attention mask (B, T + 1) that hides each row's left padding.
Requests that finish (EOS, a stop string, max_tokens, the context) or are cancelled leave the batch
after the forward that finished them, so the batch changes at every step.

KV cache: one transformers DynamicCache for the running batch, keys and values (B, H_kv, T, D) per
layer. Rows are left-padded: row b's n_b cached tokens are the last n_b of the T positions, so
the mask is (t >= T - n_b) and the next position id is n_b. Joining pads the shorter side on the left
and concatenates rows; leaving selects rows and trims columns that have become padding in every row.

Adapters: the rows' adapter names go to the registry's slots (qforge.serve.lora_slots) as one slot
per row, and every adapted layer adds each row's low-rank delta from its slot by one gathered batched
product (no weight swapping). A batch whose rows all use one adapter (or none) multiplies by that
slot's views instead (no gather needed).

Prompt log-probs (`echo`): the prefill makes only the last position's logits; the final hidden
states of the prompts that want log-probs are kept (B, P, H) and turned into logits PROMPT_CHUNK
positions at a time (qforge.serve.logprobs), so no P x vocab tensor ever exists.

Greedy output of a request in a mixed batch equals its output alone: padding is masked out exactly
(zero attention weight) and positions are per row; in float32 what remains are last-bit differences
in reduction order, in bfloat16 such differences can, rarely, flip a near-tie.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .logprobs import PROMPT_CHUNK, chunked_prompt_logprobs, output_logit_transform, step_logprobs

log = logging.getLogger("qforge.serve")


class QueueFull(Exception):
    """The engine's waiting queue is at max_queue."""


class RequestError(ValueError):
    """A request the engine cannot run as given (bad prompt, too long); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_p keeps the smallest set of tokens whose probability reaches it;
    `stop` strings end the text (they are not returned); `seed` makes sampling reproducible."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None      # record each sampled token's log-prob and this many alternatives
    prompt_logprobs: bool = False    # also score the prompt's own tokens (`echo`); then max_tokens may be 0
    stop_token_ids: frozenset = frozenset()  # more end ids for this request (its adapter's template's end of turn)

    def __post_init__(self):
        self.stop = tuple(s for s in self.stop if s)
        if self.max_tokens < (0 if self.prompt_logprobs else 1):
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")


@dataclass
class Event:
    """What the engine tells a request's sink: "delta" (new text), "done" or "error"."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # for "error": the HTTP status it maps to
    logprobs: list = field(default_factory=list)  # TokenLogprobs of the tokens this event releases


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation. `sink` is called from the engine thread with each Event."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None] = lambda event: None
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent as deltas
    finish_reason: str | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    # constrained decoding: an object with mask(logits (V,)) -> logits and advance(token) (structured.py)
    processor: object | None = None
    output_logprobs: list = field(default_factory=list)  # TokenLogprob per output token (params.logprobs)
    prompt_logprobs: list | None = None  # per prompt token, the first None (params.prompt_logprobs)
    logprobs_sent: int = 0  # output_logprobs already released in events

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


# ---- sampling and text ---------------------------------------------------------------------------
def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from float32 logits (V,): argmax at temperature 0, else nucleus sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= params.top_p  # mass before a token already reaches top_p
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: an incomplete UTF-8 sequence, or a suffix that may
    grow into a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


# ---- the batch's KV cache ------------------------------------------------------------------------
class KVBatch:
    """The running rows' DynamicCache, left-padded; `lengths[b]` = tokens cached for row b."""

    def __init__(self, cache=None, lengths: torch.Tensor | None = None):
        self.cache = cache
        self.lengths = lengths if lengths is not None else torch.zeros(0, dtype=torch.long)

    @property
    def width(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def attention_mask(self, extra: int = 0) -> torch.Tensor:
        """(B, T + extra) long: 1 for cached tokens and the `extra` new ones, 0 for left padding."""
        t = torch.arange(self.width + extra)
        return (t[None, :] >= (self.width - self.lengths)[:, None]).long()

    def append(self, other: "KVBatch") -> None:
        """Add other's rows after ours, padding the narrower side on the left."""
        if self.cache is None:
            self.cache, self.lengths = other.cache, other.lengths
            return
        width = max(self._stored_width(), other._stored_width())
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.lengths = torch.cat([self.lengths, other.lengths])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop leading columns that are padding in every kept row."""
        if not rows:
            self.cache, self.lengths = None, torch.zeros(0, dtype=torch.long)
            return
        index = torch.tensor(rows)
        self.lengths = self.lengths[index]
        start = self._stored_width() - self.width
        index = index.to(self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:].contiguous()
            layer.values = layer.values[index, :, start:].contiguous()

    def grow(self, n: int = 1) -> None:
        self.lengths = self.lengths + n

    def _stored_width(self) -> int:
        return self.cache.layers[0].keys.shape[-2] if self.cache is not None else 0


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:  # (B, H, T, D) -> (B, H, width, D)
    return F.pad(x, (0, 0, width - x.shape[-2], 0)) if x.shape[-2] < width else x


# ---- the engine ----------------------------------------------------------------------------------
class Engine:
    """Runs requests for `model` (a transformers causal LM whose linears are AdaptedLinear) and the
    adapters in `registry`, up to `max_batch` at once, with up to `max_queue` waiting."""

    def __init__(self, model, tokenizer, registry, max_batch: int = 32, max_queue: int = 256,
                 context_len: int | None = None, max_prefill_tokens: int = 4096, metrics=None):
        self.model, self.tokenizer, self.registry, self.metrics = model.eval(), tokenizer, registry, metrics
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.context_len = context_len or getattr(model.config, "max_position_embeddings", 2048)
        self.device = next(model.parameters()).device
        self.stop_token_ids = _stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_token_ids, default=0)  # masked out anyway
        self.logprob_chunk = PROMPT_CHUNK  # prompt positions whose logits exist at once (echo log-probs)
        self._decoder = model.get_decoder()  # its output: the final (normed) hidden states
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if any(getattr(layer, "is_sliding", False) for layer in _new_cache(model).layers):
            raise ValueError("the serving engine supports full-attention models only (this one has sliding-window "
                             "layers, whose caches cannot be left-padded and merged)")
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []  # the running batch, in KV row order
        self._kv = KVBatch()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # set if the engine thread died

    # ---- public, any thread ----------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="qforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for req in list(self._waiting) + list(self._rows):
            self._fail(req, "the server is shutting down")
        self._waiting.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._rows)

    def check(self, req: Request) -> None:
        """RequestError when `req` cannot run: an empty prompt, or prompt + max_tokens beyond the context."""
        if not req.prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        need = len(req.prompt_ids) + req.params.max_tokens
        if need > self.context_len:
            raise RequestError(f"this model's context is {self.context_len} tokens, but {len(req.prompt_ids)} "
                               f"prompt tokens + max_tokens {req.params.max_tokens} = {need}", "max_tokens")

    def submit(self, *requests: Request) -> None:
        """Queue requests, all or none: RequestError if one is invalid, QueueFull if they do not fit."""
        for req in requests:
            self.check(req)
        with self._cv:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max {self.max_queue})")
            self._waiting.extend(requests)
            self._cv.notify_all()
        self._gauges()

    def cancel(self, req: Request) -> None:
        """Stop `req` at the next step and free its slot (no further events are sent)."""
        req.cancelled = True
        with self._cv:
            with contextlib.suppress(ValueError):
                self._waiting.remove(req)
            self._cv.notify_all()
        self._gauges()

    def generate(self, prompt_ids: list[int], adapter: str | None = None, params: SamplingParams | None = None,
                 timeout: float | None = None) -> Request:
        """Blocking convenience: run one request to the end and return it (text, output_ids, ...)."""
        done = threading.Event()
        req = Request(list(prompt_ids), adapter, params or SamplingParams(temperature=0),
                      sink=lambda e: done.set() if e.kind in ("done", "error") else None)
        self.submit(req)
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError(f"request {req.id} did not finish in {timeout} s")
        if req.finish_reason == "error":
            raise RuntimeError(req.text)
        return req

    def embed(self, prompts: list[list[int]], adapter: str | None) -> torch.Tensor:
        """(N, H) float32: each prompt's last hidden state (after the final norm), mean-pooled over its
        own tokens. Runs in the caller's thread between the engine's steps (the registry's lock), one
        batch of right-padded prompts, the adapter pinned meanwhile."""
        if not self.registry.acquire(adapter):
            raise QueueFull("every adapter slot is held by running requests")
        try:
            width = max(len(p) for p in prompts)
            ids = torch.tensor([p + [self.pad_id] * (width - len(p)) for p in prompts], device=self.device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=self.device)
            with torch.no_grad(), self.registry.lock, self.registry.select([adapter] * len(prompts), self.device):
                out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                                 logits_to_keep=1)
            hidden = out.hidden_states[-1].float()                                  # (N, T, H)
            weights = mask[:, :, None].to(hidden.dtype)                               # (N, T, 1)
            return ((hidden * weights).sum(1) / weights.sum(1)).cpu()                 # (N, H)
        finally:
            self.registry.release(adapter)

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._cv.wait()
                    if self._stopping:
                        return
                with torch.no_grad():
                    progressed = self._iteration()
                if not progressed:  # waiting requests whose adapters cannot be loaded yet
                    with self._cv:
                        self._cv.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - keep the reason for /health
            log.exception("engine thread died")
            self.error = exc
            for req in list(self._waiting) + list(self._rows):
                self._fail(req, f"engine failure: {exc}")

    def _iteration(self) -> bool:
        new = self._admit()
        if new and not self._guarded(new, self._prefill):
            for req in new:
                if req not in self._rows:  # it never joined the batch: unpin here
                    self.registry.release(req.adapter)
        self._drop_finished()
        if self._rows:
            self._guarded(self._rows, self._decode_step)
            self._drop_finished()
        self._gauges()
        return bool(new or self._rows)

    def _guarded(self, rows: list[Request], step) -> bool:
        """Run a forward step; if it raises, fail the rows it was for and keep serving."""
        try:
            step(rows)
            return True
        except Exception as exc:  # noqa: BLE001
            log.exception("forward pass failed")
            for req in list(rows):
                self._fail(req, f"generation failed: {type(exc).__name__}: {exc}")
            return False

    def _admit(self) -> list[Request]:
        """Move waiting requests into the batch, oldest first, while there is room."""
        new: list[Request] = []
        with self._cv:
            pending = list(self._waiting)
        for req in pending:
            if len(self._rows) + len(new) >= self.max_batch:
                break
            width = max([len(r.prompt_ids) for r in new] + [len(req.prompt_ids)])
            if new and width * (len(new) + 1) > self.max_prefill_tokens:
                break
            if req.cancelled:
                self._remove_waiting(req)
                continue
            try:
                if not self.registry.acquire(req.adapter):
                    continue  # every adapter slot is pinned; try again after some rows finish
            except Exception as exc:  # noqa: BLE001 - the adapter was deleted or fails to load
                self._remove_waiting(req)
                self._fail(req, str(exc), getattr(exc, "status", 500))
                continue
            self._remove_waiting(req)
            req.admitted = time.monotonic()
            self._observe("queue_wait", req.admitted - req.arrived)
            new.append(req)
        return new

    def _remove_waiting(self, req: Request) -> None:
        with self._cv:
            with contextlib.suppress(ValueError):
                self._waiting.remove(req)

    def _prefill(self, new: list[Request]) -> None:
        """One forward over the new prompts, left-padded to a common length; sample first tokens."""
        width = max(len(r.prompt_ids) for r in new)
        ids = [[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in new]  # (N, P)
        kv = KVBatch(_new_cache(self.model), torch.tensor([len(r.prompt_ids) for r in new]))
        mask = kv.attention_mask()                                  # (N, P)
        positions = (mask.cumsum(1) - 1).clamp(min=0)               # (N, P), per row from 0
        scored = [r for r in new if r.params.prompt_logprobs]
        keep = max((len(r.prompt_ids) for r in scored), default=0)  # hidden states of the prompts that want them
        start = time.perf_counter()
        logits, hidden = self._forward(ids, mask, positions, kv.cache, [r.adapter for r in new], keep=keep)  # (N, V)
        self._observe("step_seconds", time.perf_counter() - start, phase="prefill")
        self._kv.append(kv)
        self._rows.extend(new)
        for b, (req, row) in enumerate(zip(new, logits)):
            if req.params.prompt_logprobs:
                n = len(req.prompt_ids)
                req.prompt_logprobs = chunked_prompt_logprobs(
                    hidden[b, keep - n:], req.prompt_ids, req.params.logprobs or 0,
                    lambda h, adapter=req.adapter: self._head(h, adapter), self.logprob_chunk)
            if req.cancelled:
                continue
            if req.params.max_tokens == 0:  # echo only: the prompt's log-probs are the answer
                self._finish(req, "length")
            else:
                self._sample_into(req, row)

    def _decode_step(self, rows: list[Request]) -> None:
        """One token for every running row: input (B, 1), mask (B, T + 1), positions (B, 1)."""
        ids = [[r.output_ids[-1]] for r in rows]                   # (B, 1)
        mask = self._kv.attention_mask(extra=1)                     # (B, T + 1)
        positions = self._kv.lengths[:, None]                      # (B, 1)
        start = time.perf_counter()
        logits, _ = self._forward(ids, mask, positions, self._kv.cache, [r.adapter for r in rows])  # (B, V)
        self._observe("step_seconds", time.perf_counter() - start, phase="decode")
        self._observe("batch_size", len(rows))
        self._kv.grow(1)
        for req, row in zip(rows, logits):
            if req.finish_reason is None and not req.cancelled:
                self._sample_into(req, row)

    def _sample_into(self, req: Request, logits: torch.Tensor) -> None:
        """Sample and accept one token for `req`; a failing grammar fails this request only."""
        try:
            token = self._pick(req, logits)
        except Exception as exc:  # noqa: BLE001 - one row's grammar must not fail the batch
            log.exception("sampling failed for request %s", req.id)
            self._fail(req, f"sampling failed: {type(exc).__name__}: {exc}")
            return
        self._accept(req, token)

    def _pick(self, req: Request, logits: torch.Tensor) -> int:
        """Sample a request's next token from its float32 logits (V,): through its grammar's mask
        when it has one; record the token's log-prob (of the raw logits) when it asked."""
        allowed = req.processor.mask(logits) if req.processor is not None else logits
        token = sample_token(allowed, req.params, req.generator)
        if req.params.logprobs is not None:
            req.output_logprobs.append(step_logprobs(logits, token, req.params.logprobs))
        if req.processor is not None:
            req.processor.advance(token)
        return token

    def _forward(self, ids: list[list[int]], mask, positions, cache, adapters: list[str | None],
                 keep: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last-position logits (B, V) float32 on the CPU, where the samplers' generators live;
        with `keep`, the final hidden states of the last `keep` positions (B, keep, H) on the
        device, else None). Only the last position's logits are ever made here: prompt log-probs
        come from the hidden states a chunk at a time (_head). The registry's lock keeps the
        adapters in place meanwhile."""
        ids = torch.tensor(ids, device=self.device)
        mask, positions = mask.to(self.device), positions.to(self.device)
        captured = []
        hook = self._decoder.register_forward_hook(lambda _m, _i, out: captured.append(out[0])) if keep else None
        try:
            with self.registry.lock, self.registry.select(adapters, self.device):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 logits_to_keep=1, **{self._cache_kw: cache})
        finally:
            if hook is not None:
                hook.remove()
        hidden = captured[-1][:, -keep:] if keep else None
        return out.logits[:, -1, :].float().cpu(), hidden

    def _head(self, hidden: torch.Tensor, adapter: str | None) -> torch.Tensor:
        """(C, V) logits of one request's final hidden states (C, H), as the model's forward makes
        them (the output layer, then the family's logit scaling / soft-capping if it has one)."""
        with self.registry.lock, self.registry.select([adapter], self.device):
            logits = self.model.get_output_embeddings()(hidden[None])[0]   # (C, V)
        return output_logit_transform(self.model.config, logits)

    # ---- per-request bookkeeping ----------------------------------------------------------------
    def _accept(self, req: Request, token: int) -> None:
        """Record a sampled token; stream new text; decide whether the request is finished."""
        now = time.monotonic()
        if req.first_token is None:
            req.first_token = now
            self._observe("ttft", now - req.arrived)
        req.output_ids.append(token)
        eos = (token in self.stop_token_ids or token in req.params.stop_token_ids) and not req.params.ignore_eos
        text = self.tokenizer.decode(req.output_ids[:-1] if eos else req.output_ids, skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in req.params.stop) if i >= 0), default=-1)
        if hit >= 0:
            text, reason = text[:hit], "stop"
        elif eos:
            reason = "stop"
        elif len(req.output_ids) >= req.params.max_tokens or \
                len(req.prompt_ids) + len(req.output_ids) >= self.context_len:
            reason = "length"
        else:
            reason = None
        req.text = text
        end = len(text) if reason else len(text) - _held_back(text, req.params.stop)
        if eos and req.output_logprobs:
            req.output_logprobs.pop()  # the end token is not part of the answer
        if end > req.emitted:
            req.sink(Event("delta", text[req.emitted:end], logprobs=self._release_logprobs(req)))
            req.emitted = end
        if reason:
            self._finish(req, reason)

    @staticmethod
    def _release_logprobs(req: Request) -> list:
        """The recorded log-probs not yet sent with an event."""
        out = req.output_logprobs[req.logprobs_sent:]
        req.logprobs_sent = len(req.output_logprobs)
        return out

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason, req.finished = reason, time.monotonic()
        if self.metrics is not None:
            self.metrics.finished.inc(reason=reason)
        req.sink(Event("done", req.text, reason, len(req.prompt_ids), len(req.output_ids),
                       logprobs=self._release_logprobs(req)))

    def _fail(self, req: Request, message: str, status: int = 500) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason, req.text, req.finished = "error", message, time.monotonic()
        req.sink(Event("error", error=message, prompt_tokens=len(req.prompt_ids),
                       completion_tokens=len(req.output_ids), status=status))

    def _drop_finished(self) -> None:
        """Rows that finished or were cancelled leave the batch and unpin their adapters."""
        keep = [i for i, r in enumerate(self._rows) if r.finish_reason is None and not r.cancelled]
        if len(keep) == len(self._rows):
            return
        for i, req in enumerate(self._rows):
            if i not in keep:
                if req.finish_reason is None:
                    req.finish_reason = "cancelled"
                self.registry.release(req.adapter)
        self._rows = [self._rows[i] for i in keep]
        self._kv.keep(keep)

    def _observe(self, name: str, value: float, **labels) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).observe(value, **labels)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._rows))


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _stop_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config, and the chat template's end of turn."""
    from ..model.templates import end_ids
    return set(end_ids(tokenizer, None, getattr(model, "generation_config", None)))
