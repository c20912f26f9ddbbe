"""The data shapes people have (ShareGPT, prompt/completion, Alpaca, OpenAI chat, text) in every file
kind (JSONL, JSON array, Parquet, CSV, a saved `datasets` folder); bad rows named by file and row."""
import csv
import json

import pytest

from qforge.train.data import DataError, load_rows, read_splits, tokenize_example
from tests.model.conftest import tiny_tokenizer

SHAREGPT = {"conversations": [{"from": "system", "value": "w1"}, {"from": "human", "value": "w2 w3"},
                              {"from": "gpt", "value": "w4 w5"}]}
SHAREGPT_ROLE_CONTENT = {"conversations": [{"role": "user", "content": "w2 w3"},
                                           {"role": "assistant", "content": "w4 w5"}]}
MESSAGES_FROM_VALUE = {"messages": [{"from": "human", "value": "w2 w3"}, {"from": "gpt", "value": "w4 w5"}]}
AS_CHAT = {"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"},
                        {"role": "assistant", "content": "w4 w5"}]}
ROWS = {  # shape -> (rows, the format load_rows reports, the rows it returns)
    "sharegpt": ([SHAREGPT, SHAREGPT], "sharegpt", [AS_CHAT, AS_CHAT]),
    "sharegpt_role_content": ([SHAREGPT_ROLE_CONTENT], "sharegpt", [{"messages": AS_CHAT["messages"][1:]}]),
    "messages_from_value": ([MESSAGES_FROM_VALUE], "sharegpt", [{"messages": AS_CHAT["messages"][1:]}]),
    "completion": ([{"prompt": "w1 w2", "completion": "w3"}] * 2, "completion", None),
    "instruction": ([{"instruction": "w1", "input": "w2", "output": "w3"}], "instruction", None),
    "chat": ([AS_CHAT], "chat", None),
    "text": ([{"text": "w1 w2 w3"}], "text", None),
}
FLAT = ("completion", "instruction", "text")  # shapes a CSV can hold (strings only)


def write_as(tmp_path, rows, kind):
    """Write `rows` as a file of `kind`; returns its path."""
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        path = tmp_path / "d.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:  # a datasets folder
        import datasets
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "saved"])
@pytest.mark.parametrize("shape", list(ROWS))
def test_every_shape_in_every_file_kind(tmp_path, shape, kind):
    rows, fmt, expected = ROWS[shape]
    if kind == "csv" and shape not in FLAT:
        pytest.skip("CSV cells are strings: conversations do not fit")
    got, detected = load_rows(write_as(tmp_path, rows, kind))
    assert detected == fmt and got == (expected or rows)


def test_sharegpt_rows_train_the_gpt_turns_like_chat_rows():
    tok = tiny_tokenizer()
    from_sharegpt = tokenize_example(load_rows_of(SHAREGPT), tok, "sharegpt", 64)
    from_chat = tokenize_example(AS_CHAT, tok, "chat", 64)
    assert from_sharegpt == from_chat and any(label != -100 for label in from_chat["labels"])


def load_rows_of(row):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl"
        path.write_text(json.dumps(row) + "\n")
        return load_rows(path)[0][0]


def test_completion_rows_train_the_completion_and_eos_only():
    tok = tiny_tokenizer()
    ex = tokenize_example({"prompt": "w1 w2", "completion": "w3 w4"}, tok, "completion", 64)
    w = tok.convert_tokens_to_ids
    assert ex["input_ids"] == [w("w1"), w("w2"), w("w3"), w("w4"), tok.eos_token_id]
    assert ex["labels"] == [-100, -100, w("w3"), w("w4"), tok.eos_token_id]
    conversational = {"prompt": [{"role": "user", "content": "w1"}], "completion": [{"role": "assistant",
                                                                                      "content": "w2"}]}
    as_chat = {"messages": conversational["prompt"] + conversational["completion"]}
    assert tokenize_example(conversational, tok, "completion", 64) == tokenize_example(as_chat, tok, "chat", 64)


@pytest.mark.parametrize("kind, where", [
    ("jsonl", "d.jsonl:3: "), ("json", "d.json: row 3: "), ("parquet", "d.parquet: row 3: "),
    ("saved", "saved: row 3: "),
])
def test_a_bad_row_is_named_by_file_and_row(tmp_path, kind, where):
    bad = {"conversations": [{"from": "human", "value": "w1"}, {"from": "robot", "value": "w2"}]}
    with pytest.raises(DataError) as err:
        load_rows(write_as(tmp_path, [SHAREGPT, SHAREGPT, bad], kind))
    assert where + "conversations[1]: unknown from 'robot'" in str(err.value)


def test_bad_csv_row_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nw1,w2\nw3,\n")
    with pytest.raises(DataError, match=r"d\.csv:3: empty 'completion'"):
        load_rows(path)
    path.write_text("text\nw1\nw2,w3\n")
    with pytest.raises(DataError, match=r"d\.csv:3: 2 cells, the header names 1"):
        load_rows(path)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        load_rows(tmp_path / "x.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: a folder, but not a `datasets` dataset"):
        load_rows(tmp_path / "folder")
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.json").write_text('[{"text": "w1"},\n {"text": ]')
    with pytest.raises(DataError, match=r"bad\.json:2: bad JSON"):
        load_rows(tmp_path / "bad.json")


def test_saved_dataset_dict_gives_train_and_eval_splits(tmp_path):
    import datasets
    train = [{"text": f"w{i}"} for i in range(5)]
    held = [{"text": "w40"}, {"text": "w41"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "validation": datasets.Dataset.from_list(held)}).save_to_disk(str(tmp_path / "dd"))
    rows, eval_rows, fmt, read = read_splits(tmp_path / "dd")
    assert (rows, eval_rows, fmt, read) == (train, held, "text", 7)
    rows, eval_rows, _, _ = read_splits(tmp_path / "dd", eval_fraction=0.4, max_samples=5)  # a fraction wins
    assert len(rows) == 3 and len(eval_rows) == 2 and all(r in train for r in rows + eval_rows)


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_columnar_files_leave_out_the_fields_a_row_lacks(tmp_path, kind):
    rows = [{"instruction": "w1", "input": "w2", "output": "w3"}, {"instruction": "w4", "output": "w5"}]
    assert load_rows(write_as(tmp_path, rows, kind)) == (rows, "instruction")


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "w1"}\n{"text": "w2"}\n')
    assert load_rows(path) == ([{"text": "w1"}, {"text": "w2"}], "text")
