"""The bridge between the engine's thread and the event loop: one generation request.

A `Generation` turns an HTTP body into engine requests (n choices per prompt), receives their events
on the event loop, and answers either whole (`complete`) or as server-sent events in OpenAI's chunk
format ending with `data: [DONE]` (`stream`). However it ends (done, client gone, send failed), the
unfinished choices are cancelled so their batch slots are freed, and the tokens used are booked once.

    engine thread --sink(index)--> call_soon_threadsafe --> asyncio.Queue --> next_event --> JSON | SSE
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import Event, QueueFull, Request as GenRequest, RequestError, SamplingParams
from ..guards import FLOAT32_TINY
from ..logprobs import chat_logprobs, completion_logprobs, trim_to_text
from ..tools import OutputPlan
from .errors import APIError, ClientGone, error_body
from .schemas import GenerationBody
from .state import AppState

DISCONNECT_POLL_S = 0.25

class Events:
    """Events of several engine requests, handed to the event loop as (choice index, Event)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        def put(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass
        return put


def raise_for_event(event: Event) -> None:
    if event.status == 404:
        raise APIError(404, event.error or "model not found", param="model", code="model_not_found")
    raise APIError(event.status, event.error or "generation failed", "server_error")


UNRESOLVED = object()


class Generation:
    """One HTTP generation request: n choices over one or more prompts, run by the engine."""

    def __init__(self, app_state: AppState, kind: str, body: GenerationBody, prompts: list[list[int]],
                 max_tokens: list[int], key_id: str, plan: OutputPlan | None = None, grammar=None,
                 adapter: str | None | object = UNRESOLVED):
        """`adapter`: the model already resolved for this caller (routes resolve it off the event
        loop: the jobs' model guard reads the database); UNRESOLVED: resolve it here."""
        self.s, self.kind, self.body, self.key_id = app_state, kind, body, key_id
        self.plan, self.grammar = plan or OutputPlan(), grammar  # grammar: makes a GrammarProcessor per choice
        self.adapter = app_state.resolve_model(body.model, key_id) if adapter is UNRESOLVED else adapter
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompts = prompts
        self.events = Events()
        self.closed = False
        self.next_check = 0.0
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self.top_k, score_prompt = body.logprob_options()
        self.echo = kind == "completion" and body.echo
        self.offsets: dict[int, int] = {}  # streaming: characters sent so far per choice (text_offset)
        self.requests = []
        ends = adapter_end_ids(app_state, self.adapter)
        for p, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
            for k in range(body.n):
                seed = None if body.seed is None else body.seed + k
                params = sampling_params(limit, body.temperature, body.top_p, stops, seed, body.ignore_eos,
                                 logprobs=self.top_k, prompt_logprobs=score_prompt, stop_token_ids=ends)
                index = p * body.n + k
                processor = self.grammar() if self.grammar is not None else None
                self.requests.append(GenRequest(prompt, self.adapter, params, sink=self.events.sink(index),
                                                processor=processor))

    def submit(self) -> None:
        if not self.s.engine.alive:
            raise APIError(503, "the generation engine has stopped; see /health", "server_error", code="engine_down")
        try:
            self.s.engine.submit(*self.requests)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from exc
        except RequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code="context_length_exceeded"
                           if exc.param == "max_tokens" else "invalid_value") from exc

    def cancel_unfinished(self) -> None:
        for req in self.requests:
            if req.finish_reason is None:
                self.s.engine.cancel(req)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(r.output_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        """Free the engine slots of unfinished choices and book the tokens used; once."""
        self.cancel_unfinished()
        if not self.closed:
            self.closed = True
            self.record_usage()

    def record_usage(self) -> None:
        u = self.usage()
        self.s.usage.record(self.body.model, self.key_id, u["prompt_tokens"], u["completion_tokens"])
        self.s.metrics.prompt_tokens.inc(u["prompt_tokens"], model=self.body.model)
        self.s.metrics.completion_tokens.inc(u["completion_tokens"], model=self.body.model)

    async def next_event(self, http_request: Request) -> tuple[int, Event]:
        """The next (index, event); cancels everything and raises if the client went away (checked
        every DISCONNECT_POLL_S, events flowing or not)."""
        while True:
            if time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await http_request.is_disconnected():
                    self.cancel_unfinished()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.events.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    async def complete(self, http_request: Request) -> dict:
        """Wait for every choice, then the whole response body."""
        self.submit()
        done: dict[int, Event] = {}
        try:
            while len(done) < len(self.requests):
                index, event = await self.next_event(http_request)
                if event.kind == "error":
                    raise_for_event(event)
                if event.kind == "done":
                    done[index] = event
        finally:
            self.close()
        choices = [self._choice(i, done[i]) for i in range(len(self.requests))]
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def _choice(self, index: int, event: Event) -> dict:
        req, tok = self.requests[index], self.s.tokenizer
        entries = trim_to_text(tok, req.output_logprobs, event.text) if self.top_k is not None else []
        if self.kind == "chat":
            message, called = self.plan.message(event.text)
            return {"index": index, "message": message,
                    "logprobs": chat_logprobs(tok, entries) if self.top_k is not None else None,
                    "finish_reason": openai_finish_reason(called, event.finish_reason)}
        prefix = tok.decode(req.prompt_ids) if self.echo else ""
        logprobs = None
        if self.top_k is not None:
            scored = (req.prompt_logprobs or [None] * len(req.prompt_ids)) if self.echo else []
            tokens = (req.prompt_ids if self.echo else []) + [e.token for e in entries]
            logprobs = completion_logprobs(tok, scored + entries, tokens)
        return {"index": index, "text": prefix + event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}

    # ---- streaming ------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.body.model, "choices": choices, "system_fingerprint": None}
        if self.body.stream_options and self.body.stream_options.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def _delta(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
               entries: list | None = None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            logprobs = chat_logprobs(self.s.tokenizer, entries) if self.top_k is not None and entries else None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": self._stream_logprobs(index, entries),
                "finish_reason": finish}

    def _stream_logprobs(self, index: int, entries: list | None, tokens: list[int] | None = None) -> dict | None:
        """A completion chunk's legacy logprobs, text offsets running on from the choice's last chunk."""
        if self.top_k is None or not (entries or tokens):
            return None
        tokens = tokens if tokens is not None else [e.token for e in entries]
        out = completion_logprobs(self.s.tokenizer, entries, tokens, self.offsets.get(index, 0))
        self.offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1]) if tokens else self.offsets.get(index, 0)
        return out

    def _tool_delta(self, index: int, event: Event, entries: list) -> dict:
        """With tools, a streamed answer comes as one delta: its text, or its tool calls."""
        message, called = self.plan.message(event.text)
        if called:
            delta = {"tool_calls": [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]}
        else:
            delta = {"content": event.text}
        logprobs = chat_logprobs(self.s.tokenizer, entries) if self.top_k is not None and entries else None
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": openai_finish_reason(called, event.finish_reason)}

    def _echo_chunk(self, index: int) -> str:
        """Streaming with echo: a choice opens with its prompt's text (and log-probs, known once prefilled)."""
        req = self.requests[index]
        entries = req.prompt_logprobs or [None] * len(req.prompt_ids)
        return self._chunk([{"index": index, "text": self.s.tokenizer.decode(req.prompt_ids),
                             "logprobs": self._stream_logprobs(index, entries, req.prompt_ids), "finish_reason": None}])

    async def stream(self, http_request: Request):
        """Server-sent events: a role chunk per choice (chat), text deltas, a finish chunk per choice,
        the usage chunk when asked for, then [DONE]. Ends early (and frees the slots) on disconnect."""
        finished = 0
        try:
            if self.kind == "chat":
                yield self._chunk([self._delta(i, role=True) for i in range(len(self.requests))])
            echoed: set[int] = set()
            pending: dict[int, list] = {}  # with tools: log-probs held until the answer is whole
            while finished < len(self.requests):
                index, event = await self.next_event(http_request)
                if self.echo and index not in echoed and event.kind != "error":
                    echoed.add(index)
                    yield self._echo_chunk(index)
                if event.kind == "delta" and self.plan.tools:
                    pending.setdefault(index, []).extend(event.logprobs)  # a call is whole only at the end
                elif event.kind == "delta":
                    yield self._chunk([self._delta(index, event.text, entries=event.logprobs)])
                elif event.kind == "done":
                    finished += 1
                    if self.plan.tools:
                        yield self._chunk([self._tool_delta(index, event, pending.pop(index, []) + event.logprobs)])
                    else:
                        yield self._chunk([self._delta(index, finish=event.finish_reason, entries=event.logprobs)])
                else:
                    yield f"data: {json.dumps(error_body(event.error or 'generation failed', 'server_error'))}\n\n"
                    break
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.close()


def openai_finish_reason(called: bool, reason: str | None) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended by itself with tool calls."""
    return "tool_calls" if called and reason == "stop" else reason


class EventStream(StreamingResponse):
    """The SSE response; however the stream ends (done, client gone, send failed), the generation's
    unfinished choices are cancelled at once, so their batch slots are freed."""

    def __init__(self, generation: Generation, request: Request):
        super().__init__(generation.stream(request), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def sampling_params(max_tokens, temperature, top_p, stops, seed, ignore_eos, **extra) -> SamplingParams:
    try:
        top_p = max(top_p, FLOAT32_TINY)  # a smaller top_p means the same (the top token) but compares as 0
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed,
                              ignore_eos=ignore_eos, **extra)
    except RequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc




def adapter_end_ids(app_state: AppState, adapter: str | None) -> frozenset:
    """The end-of-turn id of the chat template saved with `adapter` (its rows stop there), or none."""
    from ...model.templates import end_of_turn_id
    from .routes import adapter_chat_template

    template = adapter_chat_template(app_state, adapter)
    eot = end_of_turn_id(app_state.tokenizer, template) if template else None
    return frozenset() if eot is None else frozenset([eot])
