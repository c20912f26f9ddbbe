"""Preference rows in every accepted shape give the same tokens; malformed rows are named by file and
line; pairs collate into the concatenated [chosen..., rejected...] batch the losses read."""
import json

import pytest
import torch

from qforge.train.data import DataError
from qforge.train.preference_data import (collate_pairs, load_preference_rows, tokenize_pair, tokenize_pairs)
from tests import fixtures

SYSTEM, USER, GOOD, BAD = "w1 w2", "w3 w4 w5", "w10 w11 w12", "w20 w21"
PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]

# the same conversation in every shape a file may carry it
SAME_PAIR = {
    "openai": {"input": {"messages": PROMPT},
               "preferred_output": [{"role": "assistant", "content": GOOD}],
               "non_preferred_output": [{"role": "assistant", "content": BAD}]},
    "trl": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}]},
    "trl-implicit": {"chosen": PROMPT + [{"role": "assistant", "content": GOOD}],
                     "rejected": PROMPT + [{"role": "assistant", "content": BAD}]},
    "llama-factory": {"conversations": [{"from": "human", "value": USER}], "system": SYSTEM,
                      "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
    "sharegpt-system-turn": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": USER}],
                             "chosen": [{"from": "gpt", "value": GOOD}], "rejected": [{"from": "gpt", "value": BAD}]},
    "axolotl": {"messages": PROMPT, "chosen": {"role": "assistant", "content": GOOD},
                "rejected": {"role": "assistant", "content": BAD}},
    "sharegpt-strings": {"conversations": [{"from": "human", "value": USER}], "system": SYSTEM,
                         "chosen": GOOD, "rejected": BAD},
}
OTHER_OPENAI = {"input": {"messages": PROMPT[1:]}, "preferred_output": [{"role": "assistant", "content": "w40"}],
                "non_preferred_output": [{"role": "assistant", "content": "w41 w42 w43"}]}
SHAPE_OF = {"openai": "openai", "trl": "trl", "trl-implicit": "trl", "llama-factory": "sharegpt",
            "sharegpt-system-turn": "sharegpt", "axolotl": "sharegpt", "sharegpt-strings": "sharegpt"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return fixtures.word_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_shape_gives_the_same_tokens(tmp_path, tok):
    pairs = {}
    for name, row in SAME_PAIR.items():
        rows, shape = load_preference_rows(write_jsonl(tmp_path / f"{name}.jsonl", [row, row]))
        assert shape == SHAPE_OF[name] and len(rows) == 2
        pairs[name] = tokenize_pair(rows[0], tok, 512)
    reference = pairs["openai"]
    for name, pair in pairs.items():
        assert pair == reference, name

    # the prompt is the chat template's rendering with the generation prompt; labels only on the reply
    prompt = ids(tok, tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True))
    assert reference["prompt_ids"] == prompt
    for side, reply in (("chosen", GOOD), ("rejected", BAD)):
        x = reference[side]
        whole = ids(tok, tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": reply}], tokenize=False))
        assert x["input_ids"] == whole and whole[:len(prompt)] == prompt
        assert x["labels"] == [-100] * len(prompt) + whole[len(prompt):]
    assert reference["truncated"] == 0


def test_plain_text_pairs(tmp_path, tok):
    rows, shape = load_preference_rows(write_jsonl(tmp_path / "plain.jsonl",
                                                   [{"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w5"}]))
    assert shape == "trl" and rows == [{"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w5"}]
    pair = tokenize_pair(rows[0], tok, 64)
    prompt = tok("w1 w2")["input_ids"]
    assert pair["prompt_ids"] == prompt
    assert pair["chosen"]["input_ids"] == prompt + ids(tok, "w3") + [tok.eos_token_id]
    assert pair["rejected"]["labels"] == [-100] * len(prompt) + ids(tok, "w4 w5") + [tok.eos_token_id]


def test_a_multi_turn_prompt_keeps_its_assistant_turns_as_context(tmp_path, tok):
    prompt = PROMPT + [{"role": "assistant", "content": "w30"}, {"role": "user", "content": "w31"}]
    rows, _ = load_preference_rows(write_jsonl(tmp_path / "multi.jsonl", [{
        "input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": GOOD}],
        "non_preferred_output": [{"role": "assistant", "content": BAD}]}]))
    pair = tokenize_pair(rows[0], tok, 512)
    context = ids(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    assert pair["prompt_ids"] == context
    assert all(t == -100 for t in pair["chosen"]["labels"][:len(context)])
    assert pair["chosen"]["labels"][len(context):] == pair["chosen"]["input_ids"][len(context):]


def test_the_chatml_template_of_the_embedded_model():
    """SmolLM2's real ChatML template: the reply, its <|im_end|>, and not the newline after it."""
    tok = fixtures.smollm2_tokenizer()
    row = {"prompt": [{"role": "user", "content": "Which colour?"}],
           "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}
    pair = tokenize_pair(row, tok, 512)
    assert pair["prompt_ids"] == tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)
    trained = [t for t in pair["chosen"]["labels"] if t != -100]
    assert tok.decode(trained) == "Blue.<|im_end|>"


BAD_ROWS = [  # (row, what the error says)
    ({"input": {"messages": PROMPT}, "preferred_output": [{"role": "assistant", "content": GOOD}]},
     "'non_preferred_output' must be a list of messages, got NoneType"),
    ({"input": PROMPT, "preferred_output": [], "non_preferred_output": []}, "'input' must be an object"),
    ({"input": {"messages": PROMPT}, "preferred_output": [{"role": "user", "content": GOOD}],
      "non_preferred_output": [{"role": "assistant", "content": BAD}]}, "must end with an assistant message"),
    ({"input": {"messages": PROMPT, "tools": [{"type": "function"}]},
      "preferred_output": [{"role": "assistant", "content": GOOD}],
      "non_preferred_output": [{"role": "assistant", "content": BAD}]}, "'input.tools' is not supported"),
    ({"input": {"messages": [{"role": "robot", "content": "x"}]},
      "preferred_output": [{"role": "assistant", "content": GOOD}],
      "non_preferred_output": [{"role": "assistant", "content": BAD}]}, "input.messages[0]: role must be one of"),
    ({"prompt": "w1", "chosen": "w2"}, "missing key 'rejected'"),
    ({"prompt": "w1", "chosen": "", "rejected": "w2"}, "empty 'chosen'"),
    ({"prompt": "w1", "chosen": [{"role": "assistant", "content": "w2"}], "rejected": "w3"},
     "'prompt' must be a list of messages, got str"),
    ({"chosen": [{"role": "assistant", "content": "w2"}], "rejected": [{"role": "assistant", "content": "w3"}]},
     "share no prompt turn"),
    ({"conversations": [{"from": "human", "value": USER}], "chosen": {"from": "gpt", "value": GOOD}},
     "missing key 'rejected'"),
    ({"conversations": [{"from": "alien", "value": USER}], "chosen": GOOD, "rejected": BAD}, "unknown from 'alien'"),
    ({"conversations": [{"from": "human", "value": 3}], "chosen": GOOD, "rejected": BAD},
     "conversations[0]: 'content' must be a string, got int"),
    ({"conversations": [{"from": "human", "value": USER}], "chosen": 5, "rejected": BAD}, "'chosen' must be a turn"),
    ({"text": "w1"}, "not a preference row"),
    ([1, 2], "not a JSON object"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, row, message):
    good = SAME_PAIR["openai"] if isinstance(row, dict) and _openai(row) else SAME_PAIR["trl"]
    if isinstance(row, dict) and ("conversations" in row):
        good = SAME_PAIR["llama-factory"]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")   # line 2 blank: the bad row is line 3
    with pytest.raises(DataError) as err:
        load_preference_rows(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def _openai(row):
    return "input" in row or "preferred_output" in row


def test_bad_json_and_mixed_shapes_are_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(SAME_PAIR["openai"]) + "\n{oops\n")
    with pytest.raises(DataError, match=f"^{path}:2: bad JSON"):
        load_preference_rows(path)
    write_jsonl(path, [SAME_PAIR["openai"], SAME_PAIR["trl"]])
    with pytest.raises(DataError, match=f"^{path}:2: mixed shapes in one file: this row is trl, line 1 was openai"):
        load_preference_rows(path)
    write_jsonl(path, [SAME_PAIR["trl"]])
    with pytest.raises(DataError, match=f"^{path}:1: mixed shapes .* the file was read as openai"):
        load_preference_rows(path, shape="openai")
    path.write_text("\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_preference_rows(path)


def test_collate_concatenates_chosen_then_rejected(tok):
    rows = [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "w10"}],
             "rejected": [{"role": "assistant", "content": "w20 w21 w22 w23"}]},
            {"prompt": PROMPT[1:], "chosen": [{"role": "assistant", "content": "w11 w12"}],
             "rejected": [{"role": "assistant", "content": "w24"}]}]
    pairs, report = tokenize_pairs(rows, tok, 512)
    batch = collate_pairs(pairs, pad_id=tok.eos_token_id)
    order = [pairs[0]["chosen"], pairs[1]["chosen"], pairs[0]["rejected"], pairs[1]["rejected"]]
    width = max(len(x["input_ids"]) for x in order)
    assert batch["input_ids"].shape == (4, width) and batch["input_ids"].dtype == torch.long
    for row, x in enumerate(order):
        n = len(x["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == x["input_ids"]
        assert batch["labels"][row, :n].tolist() == x["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == tok.eos_token_id).all()
    assert report.kept == 2 and report.dropped == 0 and report.tokens == sum(len(x["input_ids"]) for x in order)


def test_truncation_keeps_the_first_tokens_and_drops_pairs_left_without_a_completion(tok):
    rows = [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "w10 w11 w12 w13"}],
             "rejected": [{"role": "assistant", "content": "w20"}]}]
    full = tokenize_pair(rows[0], tok, 512)
    n_prompt = len(full["prompt_ids"])
    fits = len(full["rejected"]["input_ids"])
    assert len(full["chosen"]["input_ids"]) > fits
    cut = tokenize_pair(rows[0], tok, fits)
    assert cut["truncated"] == 1  # the chosen side only: the rejected one fits
    assert cut["chosen"]["input_ids"] == full["chosen"]["input_ids"][:fits]
    assert cut["chosen"]["labels"] == full["chosen"]["labels"][:fits]
    assert cut["rejected"] == full["rejected"]
    pairs, report = tokenize_pairs(rows, tok, n_prompt)
    assert pairs == [] and report.dropped == 1 and report.truncated == 2


def test_rows_through_the_loss(tmp_path, tok):
    """A file read, tokenised and collated is a batch preference_step takes (one forward of 2B rows)."""
    from qforge.model.surgery import add_adapter
    from qforge.nn import LoraSpec
    from qforge.train.preference import PreferenceConfig, preference_step

    rows, _ = load_preference_rows(write_jsonl(tmp_path / "p.jsonl", [SAME_PAIR["openai"], OTHER_OPENAI]))
    pairs, _ = tokenize_pairs(rows, tok, 128)
    batch = collate_pairs(pairs, tok.eos_token_id)
    model = fixtures.quantize_all(fixtures.tiny_llama(vocab=fixtures.WORD_VOCAB))
    add_adapter(model, "default", LoraSpec(r=4, dropout=0.0))
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    loss, metrics = preference_step(model, batch, PreferenceConfig("dpo"))
    loss.backward()
    # B starts at zero: the policy is the reference, every reward 0 and the loss log 2
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/margins"] == 0.0
    assert float(loss) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
    assert calls == [batch["input_ids"].shape] * 2  # the reference pass and the policy pass, each one forward


def test_a_json_array_names_the_row_and_the_error_carries_the_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([SAME_PAIR["llama-factory"], {**SAME_PAIR["llama-factory"], "chosen": 3}]))
    with pytest.raises(DataError, match=f"^{path}: row 2: 'chosen' must be a turn") as err:
        load_preference_rows(path)
    assert err.value.path == str(path)


def test_tokens_are_trls_but_for_the_separator_after_the_end_of_turn(tmp_path):
    """TRL's DPOTrainer tokenises a conversational row into the same ids; its completion mask also
    covers the newline the ChatML template writes after <|im_end|>, which qforge does not train (as
    in its SFT: generation stops at <|im_end|>, so that newline is never predicted)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok = fixtures.smollm2_tokenizer()
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which colour?"}],
           "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No, red"}]}
    trainer = DPOTrainer(model=fixtures.tiny_llama(vocab=len(tok), tied=True),
                         args=DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                         train_dataset=Dataset.from_list([row]), processing_class=tok,
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    theirs = trainer.train_dataset[0]
    ours = tokenize_pair(row, tok, 512)
    assert ours["prompt_ids"] == theirs["prompt_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for side in ("chosen", "rejected"):
        completion = ours[side]["input_ids"][len(ours["prompt_ids"]):]
        assert completion == theirs[f"{side}_ids"] and completion[-1:] == newline
        assert ours[side]["labels"][len(ours["prompt_ids"]):] == completion[:-1] + [-100]
