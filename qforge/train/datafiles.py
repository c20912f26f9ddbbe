"""Training files of every common kind, read as records: (where, row) pairs, where `where` names
the file and the row (`data.jsonl:7`, `data.csv:3`, `data.parquet: row 12`) for error messages.

  .jsonl / .ndjson   one JSON object per line (blank lines skipped)
  .json              a JSON array of objects (a .json file holding JSON lines is read as JSONL)
  .parquet           through pyarrow; nested columns (lists of messages) come back as lists of dicts,
                     null fields (columns a row lacks) dropped
  .csv               a header row, then one row per line; every value is a string
  a folder           a Hugging Face `datasets` dataset written by `save_to_disk` (a Dataset, or a
                     DatasetDict whose `train` split is trained on and whose validation/test/eval
                     split, when present, is evaluated on)
  DIR/dataset_info.json#NAME
                     the entry NAME of LLaMA-Factory's dataset registry, its rows converted by its
                     columns and tags (qforge.train.dataset_info)
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

EVAL_SPLITS = ("validation", "eval", "test", "valid", "dev")


class DataFileError(ValueError):
    """A file that cannot be read as rows; the message names the file (and the row)."""


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def read_records(path: str | Path, split: str = "train") -> list[tuple[str, object]]:
    """(where, row) for every row of `path`; `split` picks the split of a saved DatasetDict."""
    from .dataset_info import read_reference, split_reference
    reference = split_reference(path)
    if reference is not None:
        return read_reference(*reference, split)
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file or folder")
    if path.is_dir():
        if not is_saved_dataset(path):
            raise DataFileError(f"{path}: a folder, but not a `datasets` dataset saved with save_to_disk "
                                "(no dataset_dict.json or state.json)")
        return _saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path)
    if suffix == ".csv":
        return _csv(path)
    text = _text(path)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(path, text)
    return _jsonl(path, text)


def eval_split_name(path: str | Path) -> str | None:
    """The evaluation split of a saved DatasetDict (validation, eval, test, ...), or None."""
    path = Path(path)
    if not (path.is_dir() and (path / "dataset_dict.json").is_file()):
        return None
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    return next((s for s in EVAL_SPLITS if s in splits), None)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot read: {exc}") from exc


def _jsonl(path: Path, text: str) -> list[tuple[str, object]]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{number}: bad JSON: {exc.msg} (column {exc.colno})") from None
    return records


def _json_array(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} (column {exc.colno})") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows, start=1)]


def _csv(path: Path) -> list[tuple[str, object]]:
    text = _text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        return []
    records = []
    try:
        for row in reader:
            if None in row:  # more cells than the header names
                raise DataFileError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells, "
                                    f"the header names {len(reader.fieldnames)}")
            records.append((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v is not None}))
    except csv.Error as exc:
        raise DataFileError(f"{path}:{reader.line_num}: bad CSV: {exc}") from None
    return records


def _parquet(path: Path) -> list[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError, ...
        raise DataFileError(f"{path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    return [(f"{path}: row {i}", without_nulls(row)) for i, row in enumerate(rows, start=1)]


def without_nulls(value):
    """A columnar row with its null fields removed: Parquet and Arrow give every row every column,
    filling the ones a row lacks with null (an Alpaca row without `input`, a turn without `weight`)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _saved_dataset(path: Path, split: str) -> list[tuple[str, object]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataFileError(f"{path}: reading a saved dataset needs the `datasets` package "
                            "(pip install datasets)") from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 -- datasets' own errors; say which folder
        raise DataFileError(f"{path}: cannot load the saved dataset: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataFileError(f"{path}: the saved dataset has no '{split}' split (it has {sorted(loaded)})")
        loaded, where = loaded[split], f"{path}[{split}]"
    else:
        where = str(path)
    return [(f"{where}: row {i}", without_nulls(row)) for i, row in enumerate(loaded, start=1)]
