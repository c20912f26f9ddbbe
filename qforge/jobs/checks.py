"""What the jobs API refuses before anything is stored, and how it answers when its database is
down: request values no job row can hold and give back as JSON, and uploads whose lines the trainer
could not read back (nested deeper than a parser follows, lone surrogates)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from fastapi import Request

from ..serve.api import APIError
from ..serve.api.errors import error_response, internal_error

def check_storable(value, where: str = "") -> None:
    """400 naming the field for what a job row cannot hold and give back as JSON: NaN or infinite
    numbers (JSON has none), and strings with lone surrogates (not UTF-8: neither database stores them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{where or 'body'}: expected a finite number, got {value}", param=where or None,
                       code="invalid_value")
    if isinstance(value, str) and has_lone_surrogate(value):
        raise APIError(400, f"{where or 'body'}: expected valid Unicode text, got a lone surrogate code point",
                       param=where or None, code="invalid_value")
    if isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, where)
            check_storable(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_storable(item, f"{where}[{i}]")


def has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_jsonl_lines(path: Path) -> None:
    """Every line of an uploaded JSONL file parses (nested too deep for the parser is refused), and holds no lone
    surrogate (an escaped one, "\\ud800", is valid JSON but not text: the trainer cannot tokenise it).
    Lines are split at '\\n' only: a raw U+2028 or U+0085 inside a string is valid JSON. Raises
    qforge.train.data.DataError naming the line."""
    from ..train.data import DataError
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except RecursionError:  # the parser recursing per level: refused here, never a 500
                raise DataError(f"{path}:{number}: nested too deeply (JSON rows may nest a few hundred "
                                "levels at most)") from None
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text") from None
            except json.JSONDecodeError as exc:  # the same words as the trainer's reader (train.datafiles)
                raise DataError(f"{path}:{number}: bad JSON: {exc.msg} (column {exc.colno})") from None
            try:
                json.dumps(row, allow_nan=False, ensure_ascii=False).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                raise DataError(f"{path}:{number}: holds a lone surrogate (an unpaired \\ud800-\\udfff escape) or a "
                                "NaN/Infinity number, which is not valid text or JSON") from None


async def database_unavailable(request: Request, exc: Exception):
    """The job database is down, unreachable or damaged: 503 (retry later), never a 500 (a full disk
    under it is 507, as everywhere)."""
    from ..fileio import is_disk_full
    if is_disk_full(exc):
        return error_response(internal_error(exc))
    return error_response(APIError(503, "the job database is unavailable; retry later", "server_error",
                                   code="database_unavailable", headers={"Retry-After": "5"}))


