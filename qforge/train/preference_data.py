"""Preference pairs: rows in the shapes people have, checked before any model loads, tokenised into
(prompt, chosen, rejected) and collated into the concatenated batch qforge.train.preference reads.

Files are read by qforge.train.datafiles (JSONL, JSON, Parquet, CSV, a saved `datasets` folder); a
bad row raises DataError naming the file and the line (or row). Three row shapes, one per file:

  openai    OpenAI's preference fine-tuning format:
            {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
             "non_preferred_output": [{"role": "assistant", "content": ...}]}
  trl       TRL's preference format: {"prompt", "chosen", "rejected"} as plain text (three strings),
            or conversational (three lists of messages); without "prompt", conversational chosen and
            rejected share their first turns, which are the prompt (TRL's implicit prompt)
  sharegpt  ShareGPT-style pairs, as LLaMA-Factory (`ranking: true`) and Axolotl read them: the prompt
            turns under "conversations" (from/value) or "messages" (role/content), an optional
            "system" string, and "chosen"/"rejected" each one turn (an object), a list of turns or
            a string (the assistant's reply)

Every shape becomes a canonical row {"prompt": [messages], "chosen": [messages], "rejected":
[messages]} (or three strings for plain text), so the same conversation gives the same tokens
whichever shape carried it. Tool definitions (OpenAI's input.tools) are refused: the chat templates
qforge renders take none yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import IGNORE, ROLES, SHAREGPT_ROLES, DataError, collate, completion_example, tokenize_example
from .datafiles import DataFileError, read_records

SHAPES = ("openai", "trl", "sharegpt")


# ---------------------------------------------------------------------------------------------
# Checking rows


def _shape_of(row: dict) -> str | None:
    """The shape a row looks like, by its distinguishing keys (None when it has none of them)."""
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai"
    if "conversations" in row or ("messages" in row and "chosen" in row):
        return "sharegpt"
    if "chosen" in row or "rejected" in row:
        return "trl"
    return None


def _messages_problem(messages, key: str, need_assistant: bool = False) -> str | None:
    """What is wrong with a list of role/content messages, or None."""
    if not isinstance(messages, list):
        return f"'{key}' must be a list of messages, got {type(messages).__name__}"
    if not messages:
        return f"empty '{key}'"
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            return f"{where} must be an object, got {type(msg).__name__}"
        if msg.get("role") not in ROLES:
            return f"{where}: role must be one of {', '.join(ROLES)}, got {msg.get('role')!r}"
        if not isinstance(msg.get("content"), str):
            return f"{where}: 'content' must be a string, got {type(msg.get('content')).__name__}"
        if msg["role"] == "assistant" and not msg["content"].strip() and need_assistant:
            return f"{where}: empty assistant 'content'"
    if need_assistant and messages[-1]["role"] != "assistant":
        return f"'{key}' must end with an assistant message, got {messages[-1]['role']!r}"
    return None


def _plain(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _from_openai(row: dict) -> tuple[dict | None, str | None]:
    inp = row.get("input")
    if not isinstance(inp, dict):
        return None, f"'input' must be an object with 'messages', got {type(inp).__name__}"
    if inp.get("tools"):
        return None, "'input.tools' is not supported yet (tool definitions are not rendered by qforge's templates)"
    problem = _messages_problem(inp.get("messages"), "input.messages")
    for key in ("preferred_output", "non_preferred_output"):
        problem = problem or _messages_problem(row.get(key), key, need_assistant=True)
    if problem:
        return None, problem
    return {"prompt": _plain(inp["messages"]), "chosen": _plain(row["preferred_output"]),
            "rejected": _plain(row["non_preferred_output"])}, None


def _from_trl(row: dict) -> tuple[dict | None, str | None]:
    for key in ("chosen", "rejected"):
        if key not in row:
            return None, f"missing key '{key}'"
    if all(isinstance(row.get(k), str) for k in ("chosen", "rejected")) and isinstance(row.get("prompt", ""), str):
        for key in ("chosen", "rejected"):
            if not row[key].strip():
                return None, f"empty '{key}'"
        return {"prompt": row.get("prompt", ""), "chosen": row["chosen"], "rejected": row["rejected"]}, None
    if "prompt" not in row:
        return _implicit_prompt(row)
    problem = _messages_problem(row["prompt"], "prompt")
    for key in ("chosen", "rejected"):
        problem = problem or _messages_problem(row[key], key, need_assistant=True)
    if problem:
        return None, (problem + " (prompt, chosen and rejected are all strings or all lists of messages)")
    return {k: _plain(row[k]) for k in ("prompt", "chosen", "rejected")}, None


def _implicit_prompt(row: dict) -> tuple[dict | None, str | None]:
    """TRL's implicit prompt: chosen and rejected are whole conversations; their common leading
    turns are the prompt, and both must have at least one turn after it."""
    for key in ("chosen", "rejected"):
        problem = _messages_problem(row[key], key, need_assistant=True)
        if problem:
            return None, problem
    chosen, rejected = _plain(row["chosen"]), _plain(row["rejected"])
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        return None, ("without 'prompt', chosen and rejected must start with the same prompt turns and then differ"
                      if n else "without 'prompt', chosen and rejected share no prompt turn")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}, None


def _sharegpt_turns(value, key: str) -> tuple[list[dict] | None, str | None]:
    """ShareGPT turns (from/value or role/content), one turn, or a reply string -> messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], None
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        return None, f"'{key}' must be a turn, a list of turns or a string, got {type(value).__name__}"
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if not isinstance(turn, dict):
            return None, f"{where} must be an object, got {type(turn).__name__}"
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = SHAREGPT_ROLES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            return None, (f"{where}: unknown {role_key} {turn.get(role_key)!r} "
                          f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn.get(text_key)})
    return messages, None


def _from_sharegpt(row: dict) -> tuple[dict | None, str | None]:
    key = "conversations" if "conversations" in row else "messages"
    prompt, problem = _sharegpt_turns(row.get(key), key)
    if problem:
        return None, problem
    if "system" in row:
        if not isinstance(row["system"], str):
            return None, f"'system' must be a string, got {type(row['system']).__name__}"
        prompt = [{"role": "system", "content": row["system"]}] + prompt
    out = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        if side not in row:
            return None, f"missing key '{side}'"
        out[side], problem = _sharegpt_turns(row[side], side)
        if problem:
            return None, problem
    problem = _messages_problem(out["prompt"], key)
    for side in ("chosen", "rejected"):
        problem = problem or _messages_problem(out[side], side, need_assistant=True)
    return (None, problem) if problem else (out, None)


READERS = {"openai": _from_openai, "trl": _from_trl, "sharegpt": _from_sharegpt}


def load_preference_rows(path: str | Path, shape: str = "auto", split: str = "train") -> tuple[list[dict], str]:
    """Read and check a preference file -> (canonical rows, shape). No tokenizer or model needed.

    shape "auto": the first row's keys decide and every later row must have the same shape.
    Raises DataError naming the file and line (or row) of the first bad row; its `path` is the file."""
    try:
        return _load_rows(path, shape, split)
    except DataError as exc:
        exc.path = exc.path or str(path)
        raise


def _load_rows(path, shape: str, split: str) -> tuple[list[dict], str]:
    if shape != "auto" and shape not in SHAPES:
        raise ValueError(f"unknown preference shape {shape!r}: expected auto, {', '.join(SHAPES)}")
    try:
        records = read_records(path, split)
    except DataFileError as exc:
        raise DataError(str(exc)) from None
    rows, first = [], None
    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(f"{where}: not a JSON object (got {type(row).__name__})")
        seen = _shape_of(row)
        if seen is None:
            raise DataError(f"{where}: not a preference row: expected OpenAI's 'input'/'preferred_output'/"
                            f"'non_preferred_output', TRL's 'prompt'/'chosen'/'rejected' or ShareGPT's "
                            f"'conversations' with 'chosen'/'rejected', got keys {sorted(row)}")
        if shape == "auto":
            shape, first = seen, where
        elif seen != shape:
            said = f"{_row_name(first)} was {shape}" if first else f"the file was read as {shape}"
            raise DataError(f"{where}: mixed shapes in one file: this row is {seen}, {said}")
        first = first or where
        canonical, problem = READERS[shape](row)
        if problem:
            raise DataError(f"{where}: {problem}")
        rows.append(canonical)
    if not rows:
        raise DataError(f"{path}: empty dataset (no rows)")
    return rows, shape


def _row_name(where: str) -> str:
    """'data.jsonl:3' -> 'line 3'; 'x.parquet: row 3' -> 'row 3'."""
    tail = where.rsplit(":", 1)[-1].strip()
    return f"line {tail}" if tail.isdigit() else tail


# ---------------------------------------------------------------------------------------------
# Tokenising


@dataclass
class PairReport:
    """What tokenize_pairs kept: pairs in and kept, truncated sides, pairs dropped because a side
    was left with no completion token after truncation, and the tokens of the kept pairs."""
    pairs: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0

    def __str__(self) -> str:
        return (f"{self.pairs} pairs -> {self.kept} kept ({self.tokens} tokens); {self.truncated} sides truncated, "
                f"{self.dropped} pairs dropped with no completion token left")


def _sides(row: dict, tokenizer) -> tuple[dict, dict]:
    """(ids, labels) of prompt + chosen and prompt + rejected, untruncated."""
    if isinstance(row["chosen"], str):
        return tuple(dict(zip(("input_ids", "labels"),
                              completion_example({"prompt": row["prompt"], "completion": row[side]}, tokenizer)))
                     for side in ("chosen", "rejected"))
    # the prompt's assistant turns are context (weight 0): only the completion is trained
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in row["prompt"]]
    return tuple(tokenize_example({"messages": context + row[side]}, tokenizer, "chat", max_seq_len=2**62)
                 for side in ("chosen", "rejected"))


def tokenize_pair(row: dict, tokenizer, max_seq_len: int) -> dict:
    """A canonical row -> {"prompt_ids", "chosen": {input_ids, labels}, "rejected": {...}, "truncated"}.

    Conversational rows go through the tokenizer's chat template (qforge.train.data.tokenize_example:
    the assistant reply and its end-of-turn token are trained, the generation prompt is not); plain
    text as TRL's plain rows, the prompt encoded with its BOS, the reply followed by EOS. The prompt
    ids are the tokens before the first trained one, the same on both sides. Truncation: each side
    (prompt + completion) keeps its first max_seq_len tokens, as SFT rows do; "truncated" counts the
    sides cut (0, 1 or 2)."""
    chosen, rejected = _sides(row, tokenizer)
    start = min(_first_trained(chosen["labels"]), _first_trained(rejected["labels"]))
    if chosen["input_ids"][:start] != rejected["input_ids"][:start]:
        raise DataError("chosen and rejected do not share the prompt's tokens (a chat template that renders the "
                        "prompt differently by reply)")
    cut = sum(len(side["input_ids"]) > max_seq_len for side in (chosen, rejected))
    clip = lambda side: {"input_ids": side["input_ids"][:max_seq_len], "labels": side["labels"][:max_seq_len]}
    return {"prompt_ids": chosen["input_ids"][:start], "chosen": clip(chosen), "rejected": clip(rejected),
            "truncated": cut}


def _first_trained(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))


def tokenize_pairs(rows: list[dict], tokenizer, max_seq_len: int, where: str = "") -> tuple[list[dict], PairReport]:
    """tokenize_pair over rows, dropping (and counting) pairs whose chosen or rejected side has no
    completion token left after truncation (the model never predicts position 0, so a side needs a
    trained label after it). `where` (a file name) prefixes errors."""
    report, kept = PairReport(pairs=len(rows)), []
    for i, row in enumerate(rows, start=1):
        try:
            pair = tokenize_pair(row, tokenizer, max_seq_len)
        except DataError as exc:
            raise DataError(f"{where + ': ' if where else ''}pair {i}: {exc}") from None
        report.truncated += pair["truncated"]
        if any(all(label == IGNORE for label in pair[side]["labels"][1:]) for side in ("chosen", "rejected")):
            report.dropped += 1
            continue
        kept.append(pair)
        report.tokens += len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])
    report.kept = len(kept)
    return kept, report


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows right-padded to one length, the chosen sides first and then
    the rejected ones (pair i in rows i and B + i): input_ids, attention_mask, labels int64 [2B, T],
    labels -100 off the completions."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
