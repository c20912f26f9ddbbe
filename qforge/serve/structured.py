"""Structured outputs: `response_format` (json_object, json_schema) and forced tool calls, by
constrained decoding with llguidance.

Why llguidance: it installs from PyPI as one self-contained wheel with no dependencies (xgrammar
requires torch and triton, so pip would pull a CUDA torch over our pinned CPU one), runs on the CPU,
compiles a JSON schema in about a millisecond and computes each step's mask lazily (an Earley parser
over the tokenizer's trie: about 0.015 ms per token for the schemas of the tests, on SmolLM2's
49,152-token vocabulary, measured here), with no per-schema index over the whole vocabulary as
outlines-core builds, and handles recursive grammars, so "any JSON object" (json_object) is exact.
Building llguidance's view of a tokenizer takes about 2 s, once per server.

Each request that asks gets its own `GrammarProcessor` (an llguidance matcher): before sampling, the
engine calls `mask(logits)`, which sets every token the grammar forbids at this point to -inf; after
sampling, `advance(token)`. Once the grammar is complete only an end token is allowed, so the answer
stops there. Rows of one batch each have their own grammar (or none), whatever their adapters.
Log-probs, when asked for, stay those of the unconstrained model (see logprobs.py).

JSON is generated compactly (no free whitespace between tokens: a small model left free to emit
whitespace can pad forever), "," and ":" as separators.
"""
from __future__ import annotations

import json

import numpy as np
import torch

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GrammarCompiler:
    """llguidance's view of one tokenizer (built once: about a second) and the grammars over it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        import llguidance

        backend = tokenizer.backend_tokenizer  # a fast (Rust) tokenizer; slow ones are not supported
        from copy import copy
        backend = copy(backend)
        backend.no_padding()
        backend.no_truncation()
        eos = sorted(eos_ids) or [tokenizer.eos_token_id]
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._llg = llguidance

    def json_schema(self, schema: dict, param: str) -> str:
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{param}: not a usable JSON schema: {exc}", param) from exc
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"{param}: the JSON schema cannot be enforced: {error}", param)
        return grammar

    def processor(self, grammar: str) -> "GrammarProcessor":
        return GrammarProcessor(self._llg.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size)


class GrammarProcessor:
    """One request's grammar state: mask(logits (V,)) -> masked copy; advance(token)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.matcher.is_error():
            raise RuntimeError(f"the output grammar failed: {self.matcher.get_error()}")
        allowed = self.allowed()
        if len(allowed) < logits.shape[-1]:  # logits past the tokenizer's vocabulary: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - len(allowed))])
        return logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))


# ---- what a request asks for ---------------------------------------------------------------------
def response_format_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a `response_format` enforces; None for plain text. GrammarError when malformed."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format.json_schema must be an object with a 'schema' object",
                               "response_format.json_schema")
        return spec.get("schema") or {"type": "object"}
    raise GrammarError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                       "response_format.type")


def tool_call_schema(tools: list[dict]) -> dict:
    """The schema of one call to any of `tools`: {"name": <its name>, "arguments": <its parameters>}."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def compile_plan(engine, schema: dict, param: str):
    """A factory of fresh GrammarProcessors for `schema`, over the engine's tokenizer (llguidance's
    view of it is built on first use and kept on the engine)."""
    compiler = getattr(engine, "grammar_compiler", None)
    if compiler is None:
        vocab = int(engine.model.config.vocab_size) if hasattr(engine.model, "config") else len(engine.tokenizer)
        compiler = engine.grammar_compiler = GrammarCompiler(engine.tokenizer, vocab, engine.stop_token_ids)
    grammar = compiler.json_schema(schema, param)
    return lambda: compiler.processor(grammar)
