"""Column mapping: rows whose keys are your own, read as one of qforge's row shapes without
rewriting the file.

    --field-map question=user,answer=assistant      {"question": q, "answer": a}
        -> {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    --field-map prompt_text=instruction,reply=output      keys renamed: an instruction row
    --field-map dialogue=messages,speaker=role,text=content   a chat row with its own turn keys

A target is a role (system, user, assistant: the mapped keys become one chat, system first, then
in the map's order), a row key of qforge's shapes, or a turn key (role, content: renamed inside the
turns of `messages` / `conversations`). Keys the map does not name are kept as they are. Axolotl's
dataset keys (field_instruction, field_input, field_output, field_system, field_messages,
message_property_mappings) and LLaMA-Factory's dataset_info.json `columns` come here as such a map
(qforge.train.recipes, qforge.train.dataset_info).
"""
from __future__ import annotations

ROLE_TARGETS = ("system", "user", "assistant")
ROW_TARGETS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text")
TURN_TARGETS = ("role", "content")
TARGETS = ROLE_TARGETS + ROW_TARGETS + TURN_TARGETS


def parse_field_map(text: str) -> dict[str, str]:
    """'question=user,answer=assistant' -> {"question": "user", "answer": "assistant"}; a ValueError
    naming the flag and the expected form otherwise."""
    pairs = [p.strip() for p in str(text).split(",") if p.strip()]
    out = {}
    for pair in pairs:
        source, sep, target = (s.strip() for s in pair.partition("="))
        if not sep or not source or not target:
            raise ValueError(f"field_map: expected YOUR_KEY=TARGET pairs separated by commas, such as "
                             f"question=user,answer=assistant; got {pair!r}")
        out[source] = target
    return check_field_map(out)


def check_field_map(mapping) -> dict[str, str]:
    """The map checked: a non-empty {str: target} with every target one of TARGETS, each at most once."""
    if isinstance(mapping, str):
        return parse_field_map(mapping)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"field_map: expected a mapping of your keys to qforge's, such as "
                         f"{{question: user, answer: assistant}}; got {mapping!r}")
    for source, target in mapping.items():
        if not isinstance(source, str) or target not in TARGETS:
            raise ValueError(f"field_map: {source!r} -> {target!r}: the target must be one of {', '.join(TARGETS)}")
    targets = list(mapping.values())
    twice = sorted({t for t in targets if targets.count(t) > 1 and t not in ("user", "assistant")})
    if twice:
        raise ValueError(f"field_map: more than one key maps to {', '.join(twice)}")
    return {str(k): str(v) for k, v in mapping.items()}


def apply_field_map(row: dict, mapping: dict[str, str]) -> tuple[dict, str | None]:
    """(the row in qforge's keys, None), or (row, the problem: a mapped key the row lacks)."""
    optional = ("input", "system", *TURN_TARGETS)  # turn keys live inside the turns, not in the row
    missing = [k for k, t in mapping.items() if k not in row and t not in optional]
    if missing:
        return row, f"missing key '{missing[0]}' (field_map maps it to {mapping[missing[0]]})"
    row = dict(row)
    turn_keys = {k: t for k, t in mapping.items() if t in TURN_TARGETS}
    roles = [(k, t) for k, t in mapping.items() if t in ROLE_TARGETS and k in row]
    for source, target in mapping.items():
        if target in ROW_TARGETS and source in row:
            row[target] = row.pop(source)
    if turn_keys:
        for key in ("messages", "conversations"):
            if isinstance(row.get(key), list):
                row[key] = [_rename(turn, turn_keys) for turn in row[key]]
    if roles:
        roles.sort(key=lambda kt: kt[1] != "system")  # a system prompt first, the rest in the map's order
        messages = [{"role": target, "content": row.pop(source)} for source, target in roles]
        row = {k: v for k, v in row.items() if k not in ("messages", "conversations")}
        row["messages"] = messages
    return row, None


def _rename(turn, keys: dict[str, str]):
    if not isinstance(turn, dict):
        return turn  # the shape check names it
    return {keys.get(k, k): v for k, v in turn.items()}
