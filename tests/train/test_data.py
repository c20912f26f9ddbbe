"""qforge.train.data: reading and validating JSONL, labels, splits, packing, batches."""
import json
import functools

import pytest
import torch

from qforge.train.data import (IGNORE, DataError, batch_order, build_dataset, chat_segments, collate,
                               load_rows, pack_examples, read_jsonl, tokenize_example)


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The embedded SmolLM2 tokenizer (ChatML template), loaded once per test process."""
    import transformers
    from qforge.model.embedded import smollm2_gguf_path
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def chat(user="Hi", answer="Hello!", system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


MULTI_TURN = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris.", "weight": 0},
    {"role": "user", "content": "And of Portugal?"},
    {"role": "assistant", "content": "Lisbon, on the Tagus."},
    {"role": "user", "content": "Spell it backwards."},
    {"role": "assistant", "content": "nobsiL"},
]}


def labelled_spans(example, tok):
    """Decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current)), current.clear()
    if current:
        spans.append(tok.decode(current))
    return spans


# --- reading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, fmt", [
    (chat(), "chat"),
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "instruction"),
    ({"instruction": "Say hi", "output": "hi"}, "instruction"),
    ({"text": "Once upon a time."}, "text"),
])
def test_format_detection(tmp_path, row, fmt):
    path = write(tmp_path, [row, "", row])
    rows, detected = load_rows(path)
    assert detected == fmt and rows == [row, row]
    assert read_jsonl(path, fmt=fmt) == [row, row]


def test_named_format_that_does_not_match_is_an_error(tmp_path):
    path = write(tmp_path, [{"text": "hello"}])
    with pytest.raises(DataError, match=r"data\.jsonl:1: missing key 'messages'"):
        read_jsonl(path, fmt="chat")
    with pytest.raises(ValueError, match="unknown data format"):
        read_jsonl(path, fmt="alpaca")


BAD_LINES = [
    ("{not json", "bad JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"prompt": "x", "completion": "y"}), "this row is completion, line 1 was chat"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}),
     "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
     "'content' must be a string, got int"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
     "empty 'content'"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}), "missing key 'content'"),
    (json.dumps({"messages": "hello"}), "'messages' must be a list"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}),
     "'weight' must be 0 or 1"),
    (json.dumps({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}),
     "only allowed on assistant"),
]


@pytest.mark.parametrize("bad, problem", BAD_LINES)
def test_bad_chat_line_names_file_line_and_problem(tmp_path, bad, problem):
    # good row, blank line, bad row: the bad row is physical line 3
    path = write(tmp_path, [chat(), "", bad], name="mine.jsonl")
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert "mine.jsonl:3:" in message and problem in message, message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("bad, problem", [
    ({"instruction": "x"}, "missing key 'output'"),
    ({"instruction": "x", "output": 5}, "'output' must be a string, got int"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string"),
    ({"instruction": " ", "output": "y"}, "empty 'instruction'"),
    ({"text": "a story"}, "mixed shapes in one file: this row is text, line 1 was instruction"),
])
def test_bad_instruction_line(tmp_path, bad, problem):
    path = write(tmp_path, [{"instruction": "a", "output": "b"}, bad], name="alpaca.jsonl")
    with pytest.raises(DataError, match="alpaca.jsonl:2: " + problem.replace("(", r"\(").replace(")", r"\)")):
        read_jsonl(path)


def test_mixed_shapes_and_wrong_text_type(tmp_path):
    with pytest.raises(DataError, match=r"u\.jsonl:1: unknown row shape.*\['answer', 'question'\]"):
        read_jsonl(write(tmp_path, [{"question": "x", "answer": "y"}], name="u.jsonl"))
    with pytest.raises(DataError, match=r"m\.jsonl:2: mixed shapes.*this row is chat, line 1 was text"):
        read_jsonl(write(tmp_path, [{"text": "x"}, chat()], name="m.jsonl"))
    with pytest.raises(DataError, match=r"t\.jsonl:1: 'text' must be a string, got NoneType"):
        read_jsonl(write(tmp_path, [{"text": None}], name="t.jsonl"))


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_dataset_names_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: empty dataset"):
        read_jsonl(path)


# --- tokenisation --------------------------------------------------------------------------------

def test_assistant_only_labels_are_content_plus_end_of_turn(tok):
    ex = tokenize_example(MULTI_TURN, tok, "chat", max_seq_len=512)
    # the weight-0 answer ("Paris.") is context; the two others are targets, each ending at <|im_end|>
    assert labelled_spans(ex, tok) == ["Lisbon, on the Tagus.<|im_end|>", "nobsiL<|im_end|>"]
    assert not ex["truncated"]


def test_prefix_tokenisation_equals_whole_tokenisation(tok):
    rows = [MULTI_TURN, chat("x", "y"), chat("Tell me: 2+2?", " four ", system="Be brief."),
            {"messages": [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "```\ncode\n```"}]}]
    for row in rows:
        ex = tokenize_example(row, tok, "chat", max_seq_len=512)
        plain = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        whole = tok.apply_chat_template(plain, tokenize=False)
        assert "".join(text for text, _ in chat_segments(row["messages"], tok)) == whole
        assert ex["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
        assert ex["input_ids"] == list(tok.apply_chat_template(plain, tokenize=True)["input_ids"])


def test_instruction_rows_use_the_chat_template(tok):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = tokenize_example(row, tok, "instruction", max_seq_len=512)
    messages = [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert ex["input_ids"] == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert labelled_spans(ex, tok) == ["5<|im_end|>"]
    no_input = tokenize_example({"instruction": "Say hi", "output": "hi"}, tok, "instruction", 512)
    assert "Say hi<|im_end|>" in tok.decode(no_input["input_ids"])


def test_train_on_all_and_text_rows(tok):
    ex = tokenize_example(MULTI_TURN, tok, "chat", max_seq_len=512, train_on="all")
    assert ex["labels"] == ex["input_ids"]
    text = tokenize_example({"text": "The quick brown fox."}, tok, "text", max_seq_len=512)
    assert text["input_ids"][-1] == tok.eos_token_id and text["labels"] == text["input_ids"]
    assert tok.decode(text["input_ids"][:-1]) == "The quick brown fox."
    with pytest.raises(ValueError, match="train_on"):
        tokenize_example(MULTI_TURN, tok, "chat", max_seq_len=512, train_on="prompt")


def test_truncation_keeps_the_start(tok):
    full = tokenize_example(MULTI_TURN, tok, "chat", max_seq_len=10_000)
    cut = tokenize_example(MULTI_TURN, tok, "chat", max_seq_len=20)
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_template_that_rewrites_history_is_refused():
    class Reversing:  # renders the turns newest first: no prefix is a prefix of the whole
        chat_template = "reversed"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"[{m['role']}]{m['content']}" for m in reversed(messages)) + (
                "[assistant]" if add_generation_prompt else "")
    with pytest.raises(DataError, match="not prefix-stable"):
        chat_segments(MULTI_TURN["messages"], Reversing())


# --- datasets ------------------------------------------------------------------------------------

def test_report_counts_truncated_and_dropped_rows(tmp_path, tok):
    short = chat("Hi", "Hello!")
    long_answer = chat("Hi", "word " * 40)                 # truncated inside the answer: kept
    long_question = chat("word " * 60, "Fine.")            # truncated before the answer: dropped
    path = write(tmp_path, [short, long_answer, long_question, short])
    train, held, report = build_dataset(path, tok, max_seq_len=40)
    assert held is None
    assert (report.format, report.rows, report.train_rows) == ("chat", 4, 3)
    assert report.truncated == 2 and report.dropped_no_trainable == 1
    assert report.tokens == sum(len(e["input_ids"]) for e in train.examples)
    assert max(len(e["input_ids"]) for e in train.examples) == 40
    assert report.trainable_tokens == sum(sum(x != IGNORE for x in e["labels"][1:]) for e in train.examples)
    assert "1 dropped" in str(report)


def test_all_rows_dropped_is_an_error(tmp_path, tok):
    path = write(tmp_path, [MULTI_TURN | {"messages": MULTI_TURN["messages"][:3]}], name="ctx.jsonl")
    with pytest.raises(DataError, match=r"ctx\.jsonl: no row has a trainable token"):
        build_dataset(path, tok)


def test_held_out_split_sizes_and_determinism(tmp_path, tok):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(50)]
    path = write(tmp_path, rows)
    train, held, report = build_dataset(path, tok, eval_fraction=0.1, seed=3)
    assert (len(train), len(held), report.train_rows, report.eval_rows, report.rows) == (45, 5, 45, 5, 50)
    again = build_dataset(path, tok, eval_fraction=0.1, seed=3)[1]
    other = build_dataset(path, tok, eval_fraction=0.1, seed=4)[1]
    assert again.examples == held.examples and other.examples != held.examples
    train_ids = {tuple(e["input_ids"]) for e in train.examples}
    assert not train_ids & {tuple(e["input_ids"]) for e in held.examples}      # disjoint
    assert len(build_dataset(path, tok, eval_fraction=0.01)[1]) == 1          # at least one row held out
    with pytest.raises(ValueError, match="not both"):
        build_dataset(path, tok, eval_fraction=0.1, eval_path=path)


def test_eval_file(tmp_path, tok):
    train_path = write(tmp_path, [chat("a", "b")] * 3, name="train.jsonl")
    eval_path = write(tmp_path, [chat("c", "d")] * 2, name="val.jsonl")
    train, held, report = build_dataset(train_path, tok, eval_path=eval_path)
    assert (len(train), len(held), report.rows) == (3, 2, 5)
    bad = write(tmp_path, [{"text": "x"}], name="badval.jsonl")
    with pytest.raises(DataError, match=r"badval\.jsonl:1: missing key 'messages'"):
        build_dataset(train_path, tok, eval_path=bad)


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_packing_keeps_examples_whole(tmp_path, tok, train_on):
    rows = [chat(f"Question number {i}?", "Yes. " * (i % 5 + 1)) for i in range(20)]
    path = write(tmp_path, rows)
    plain = build_dataset(path, tok, max_seq_len=128, train_on=train_on)[0]
    packed, _, report = build_dataset(path, tok, max_seq_len=128, pack=True, train_on=train_on)
    assert report.packed_rows == len(packed) < len(plain) and packed.packed
    assert all(len(e["input_ids"]) <= 128 for e in packed.examples)
    # unpacking by position_ids restarts gives back the examples, in order
    unpacked = []
    for row in packed.examples:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE
            unpacked.append(row["input_ids"][a:b])
    assert unpacked == [e["input_ids"] for e in plain.examples]
    assert sum(sum(x != IGNORE for x in e["labels"]) for e in packed.examples) == \
        sum(sum(x != IGNORE for x in e["labels"][1:]) for e in plain.examples)


def test_packed_batch_keeps_examples_apart_in_attention():
    """A packed row's logits equal those of its examples run alone (tiny random Llama), with
    padding; this is the contract `collate` documents (position_ids, no attention_mask, no cache)."""
    from tests.fixtures import tiny_llama
    model = tiny_llama(32, vocab=64, max_position_embeddings=64).eval()
    a, b, c = [5, 6, 7, 8], [9, 10, 11], [12, 13]
    examples = [{"input_ids": x, "labels": x} for x in (a, b, c)]
    rows = pack_examples(examples, max_seq_len=7)
    assert [len(r["input_ids"]) for r in rows] == [7, 2]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4]
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits
        for row, start, ids in ((0, 0, a), (0, 4, b), (1, 0, c)):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[row, start:start + len(ids)], alone, atol=1e-5, rtol=1e-5)


# --- batches -------------------------------------------------------------------------------------

def test_collate_pads_right():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batch_order_is_deterministic_and_covers_each_index_once():
    order = batch_order(10, 4, seed=1, epoch=0)
    assert [len(b) for b in order] == [4, 4, 2]
    assert sorted(i for b in order for i in b) == list(range(10))
    torch.manual_seed(123)                                  # the global RNG does not matter
    assert batch_order(10, 4, seed=1, epoch=0) == order
    assert batch_order(10, 4, seed=1, epoch=1) != order     # a new shuffle each epoch
    assert batch_order(10, 4, seed=2, epoch=0) != order
    with pytest.raises(ValueError):
        batch_order(0, 4, 0, 0)


def test_the_run_schedule_is_the_same_whenever_it_is_recomputed():
    """A resumed run recomputes the whole schedule and continues at its step: the remaining
    micro-batches are the ones the first run had not yet seen, across epoch boundaries too."""
    from qforge.train.config import TrainConfig
    from qforge.train.loop import micro_batches
    cfg = TrainConfig(batch_size=5, grad_accum=2, seed=7, epochs=3)
    first_run = micro_batches(37, cfg, total_steps=11)
    torch.manual_seed(99)  # the global RNG does not matter
    assert micro_batches(37, cfg, total_steps=11) == first_run
    epoch0 = batch_order(37, 5, seed=7, epoch=0)
    assert first_run[:len(epoch0)] == epoch0 and sorted(sum(epoch0, [])) == list(range(37))
    assert first_run[len(epoch0):2 * len(epoch0)] == batch_order(37, 5, seed=7, epoch=1)
