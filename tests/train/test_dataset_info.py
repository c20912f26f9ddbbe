"""LLaMA-Factory's dataset_info.json entries with their own `columns` and `tags`, read as LLaMA-Factory
0.9.5 reads them (data/parser.py, data/converter.py): OpenAI-format files through sharegpt tags, for SFT
and for ranking (preference) data; renamed alpaca columns; malformed rows named by file and line."""
import json
from pathlib import Path

import pytest

from qforge.train.data import DataError, load_rows
from qforge.train.dataset_info import read_entry, split_reference
from qforge.train.preference_data import load_preference_rows
from qforge.train.recipes import load_config

# LLaMA-Factory's data/README.md: the way to read OpenAI-format files
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
]
RECIPE = """\
model_name_or_path: smollm2
stage: {stage}
finetuning_type: lora
dataset: {name}
dataset_dir: {dataset_dir}
template: chatml
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def registry(tmp_path, **entries):
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return tmp_path / "dataset_info.json"


def mapped(tmp_path, name, stage="sft"):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(stage=stage, name=name, dataset_dir=tmp_path))
    return load_config(path)[0]


def test_openai_messages_through_sharegpt_tags_train_as_chat_rows(tmp_path):
    write_jsonl(tmp_path / "chats.jsonl", CHATS)
    registry(tmp_path, chats={"file_name": "chats.jsonl", "formatting": "sharegpt",
                              "columns": {"messages": "messages"}, "tags": OPENAI_TAGS})
    cfg = mapped(tmp_path, "chats")
    assert (cfg.data, cfg.data_format) == (f"{tmp_path / 'dataset_info.json'}#chats", "chat")
    rows, fmt = load_rows(cfg.data, cfg.data_format)  # was: "mixed shapes in one file: this row is chat"
    assert (rows, fmt) == (CHATS, "chat")


def test_a_system_turn_needs_the_system_tag_as_in_llamafactory(tmp_path):
    with_system = [{"messages": [{"role": "system", "content": "Be brief."}] + CHATS[0]["messages"]}]
    write_jsonl(tmp_path / "chats.jsonl", with_system)
    registry(tmp_path, tagged={"file_name": "chats.jsonl", "formatting": "sharegpt",
                               "columns": {"messages": "messages"}, "tags": {**OPENAI_TAGS, "system_tag": "system"}},
             untagged={"file_name": "chats.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                       "tags": OPENAI_TAGS})  # tags given: the ones not named are none, system_tag too
    assert load_rows(mapped(tmp_path, "tagged").data, "chat")[0] == with_system
    with pytest.raises(DataError, match=r"chats.jsonl:1: turn 0: role 'system', expected 'user'"):
        load_rows(mapped(tmp_path, "untagged").data, "chat")


def test_ranking_entry_with_openai_tags_reads_as_preference_pairs(tmp_path):
    pairs = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}],
              "chosen": {"role": "assistant", "content": "4"}, "rejected": {"role": "assistant", "content": "5"}},
             {"messages": [{"role": "user", "content": "hi"}],
              "chosen": {"role": "assistant", "content": "hello"}, "rejected": {"role": "assistant", "content": "go"}}]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    registry(tmp_path, pairs={"file_name": "pairs.jsonl", "formatting": "sharegpt", "ranking": True,
                              "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                              "tags": {**OPENAI_TAGS, "system_tag": "system"}})
    cfg = mapped(tmp_path, "pairs", stage="dpo")
    assert cfg.objective == "dpo" and cfg.data == f"{tmp_path / 'dataset_info.json'}#pairs"
    rows, _ = load_preference_rows(cfg.data)
    assert rows[0] == {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}],
                       "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]}
    assert rows[1]["prompt"] == [{"role": "user", "content": "hi"}]


def test_sharegpt_ranking_with_default_tags_and_renamed_columns(tmp_path):
    rows = [{"conv": [{"from": "human", "value": "hi"}], "good": {"from": "gpt", "value": "hello"},
             "bad": {"from": "gpt", "value": "go away"}}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    registry(tmp_path, pairs={"file_name": "pairs.jsonl", "formatting": "sharegpt", "ranking": True,
                              "columns": {"messages": "conv", "chosen": "good", "rejected": "bad"}})
    pref, _ = load_preference_rows(f"{tmp_path / 'dataset_info.json'}#pairs")
    assert pref == [{"prompt": [{"role": "user", "content": "hi"}],
                     "chosen": [{"role": "assistant", "content": "hello"}],
                     "rejected": [{"role": "assistant", "content": "go away"}]}]


def test_alpaca_columns_history_and_system_as_llamafactory_joins_them(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "Add", "x": "2 and 3", "a": "5", "sys": "Be exact.",
                                        "hist": [["first?", "yes"]]}])
    registry(tmp_path, a={"file_name": "a.jsonl", "columns": {"prompt": "q", "query": "x", "response": "a",
                                                               "system": "sys", "history": "hist"}})
    cfg = mapped(tmp_path, "a")
    assert cfg.data_format == "chat"
    rows, _ = load_rows(cfg.data, cfg.data_format)
    assert rows == [{"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "first?"},
                                  {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Add\n2 and 3"},
                                  {"role": "assistant", "content": "5"}]}]


def test_alpaca_ranking_strings(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"instruction": "2+2?", "chosen": "4", "rejected": "5"}])
    registry(tmp_path, p={"file_name": "p.jsonl", "ranking": True,
                          "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}})
    pref, _ = load_preference_rows(f"{tmp_path / 'dataset_info.json'}#p")
    assert pref[0]["prompt"] == [{"role": "user", "content": "2+2?"}] and pref[0]["rejected"][0]["content"] == "5"


def test_plain_entries_still_name_their_file(tmp_path):
    registry(tmp_path, a={"file_name": "a.jsonl"}, s={"file_name": "s.json", "formatting": "sharegpt",
                                                      "columns": {"messages": "conversations"}})
    assert read_entry(tmp_path / "dataset_info.json", "a").is_plain()
    assert read_entry(tmp_path / "dataset_info.json", "s").is_plain()


def test_entry_errors_name_the_registry_and_the_row(tmp_path):
    info = registry(tmp_path, r={"file_name": "x.jsonl", "ranking": True, "formatting": "sharegpt"},
                    m={"file_name": "x.jsonl", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "images": "i"}},
                    t={"file_name": "x.jsonl", "formatting": "sharegpt", "tags": OPENAI_TAGS})
    write_jsonl(tmp_path / "x.jsonl", [CHATS[0], {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(ValueError, match="is ranking: true but its columns name no chosen and rejected"):
        read_entry(info, "r")
    with pytest.raises(ValueError, match=r"has columns \['images'\]; qforge trains on text conversations only"):
        read_entry(info, "m")
    with pytest.raises(DataError, match=r"no dataset named 'nope'"):
        load_rows(f"{info}#nope")
    with pytest.raises(DataError, match=r"x.jsonl:1: missing column 'conversations'"):
        load_rows(f"{info}#t")  # tags only: the messages column stays LLaMA-Factory's default


def test_split_reference():
    assert split_reference("data/dataset_info.json#chats") == (Path("data/dataset_info.json"), "chats")
    assert split_reference("data/chats#1.jsonl") is None and split_reference("data/dataset_info.json") is None
