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

Bounded compile work: llguidance builds a pattern's automaton lazily, and counted repetitions nest
multiplicatively (`((a{1000}){1000}){1000}` is 10^9 states), so before compiling, `check_schema`
walks the schema without recursion and refuses (a 400 naming the field) a schema of more than
MAX_SCHEMA_NODES values, a pattern longer than MAX_PATTERN_CHARS, or one whose counted repetitions,
multiplied along their nesting, pass MAX_PATTERN_REPEAT. The bound is on the pattern's structure,
so the answer never depends on how fast the machine is.

JSON is generated compactly (no free whitespace between tokens: a small model left free to emit
whitespace can pad forever), "," and ":" as separators.
"""
from __future__ import annotations

import json
import re

import numpy as np
import torch

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_SCHEMA_NODES = 10_000
MAX_PATTERN_CHARS = 2_000
MAX_PATTERN_REPEAT = 10_000  # counted repetitions multiplied along their nesting
_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


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
        check_schema(schema, param)
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{param}: not a usable JSON schema: {exc}", param) from exc
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"{param}: the JSON schema cannot be enforced: {_first_line(error)}", param)
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
            raise RuntimeError(f"the output grammar failed: {_first_line(self.matcher.get_error())}")
        allowed = self.allowed()
        if len(allowed) < logits.shape[-1]:  # logits past the tokenizer's vocabulary: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - len(allowed))])
        return logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))


def _first_line(message: str, limit: int = 200) -> str:
    """llguidance's errors carry its parser state after the first line: only the first line is shown."""
    return (message or "").strip().splitlines()[0][:limit] if (message or "").strip() else "unknown error"


def pattern_repeat(pattern: str) -> int:
    """The largest product of counted repetitions ({n}, {n,m}, {n,}) along one nesting path of
    `pattern`: the factor by which its automaton can grow. Computed bottom-up: each open group keeps
    the worst product inside it; a count multiplies the group (or atom) just before it."""
    frames, last, i = [1], None, 0  # last: the worst product of the atom or group a count would apply to
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":                       # an escaped character is one atom
            i, last = i + 2, 1
            continue
        if c == "[":                         # a character class is one atom (its braces are literal)
            end = pattern.find("]", i + 2)
            i, last = (len(pattern) if end < 0 else end + 1), 1
            continue
        m = _COUNT.match(pattern, i) if c == "{" else None
        if c == "(":
            frames.append(1)
            last = None
        elif c == ")" and len(frames) > 1:
            last = frames.pop()
            frames[-1] = max(frames[-1], last)
        elif m:
            product = max(int(m[1]), int(m[2]) if m[2] else 0, 1) * (last or 1)
            frames[-1] = max(frames[-1], product)
            i, last = m.end(), None
            continue
        else:
            last = None if c in "|*+?" else 1
        i += 1
    return max(frames)


def check_schema(schema, param: str) -> None:
    """GrammarError when compiling `schema` could cost more than the bounds allow (module docstring)."""
    todo, nodes = [schema], 0
    while todo:
        item = todo.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise GrammarError(f"{param}: the schema has more than {MAX_SCHEMA_NODES} values", param)
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "pattern" and isinstance(value, str):
                    _check_pattern(value, param)
                if key == "patternProperties" and isinstance(value, dict):
                    for p in value:
                        _check_pattern(p, param)
                todo.append(value)
        elif isinstance(item, list):
            todo.extend(item)


def _check_pattern(pattern: str, param: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise GrammarError(f"{param}: a pattern is longer than {MAX_PATTERN_CHARS} characters", param)
    if pattern_repeat(pattern) > MAX_PATTERN_REPEAT:
        raise GrammarError(f"{param}: a pattern's counted repetitions multiply past {MAX_PATTERN_REPEAT} "
                           "(nested {n} quantifiers); simplify it", param)


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
