"""LLaMA-Factory's dataset registry, `dataset_info.json`: a name -> {file_name, formatting, ranking,
columns, tags}. An entry is read the way LLaMA-Factory 0.9.5 reads it (its data/parser.py and
data/converter.py), and its rows become the shapes qforge's readers take:

  formatting alpaca     columns prompt/query/response/history/system (default instruction, input, output)
  formatting sharegpt   column messages (default conversations) holding turns whose role_tag/content_tag
  (and openai)          (default from/value) carry user_tag/assistant_tag/system_tag (human/gpt/system)
  ranking: true         columns chosen/rejected: a reply string (alpaca) or one turn (sharegpt)

As in LLaMA-Factory, an entry that gives `columns` (or `tags`) sets every column (or tag) it does not
name to none. SFT rows become chat rows {"messages": [...]}; ranking rows become TRL's conversational
preference rows {"prompt": [...], "chosen": [assistant], "rejected": [assistant]}. Where LLaMA-Factory
skips a malformed row with a warning, qforge stops and names the file and line.

A recipe names an entry by a reference path, `DIR/dataset_info.json#NAME`, which
qforge.train.datafiles.read_records reads through `read_reference`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

INFO_FILE = "dataset_info.json"
FORMATS = ("alpaca", "sharegpt", "openai")
COLUMN_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                   "messages": "conversations", "system": None, "tools": None, "chosen": None, "rejected": None}
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
UNREAD_COLUMNS = ("images", "videos", "audios", "kto_tag")  # what qforge has nothing to train with


@dataclass
class Entry:
    """One dataset_info.json entry, its columns and tags resolved as LLaMA-Factory resolves them."""
    name: str
    info_path: Path
    file: Path
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict = field(default_factory=lambda: dict(COLUMN_DEFAULTS))
    tags: dict = field(default_factory=lambda: dict(TAG_DEFAULTS))
    tagged: bool = False  # the entry gives its own tags

    def is_plain(self) -> bool:
        """True when qforge's own readers take the file as it is: an SFT file in the default alpaca
        layout (instruction/input/output) or sharegpt layout (conversations of from/value turns), so a
        recipe can name the file itself."""
        if self.tagged or self.ranking or self.columns["system"] or self.columns["history"]:
            return False
        if self.formatting == "alpaca":
            return [self.columns[k] for k in ("prompt", "query", "response")] == ["instruction", "input", "output"]
        return self.formatting == "sharegpt" and self.columns["messages"] == "conversations"

    def reference(self) -> str:
        return f"{self.info_path}#{self.name}"


def read_entry(info_path: str | Path, name: str) -> Entry:
    """The entry `name` of `info_path`; ValueError naming the file for what qforge cannot read."""
    info_path = Path(info_path)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{info_path}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{info_path}: cannot read: {exc}") from None
    if not isinstance(info, dict) or name not in info:
        raise KeyError(name)
    attr = info[name]
    if not isinstance(attr, dict) or "file_name" not in attr:
        raise ValueError(f"{info_path}: '{name}' names no local file_name (Hub and script datasets are not read; "
                         "download it and save it as JSONL, Parquet or save_to_disk)")
    entry = Entry(name, info_path, info_path.parent / str(attr["file_name"]), attr.get("formatting", "alpaca"),
                  bool(attr.get("ranking", False)))
    if entry.formatting not in FORMATS:
        raise ValueError(f"{info_path}: '{name}' has formatting {entry.formatting!r}; "
                         f"qforge reads {', '.join(FORMATS)}")
    if "columns" in attr:  # LLaMA-Factory: a column the entry does not name becomes none
        entry.columns = {k: attr["columns"].get(k) for k in COLUMN_DEFAULTS}
        unread = [c for c in UNREAD_COLUMNS if attr["columns"].get(c)]
        if unread or entry.columns["tools"]:
            raise ValueError(f"{info_path}: '{name}' has columns {unread or ['tools']}; qforge trains on text "
                             "conversations only (no media, tools or KTO labels)")
    if "tags" in attr:
        entry.tags = {k: attr["tags"].get(k) for k in TAG_DEFAULTS}
        entry.tagged = True
    if entry.ranking and not (entry.columns["chosen"] and entry.columns["rejected"]):
        raise ValueError(f"{info_path}: '{name}' is ranking: true but its columns name no chosen and rejected")
    return entry


def split_reference(path) -> tuple[Path, str] | None:
    """(dataset_info.json path, entry name) for a reference path `DIR/dataset_info.json#NAME`, else None."""
    head, sep, name = str(path).rpartition("#")
    if sep and name and Path(head).name == INFO_FILE:
        return Path(head), name
    return None


def read_reference(info_path: Path, name: str, split: str = "train") -> list[tuple[str, object]]:
    """(where, row) for every row of the entry, converted (see the module docstring)."""
    from .datafiles import DataFileError, read_records
    try:
        entry = read_entry(info_path, name)
    except KeyError:
        raise DataFileError(f"{info_path}: no dataset named '{name}'") from None
    except ValueError as exc:
        raise DataFileError(str(exc)) from None
    convert = _from_alpaca if entry.formatting == "alpaca" else _from_sharegpt
    rows = []
    for where, row in read_records(entry.file, split):
        if not isinstance(row, dict):
            raise DataFileError(f"{where}: not a JSON object (got {type(row).__name__})")
        try:
            rows.append((where, convert(row, entry)))
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"missing column {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DataFileError(f"{where}: {problem} (dataset '{name}' of {info_path})") from None
    return rows


def _output(prompt: list[dict], replies: list[dict], system: str, entry: Entry) -> dict:
    """A chat row, or for a ranking entry a TRL conversational preference row."""
    head = [{"role": "system", "content": system}] if system else []
    if entry.ranking:
        chosen, rejected = replies
        return {"prompt": head + prompt, "chosen": [chosen], "rejected": [rejected]}
    return {"messages": head + prompt + replies}


def _from_alpaca(row: dict, entry: Entry) -> dict:
    """LLaMA-Factory's alpaca converter: history pairs, then prompt and query joined by a newline."""
    col = entry.columns
    prompt = []
    if col["history"] and isinstance(row.get(col["history"]), list):
        for old_prompt, old_response in row[col["history"]]:
            prompt += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_response}]
    query = [row[c] for c in (col["prompt"], col["query"]) if c and row.get(c)]
    prompt.append({"role": "user", "content": "\n".join(query)})
    if entry.ranking:
        replies = [{"role": "assistant", "content": _text(row[col[side]], col[side])}
                   for side in ("chosen", "rejected")]
    else:
        replies = [{"role": "assistant", "content": _text(row[col["response"]], col["response"])}]
    return _output(prompt, replies, row.get(col["system"], "") if col["system"] else "", entry)


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"column '{column}' must be a string, got {type(value).__name__}")
    return value


def _from_sharegpt(row: dict, entry: Entry) -> dict:
    """LLaMA-Factory's sharegpt converter: a leading system turn, then user and assistant turns
    alternating; a ranking row ends with a user turn and its chosen/rejected columns hold one turn each."""
    col, tag = entry.columns, entry.tags
    turns = row[col["messages"]]
    if not isinstance(turns, list):
        raise ValueError(f"column '{col['messages']}' must be a list of turns, got {type(turns).__name__}")
    if turns and tag["system_tag"] and _turn(turns[0], tag, 0)[0] == tag["system_tag"]:
        system, turns = _turn(turns[0], tag, 0)[1], turns[1:]
    else:
        system = row.get(col["system"], "") if col["system"] else ""
    roles = {tag["user_tag"]: "user", tag["assistant_tag"]: "assistant"}
    messages = []
    for i, turn in enumerate(turns):
        role, content = _turn(turn, tag, i)
        expected = tag["user_tag"] if i % 2 == 0 else tag["assistant_tag"]
        if role != expected:
            raise ValueError(f"turn {i}: {tag['role_tag']} {role!r}, expected {expected!r} (turns alternate "
                             f"user_tag {tag['user_tag']!r} and assistant_tag {tag['assistant_tag']!r}, after an "
                             f"optional system_tag {tag['system_tag']!r} turn; tool turns are not read)")
        messages.append({"role": roles[role], "content": content})
    if entry.ranking:
        if len(messages) % 2 == 0:
            raise ValueError("a ranking row's turns must end with a user turn")
        replies = []
        for side in ("chosen", "rejected"):
            role, content = _turn(row[col[side]], tag, col[side])
            if role != tag["assistant_tag"]:
                raise ValueError(f"'{col[side]}': {tag['role_tag']} {role!r}, expected {tag['assistant_tag']!r}")
            replies.append({"role": "assistant", "content": content})
        return _output(messages, replies, system, entry)
    if len(messages) % 2 != 0:
        raise ValueError("the turns must end with an assistant turn")
    return _output(messages[:-1], messages[-1:], system, entry)


def _turn(turn, tag: dict, where) -> tuple[str, str]:
    """(role, content) of one turn by the entry's role_tag and content_tag."""
    if not isinstance(turn, dict):
        raise ValueError(f"turn {where} must be an object, got {type(turn).__name__}")
    for key in (tag["role_tag"], tag["content_tag"]):
        if key not in turn:
            raise ValueError(f"turn {where}: no {key!r} key (the entry's role_tag/content_tag are "
                             f"{tag['role_tag']!r}/{tag['content_tag']!r})")
    return turn[tag["role_tag"]], turn[tag["content_tag"]]
