"""Training data: rows in, token ids and labels out, then deterministic batches.

Files: JSONL, JSON arrays, Parquet, CSV or a `datasets` dataset saved with save_to_disk
(qforge.train.datafiles). Five row shapes, one per file (`fmt="auto"` detects it from the first row):
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}
               (OpenAI's fine-tuning format; assistant messages with weight 0 are context, not targets)
  sharegpt     {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}, also with
               role/content messages, or `messages` holding from/value turns; read as chat rows
  instruction  {"instruction": str, "input"?: str, "output": str}  (Alpaca)
  completion   {"prompt": str, "completion": str}  (OpenAI's legacy format, TRL's prompt-completion):
               the prompt is context, the completion (and an end-of-sequence token) is trained
  text         {"text": str}

Chat, sharegpt and instruction rows go through the tokenizer's chat template; by default only the
assistant tokens are trained (its content and its end-of-turn token). Text rows are trained on
every token.
"""
from __future__ import annotations

import functools

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

IGNORE = -100  # the label value torch's cross-entropy skips
FORMATS = ("chat", "sharegpt", "instruction", "completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and, where one is at
    fault, the 1-based line number. `path`: the file, for callers that must tell files apart."""

    path: str | None = None


def _names_its_file(read):
    """Decorate a reader of one file: a DataError it raises carries that file as `path`."""
    @functools.wraps(read)
    def reader(path, *args, **kwargs):
        try:
            return read(path, *args, **kwargs)
        except DataError as exc:
            exc.path = exc.path or str(path)
            raise
    return reader


# ---------------------------------------------------------------------------------------------
# Reading and validating JSONL


def _shape_of(row: dict) -> str | None:
    """The format a row looks like, by its distinguishing key (None when it has none of them).
    `messages` holding ShareGPT turns (from/value) is sharegpt."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and "from" in messages[0]:
        return "sharegpt"
    for fmt, key in (("chat", "messages"), ("sharegpt", "conversations"), ("instruction", "instruction"),
                     ("completion", "prompt"), ("text", "text")):
        if key in row:
            return fmt
    return None


def sharegpt_to_chat(row: dict) -> tuple[dict | None, str | None]:
    """A ShareGPT row as a chat row: (row, None), or (None, the problem). Turns are from/value
    (roles human, gpt, system; user and assistant also) or role/content; `weight` is kept."""
    key = "conversations" if "conversations" in row else "messages"
    turns = row.get(key)
    if not isinstance(turns, list):
        return None, f"'{key}' must be a list, got {type(turns).__name__}"
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            return None, f"{where} must be an object, got {type(turn).__name__}"
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        if role_key not in turn:
            return None, f"{where}: missing key 'from' (or 'role')"
        role = SHAREGPT_ROLES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            return None, (f"{where}: unknown {role_key} {turn[role_key]!r} "
                          f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        if text_key not in turn:
            return None, f"{where}: missing key '{text_key}'"
        message = {"role": role, "content": turn[text_key]}
        if "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    return {"messages": messages}, None


def _completion_problem(row: dict) -> str | None:
    """Prompt/completion rows: two strings, or (TRL's conversational form) two lists of messages."""
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), list):
                return f"'{key}' must be a list of messages like the other field, got {type(row.get(key)).__name__}"
        return _chat_problem({"messages": row["prompt"] + row["completion"]})
    return _need_str(row, "prompt", allow_empty=True) or _need_str(row, "completion")


def _need_str(row: dict, key: str, optional: bool = False, allow_empty: bool = False) -> str | None:
    """Check `row[key]` is a (non-empty) string; returns the problem, or None."""
    if key not in row:
        return None if optional else f"missing key '{key}'"
    value = row[key]
    if not isinstance(value, str):
        return f"'{key}' must be a string, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return f"empty '{key}'"
    return None


def _chat_problem(row: dict) -> str | None:
    """What is wrong with a chat row, or None."""
    messages = row.get("messages")
    if not isinstance(messages, list):
        return f"'messages' must be a list, got {type(messages).__name__}"
    if not messages:
        return "empty 'messages'"
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            return f"{where} must be an object, got {type(msg).__name__}"
        if "role" not in msg:
            return f"{where}: missing key 'role'"
        if msg["role"] not in ROLES:
            return f"{where}: unknown role {msg['role']!r} (expected one of {', '.join(ROLES)})"
        problem = _need_str(msg, "content")
        if problem:
            return f"{where}: {problem}"
        if "weight" in msg:
            if msg["role"] != "assistant":
                return f"{where}: 'weight' is only allowed on assistant messages"
            if msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool):
                return f"{where}: 'weight' must be 0 or 1, got {msg['weight']!r}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message"
    return None


def _row_problem(row: dict, fmt: str) -> str | None:
    """What is wrong with `row` read as `fmt`, or None."""
    if fmt == "chat":
        return "missing key 'messages'" if "messages" not in row else _chat_problem(row)
    if fmt == "instruction":
        return (_need_str(row, "instruction") or _need_str(row, "input", optional=True, allow_empty=True)
                or _need_str(row, "output"))
    if fmt == "completion":
        return _completion_problem(row)
    return _need_str(row, "text")


@_names_its_file
def load_rows(path: str | Path, fmt: str = "auto", split: str = "train",
              field_map: dict | None = None) -> tuple[list[dict], str]:
    """Read and validate a training file (any kind qforge.train.datafiles reads); returns (rows,
    format). ShareGPT rows come back as chat rows ({"messages": [...]}) under format "sharegpt".

    With fmt="auto" the first row's shape decides and every later row must have the same shape.
    `field_map` renames your keys to qforge's first (qforge.train.fieldmap). Raises DataError
    naming the file and row for the first bad row, or the file when it is empty.
    """
    from .datafiles import DataFileError, read_records

    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}: expected auto, {', '.join(FORMATS)}")
    try:
        records = read_records(path, split)
    except DataFileError as exc:
        raise DataError(str(exc)) from None
    rows: list[dict] = []
    first = ""
    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(f"{where}: not a JSON object (got {type(row).__name__})")
        if field_map:
            from .fieldmap import apply_field_map
            row, problem = apply_field_map(row, field_map)
            if problem:
                raise DataError(f"{where}: {problem}")
        shape = _shape_of(row)
        if fmt == "auto":
            if shape is None:
                raise DataError(f"{where}: unknown row shape: expected a 'messages', 'conversations', "
                                f"'instruction', 'prompt' or 'text' key, got keys {sorted(row)}; map your keys "
                                f"with {_field_map_hint(row)}")
            fmt, first = shape, where
        elif shape is not None and shape != fmt and first:
            # a row that clearly has another shape: say so rather than 'missing key'
            raise DataError(f"{where}: mixed shapes in one file: this row is {shape}, "
                            f"{_row_name(first)} was {fmt}")
        first = first or where
        if fmt == "sharegpt":
            row, problem = sharegpt_to_chat(row)
            problem = problem or _chat_problem(row)
        else:
            problem = _row_problem(row, fmt)
        if problem:
            raise DataError(f"{where}: {problem}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty dataset (no rows)" if path.suffix.lower() != ".jsonl"
                        else f"{path}: empty dataset (no non-blank lines)")
    return rows, fmt


def _field_map_hint(row: dict) -> str:
    """How to map a row of unknown keys, spelled for the interface in use (flag or recipe key)."""
    from .config import setting
    keys = sorted(row)[:2] or ["question", "answer"]
    example = ",".join(f"{k}={r}" for k, r in zip(keys, ("user", "assistant")))
    return setting("field_map", example) or "a chat file ({\"messages\": [...]})"


def _row_name(where: str) -> str:
    """'data.jsonl:3' -> 'line 3'; 'x.parquet: row 3' -> 'row 3'."""
    tail = where.rsplit(":", 1)[-1].strip()
    return f"line {tail}" if tail.isdigit() else tail


def read_jsonl(path: str | Path, fmt: str = "auto") -> list[dict]:
    """The validated rows of a JSONL training file (see `load_rows`)."""
    return load_rows(path, fmt)[0]


# ---------------------------------------------------------------------------------------------
# Tokenisation


def instruction_to_messages(row: dict) -> list[dict]:
    """An instruction row as a user/assistant conversation (input appended after a blank line)."""
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def completion_example(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of a plain prompt/completion row: the prompt as the tokenizer encodes text
    (with its BOS, if any) is context; the completion and an end-of-sequence token are trained."""
    prompt = list(tokenizer(row["prompt"])["input_ids"]) if row["prompt"] else []
    target = _encode(tokenizer, row["completion"])
    if tokenizer.eos_token_id is not None:
        target.append(tokenizer.eos_token_id)
    return prompt + target, [IGNORE] * len(prompt) + target


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def _extend(pieces: list, done: str, text: str, is_target: bool, index: int) -> str:
    """Append what `text` adds after `done` to pieces; returns the new rendered prefix."""
    if not text.startswith(done):
        raise DataError(f"chat template is not prefix-stable at message {index}: "
                        "assistant spans cannot be located")
    if len(text) > len(done):
        pieces.append((text[len(done):], is_target))
    return text


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_target) pieces whose concatenation is the
    whole rendering.

    Rendering prefix by prefix finds the assistant turns without knowing the template: the text an
    assistant message adds after its generation prompt is its content plus the template's
    end-of-turn suffix. Raises DataError when a prefix's rendering is not a prefix of the next
    (a template that rewrites earlier turns), since the spans would then be wrong.
    """
    if not getattr(tokenizer, "chat_template", None):
        from .config import setting
        given = setting("chat_template")
        raise DataError("the tokenizer has no chat template; " + (
            f"set one with {given} (chatml, llama3, gemma, mistral, qwen, phi3 or a Jinja file) or use text rows"
            if given else "use text rows ({\"text\": ...}) or a base model whose tokenizer has one"))
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        is_target = msg["role"] == "assistant" and msg.get("weight", 1) == 1
        if msg["role"] == "assistant":  # the generation prompt ("<|im_start|>assistant\n") is context
            done = _extend(pieces, done, _render(tokenizer, messages[:i], generation_prompt=True), False, i)
        done = _extend(pieces, done, _render(tokenizer, messages[: i + 1]), is_target, i)
    return pieces


def _encode(tokenizer, text: str) -> list[int]:
    # the chat template writes any BOS itself, so the tokenizer must not add another
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _target_labels(ids: list[int], special: set[int]) -> list[int]:
    """Labels for an assistant increment: content through the end-of-turn token (the last special
    token), not the separator the template writes after it (e.g. the newline after <|im_end|>)."""
    ends = [j for j, t in enumerate(ids) if t in special]
    stop = ends[-1] + 1 if ends else len(ids)
    return ids[:stop] + [IGNORE] * (len(ids) - stop)


def tokenize_example(row: dict, tokenizer, fmt: str, max_seq_len: int, train_on: str = "assistant") -> dict:
    """One row -> {"input_ids": [int], "labels": [int], "truncated": bool}.

    labels are IGNORE (-100) on tokens not trained: with train_on="assistant", everything but the
    assistant turns of chat/instruction rows; train_on="all" trains every token. Text rows are
    text + eos, all trained. Rows longer than max_seq_len keep their first max_seq_len tokens.
    """
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    if fmt == "text":
        ids = list(tokenizer(row["text"])["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        labels = list(ids)
    elif fmt == "completion" and isinstance(row["prompt"], str):
        ids, labels = completion_example(row, tokenizer)
        if train_on == "all":
            labels = list(ids)
    else:
        if fmt == "completion":  # conversational prompt/completion: the prompt's turns are context
            messages = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in row["prompt"]]
            messages += row["completion"]
        else:
            messages = row["messages"] if fmt in ("chat", "sharegpt") else instruction_to_messages(row)
        special = set(tokenizer.all_special_ids)
        ids, labels = [], []
        for text, is_target in chat_segments(messages, tokenizer):
            piece = _encode(tokenizer, text)
            ids += piece
            labels += _target_labels(piece, special) if is_target else [IGNORE] * len(piece)
        if train_on == "all":
            labels = list(ids)
    truncated = len(ids) > max_seq_len
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len], "truncated": truncated}


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class TokenizedDataset:
    """Tokenised examples: dicts with input_ids and labels (and position_ids when packed)."""
    examples: list[dict]
    packed: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


@dataclass
class DataReport:
    """What build_dataset read and kept. rows/truncated/dropped count both splits; tokens and
    trainable_tokens count the kept training rows (before packing, which changes neither)."""
    format: str
    rows: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0
    packed_rows: int | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        packed = f", packed into {self.packed_rows} rows" if self.packed_rows is not None else ""
        return (f"{self.format}: {self.rows} rows -> {self.train_rows} train + {self.eval_rows} eval{packed}; "
                f"{self.tokens} tokens ({self.trainable_tokens} trained); {self.truncated} truncated; "
                f"{self.dropped_no_trainable} dropped with no trainable token")


def no_trained_token(path, max_seq_len: int, truncated: int) -> str:
    """The error for a file with no trained token, advising settings as the interface spells them."""
    from .config import setting
    raise_len = setting("max_seq_len", max_seq_len * 2)
    cut = (f"; {truncated} row(s) were truncated at max_seq_len={max_seq_len}, which cut off their trained "
           f"tokens: {'set ' + raise_len if raise_len else 'raise max_seq_len'} or shorten the rows") if truncated else ""
    train_all = setting("train_on", "all")
    check = (f"give the rows assistant replies with weight 1, or {train_all} to train every token" if train_all
             else "give the rows assistant messages without \"weight\": 0")
    return f"{path}: no row has a trainable token ({check}){cut}"


def _tokenize_rows(rows, tokenizer, fmt, max_seq_len, train_on, report: DataReport) -> list[dict]:
    """Tokenise rows, counting truncations and dropping rows left with no trained token."""
    kept = []
    for row in rows:
        ex = tokenize_example(row, tokenizer, fmt, max_seq_len, train_on)
        report.truncated += ex["truncated"]
        if all(label == IGNORE for label in ex["labels"][1:]):
            # the model never predicts position 0, so a row needs a trained label after it
            report.dropped_no_trainable += 1
            continue
        kept.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    return kept


def pack_examples(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Greedy packing of whole examples, in order, into rows of at most max_seq_len tokens.

    No example is split across rows. position_ids restart at 0 for each example, and the label of
    each example's first token is ignored (it would be predicted from the previous example).
    Keeping examples apart in attention is the model's job: see `collate`.
    """
    rows: list[dict] = []
    current: dict = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_seq_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE] + ex["labels"][1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) with round(len * eval_fraction) rows (at least 1 when the fraction is > 0)
    held out by a seeded shuffle; both keep the file order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(rows):
        raise ValueError(f"eval_fraction {eval_fraction} leaves no training rows out of {len(rows)}")
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def read_splits(path, fmt: str = "auto", eval_path=None, eval_fraction: float = 0.0, seed: int = 0,
                max_samples: int | None = None, field_map: dict | None = None) -> tuple[list[dict], list[dict], str, int]:
    """Read and validate the training rows and the eval rows -> (train, eval, format, rows read).

    The eval rows come from eval_path (same format rules), from the eval split of a saved
    DatasetDict (validation/eval/test), or, with eval_fraction > 0, from a seeded shuffle of the
    training rows; eval_path and eval_fraction not both. max_samples keeps the first N training rows.
    No tokenizer is needed: this is the check that runs before the model is loaded.
    """
    from .datafiles import eval_split_name

    if eval_path is not None and eval_fraction > 0:
        raise ValueError("give eval_path or eval_fraction, not both")
    rows, fmt = load_rows(path, fmt, field_map=field_map)
    if max_samples is not None:
        rows = rows[:max_samples]
    read = len(rows)
    split = eval_split_name(path) if eval_path is None and eval_fraction == 0 else None
    if eval_path is not None:
        eval_rows = load_rows(eval_path, fmt, field_map=field_map)[0]
    elif split is not None:
        eval_rows = load_rows(path, fmt, split=split, field_map=field_map)[0]
    else:
        rows, eval_rows = split_rows(rows, eval_fraction, seed)
        read = len(rows) + len(eval_rows)
        return rows, eval_rows, fmt, read
    return rows, eval_rows, fmt, read + len(eval_rows)


def build_dataset(path, tokenizer, fmt: str = "auto", max_seq_len: int = 512, train_on: str = "assistant",
                  pack: bool = False, eval_path=None, eval_fraction: float = 0.0, seed: int = 0,
                  max_samples: int | None = None, splits: tuple | None = None,
                  ) -> tuple[TokenizedDataset, TokenizedDataset | None, DataReport]:
    """Read, validate, split and tokenise a training file -> (train, eval or None, report).

    The eval split is as `read_splits` says; `splits`, the result of an earlier read_splits, saves
    reading the files again. Eval rows are never packed, so eval losses stay comparable whatever
    the packing.
    """
    rows, eval_rows, fmt, read = splits or read_splits(path, fmt, eval_path, eval_fraction, seed, max_samples)
    report = DataReport(format=fmt, rows=read)
    train = _tokenize_rows(rows, tokenizer, fmt, max_seq_len, train_on, report)
    if not train:
        raise DataError(no_trained_token(path, max_seq_len, report.truncated))
    held = _tokenize_rows(eval_rows, tokenizer, fmt, max_seq_len, train_on, report) if eval_rows else []
    report.train_rows, report.eval_rows = len(train), len(held)
    report.tokens = sum(len(e["input_ids"]) for e in train)
    report.trainable_tokens = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in train)
    if pack:
        train = pack_examples(train, max_seq_len)
        report.packed_rows = len(train)
    eval_set = TokenizedDataset(held) if held else None
    return TokenizedDataset(train, packed=pack), eval_set, report


# ---------------------------------------------------------------------------------------------
# Batches


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into int64 tensors [B, T]: input_ids (pad_id), labels (-100 on padding)
    and attention_mask (1 on tokens, 0 on padding).

    Packed examples (with position_ids) instead get position_ids [B, T] and no attention_mask:
    transformers keeps packed examples apart (block-diagonal causal attention) only when it sees
    restarting position_ids with attention_mask=None and no KV cache, so call the model with
    use_cache=False. Padding continues as one more example (positions 0, 1, ...), so no real
    token attends to it.
    """
    width = max(len(e["input_ids"]) for e in batch)
    packed = "position_ids" in batch[0]
    out = {"input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(batch), width), IGNORE, dtype=torch.long)}
    if packed:
        out["position_ids"] = torch.arange(width).repeat(len(batch), 1)
    else:
        out["attention_mask"] = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        out["labels"][row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        if packed:
            out["position_ids"][row, :n] = torch.tensor(ex["position_ids"], dtype=torch.long)
            out["position_ids"][row, n:] = torch.arange(width - n)
        else:
            out["attention_mask"][row, :n] = 1
    return out


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch as index lists: a shuffle seeded by (seed, epoch), cut into
    batch_size pieces (the last may be shorter). A pure function of its arguments, so a resumed
    run recomputes exactly the batches it had not yet seen."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
    # a generator of our own: neither the global RNG state nor the Python version changes it
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]

