"""qforge.eval.tasks: the demo task's generator, its shipped files and exact_match."""
import json
import statistics

import pytest

from qforge.train.data import load_rows, tokenize_example
from qforge.eval.tasks import (CITIES, DEMO_TASK_DIR, FIRST_NAMES, JOBS, KEYS, LAST_NAMES, SYSTEM_PROMPT, TEMPLATES,
                                demo_task_paths, exact_match, first_json_object, generate_task, make_task_rows,
                                prompt_messages, with_article)


def person_of(row):
    return json.loads(row["messages"][-1]["content"])


def template_of(row):
    """The template that produced the row's sentence (None when no template does)."""
    p = person_of(row)
    sentence = row["messages"][1]["content"]
    matches = [t for t in TEMPLATES if t.format(a_job=with_article(p["job"]), **p) == sentence]
    return matches[0] if matches else None


@pytest.fixture(scope="module")
def shipped():
    return {split: load_rows(path, "chat")[0] for split, path in demo_task_paths().items()}


def test_shipped_files_are_the_generator_output(tmp_path):
    paths = generate_task(out_dir=tmp_path)
    for split, path in demo_task_paths().items():
        assert path.read_bytes() == paths[split].read_bytes(), f"{split}.jsonl differs from generate_task()"
    assert sum(p.stat().st_size for p in demo_task_paths().values()) < 400_000
    assert DEMO_TASK_DIR.name == "demo_task"


def test_generator_is_seeded():
    assert make_task_rows(30, 5, 5, seed=1) == make_task_rows(30, 5, 5, seed=1)
    assert make_task_rows(30, 5, 5, seed=1) != make_task_rows(30, 5, 5, seed=2)
    with pytest.raises(ValueError, match="at most"):
        make_task_rows(len(FIRST_NAMES) * len(LAST_NAMES), 1, 0)


def test_word_lists_have_the_promised_sizes_and_no_duplicates():
    for words, least in ((FIRST_NAMES, 60), (LAST_NAMES, 60), (CITIES, 50), (JOBS, 40)):
        assert len(words) >= least and len(set(words)) == len(words)


def test_splits_share_templates_but_not_people(shipped):
    assert {split: len(rows) for split, rows in shipped.items()} == {"train": 800, "val": 100, "test": 100}
    names = {split: {person_of(r)["name"] for r in rows} for split, rows in shipped.items()}
    assert len(names["train"]) == 800 and len(names["test"]) == 100
    assert not names["test"] & names["train"] and not names["test"] & names["val"] and not names["val"] & names["train"]
    for split, rows in shipped.items():
        used = [template_of(r) for r in rows]
        assert None not in used and set(used) == set(TEMPLATES), split


def test_rows_are_chat_rows_with_the_fixed_answer_form(shipped):
    for row in shipped["train"] + shipped["test"]:
        system, user, assistant = row["messages"]
        assert (system["role"], system["content"], user["role"], assistant["role"]) == \
            ("system", SYSTEM_PROMPT, "user", "assistant")
        answer = person_of(row)
        assert tuple(answer) == KEYS and isinstance(answer["age"], int) and 18 <= answer["age"] <= 75
        assert assistant["content"] == json.dumps(answer) and "\n" not in assistant["content"]
        for value in answer.values():                        # every value is copied from the sentence
            assert str(value) in user["content"]
        assert prompt_messages(row) == [system, user]


def test_demo_rows_are_short_and_tokenise_consistently(shipped):
    from tests.train.test_data import load_tokenizer
    tok = load_tokenizer()
    lengths = []
    for row in shipped["train"][:200] + shipped["test"]:
        ex = tokenize_example(row, tok, "chat", max_seq_len=512)
        whole = tok.apply_chat_template(row["messages"], tokenize=False)
        assert ex["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
        trained = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
        assert tok.decode(trained) == row["messages"][-1]["content"] + "<|im_end|>"
        lengths.append(len(ex["input_ids"]))
    assert 60 <= min(lengths) and max(lengths) <= 90 and 70 <= statistics.mean(lengths) <= 85


ROW = {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": "Maria Lopez, 34, lives in Porto and works as a nurse."},
                    {"role": "assistant", "content": '{"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse"}'}]}


@pytest.mark.parametrize("prediction", [
    '{"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse"}',
    '{"job":"nurse","city":"Porto","age":34,"name":"Maria Lopez"}',
    'Here you go:\n```json\n{\n  "age": 34,\n  "name": "Maria Lopez",\n  "city": "Porto",\n  "job": "nurse"\n}\n```',
    '{broken {"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse"} {"name": "x"}',
])
def test_exact_match_ignores_key_order_whitespace_and_surroundings(prediction):
    assert exact_match(prediction, ROW)


@pytest.mark.parametrize("prediction", [
    '{"name": "Maria Lopez", "age": 35, "city": "Porto", "job": "nurse"}',       # wrong value
    '{"name": "Maria Lopez", "age": "34", "city": "Porto", "job": "nurse"}',     # age as a string
    '{"name": "Maria Lopez", "age": 34.0, "city": "Porto", "job": "nurse"}',     # age as a float
    '{"name": "Maria Lopez", "age": 34, "city": "Porto"}',                       # missing key
    '{"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse", "x": 1}',  # extra key
    '{"name": "maria lopez", "age": 34, "city": "Porto", "job": "nurse"}',       # case matters
    '{"person": {"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse"}}',  # first object is nested
    'Maria Lopez is 34, from Porto, a nurse.',                                   # no JSON at all
    '{"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse"',        # unterminated
])
def test_exact_match_rejects_wrong_answers(prediction):
    assert not exact_match(prediction, ROW)


def test_first_json_object():
    assert first_json_object('a [1, 2] b {"k": [1, {"x": 2}]} {"z": 0}') == {"k": [1, {"x": 2}]}
    assert first_json_object("no braces") is None and first_json_object("{ nope }") is None
