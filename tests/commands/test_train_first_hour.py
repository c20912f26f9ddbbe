"""`qforge train` as a new user meets it: column mapping, an existing adapter kept, a failed check
that leaves nothing behind, the default checkpoint interval, one count of trained tokens, a quiet
first line, and messages that name settings as the interface in use spells them. Tiny random
Llama; each run takes seconds."""
import json

import pytest

from qforge.cli import main
from qforge.train.config import INTERFACE, TrainConfig, setting
from qforge.train.data import DataError, load_rows
from tests.model.conftest import tiny_dir  # noqa: F401 (a fixture)

QA = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w7", "id": i} for i in range(8)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- column mapping -----------------------------------------------------------------------------
def test_field_map_makes_a_chat_of_your_keys(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:2])
    rows, fmt = load_rows(data, field_map=TrainConfig(field_map="question=user,answer=assistant").field_map)
    assert fmt == "chat"
    assert rows[0]["messages"] == [{"role": "user", "content": "w0 w1"}, {"role": "assistant", "content": "w2 w7"}]


def test_field_map_renames_row_and_turn_keys(tmp_path):
    inst = write_jsonl(tmp_path / "i.jsonl", [{"task": "say hi", "reply": "hi"}])
    rows, fmt = load_rows(inst, field_map={"task": "instruction", "reply": "output"})
    assert (fmt, rows) == ("instruction", [{"instruction": "say hi", "output": "hi"}])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"dialogue": [{"speaker": "user", "text": "a"},
                                                            {"speaker": "assistant", "text": "b"}]}])
    rows, fmt = load_rows(chat, field_map={"dialogue": "messages", "speaker": "role", "text": "content"})
    assert (fmt, rows[0]["messages"]) == ("chat", [{"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}])


def test_field_map_names_the_line_missing_a_key(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [QA[0], {"question": "w1"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing key 'answer' \(field_map maps it to assistant\)"):
        load_rows(data, field_map={"question": "user", "answer": "assistant"})


def test_unknown_keys_suggest_the_field_map_as_the_interface_spells_it(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    with pytest.raises(DataError, match=r"map your keys with --field-map answer=user,id=assistant"):
        load_rows(data)
    token = INTERFACE.set("recipe")
    try:
        with pytest.raises(DataError, match=r'map your keys with field_map: "answer=user,id=assistant"'):
            load_rows(data)
    finally:
        INTERFACE.reset(token)


def test_axolotl_and_llamafactory_column_keys_become_a_field_map(tmp_path):
    import yaml

    from qforge.train.recipes import load_config
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:2])
    axolotl = {"base_model": "smollm2", "adapter": "qlora", "load_in_4bit": True,
               "datasets": [{"path": str(data), "type": {"field_instruction": "question", "field_output": "answer"}}]}
    path = tmp_path / "ax.yaml"
    path.write_text(yaml.safe_dump(axolotl))
    cfg, _ = load_config(path, {})
    assert cfg.field_map == {"question": "instruction", "answer": "output"}
    chat = {"base_model": "smollm2", "adapter": "qlora", "load_in_4bit": True,
            "datasets": [{"path": str(data), "type": "chat_template", "field_messages": "dialogue",
                          "message_property_mappings": {"role": "speaker", "content": "text"}}]}
    path.write_text(yaml.safe_dump(chat))
    cfg, _ = load_config(path, {})
    assert cfg.field_map == {"dialogue": "messages", "speaker": "role", "text": "content"}


# ---- the output folder --------------------------------------------------------------------------
def test_an_existing_adapter_is_kept_unless_overwrite_or_resume(tmp_path, monkeypatch, capsys):
    import qforge.train.run as run
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    argv = ["train", "--data", str(data), "--field-map", "question=user,answer=assistant", "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds an adapter" in err[0] and "--overwrite" in err[0] and "--resume" in err[0]

    def reached(*_a, **_kw):
        raise ValueError("prepare reached")
    monkeypatch.setattr(run, "prepare", reached)
    for extra in (["--overwrite"], ["--resume"]):
        assert main(argv + extra) == 2
        assert "prepare reached" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_config.json").read_text() == "{}"


def test_an_interrupted_runs_checkpoints_are_kept_too(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    (tmp_path / "out" / "checkpoints" / "step-000003").mkdir(parents=True)
    assert main(["train", "--data", str(data), "--field-map", "question=user,answer=assistant",
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "already holds the checkpoints of an earlier run" in err and "--overwrite" in err


def test_a_failed_check_leaves_no_output_folder(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "runs" / "new"
    assert main(["train", "--data", str(data), "--field-map", "question=user,answer=assistant",
                 "--model", str(tmp_path / "nowhere"), "--output-dir", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_default_checkpoint_interval_is_a_tenth_of_the_run():
    assert [TrainConfig().checkpoint_every(n) for n in (1, 3, 10, 30, 101)] == [1, 1, 1, 3, 11]
    assert TrainConfig(save_every=0).checkpoint_every(30) == 0
    assert TrainConfig(save_every=7).checkpoint_every(30) == 7
    with pytest.raises(ValueError, match="save_every: expected a whole number >= 0"):
        TrainConfig(save_every=-1)


# ---- a real (tiny) run: checkpoints, trained tokens, the quiet first line -------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):  # noqa: F811
    """`qforge train` on the tiny model, one epoch of 8 rows in batches of 2 (4 steps): its output."""
    import subprocess
    import sys
    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    out = tmp / "out"
    (out / "checkpoints" / "step-000099").mkdir(parents=True)  # an earlier run's, which --overwrite replaces
    (out / "checkpoints" / "step-000099" / "state.json").write_text('{"step": 99}')
    proc = subprocess.run([sys.executable, "-m", "qforge", "train", "--model", str(tiny_dir), "--data", str(data),
                           "--field-map", "question=user,answer=assistant", "--rank", "4", "--batch-size", "2",
                           "--max-seq-len", "64", "--compute-dtype", "float32", "--output-dir", str(out), "--overwrite"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    return proc, out


def _env():
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "QFORGE_DEBUG": "1"}


def test_quiet_run_says_what_it_trains_in_one_plain_line(tiny_run):
    proc, _ = tiny_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("training qlora on ") and lines[0].endswith(" trainable parameters, 8 rows, 4 steps"), \
        lines[0]
    assert "gradient checkpointing" not in proc.stdout
    assert "FutureWarning" not in proc.stderr and "DeprecationWarning" not in proc.stderr


def test_default_checkpoints_and_one_count_of_trained_tokens(tiny_run, tiny_dir):  # noqa: F811
    """4 steps: a checkpoint every step (10% rounded up), the earlier run's gone (--overwrite); one
    epoch, so the tokens the loss was taken over are the data's trained tokens, and the summary,
    metrics and data report agree."""
    _, out = tiny_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-00000{i}" for i in range(1, 5)]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    from qforge.train.data import build_dataset, read_splits
    # the tokenizer training used: the base's (the copy saved with the adapter ends ChatML turns at
    # <|im_end|> for generation, which changes how a row's answer end is counted)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    splits = read_splits(cfg.data, field_map=cfg.field_map)
    _, _, report = build_dataset(cfg.data, tok, max_seq_len=64, splits=splits)
    assert summary["trained_tokens"] == records[-1]["trained_tokens"] == report.trainable_tokens > 0
    assert summary["tokens"] == report.tokens > summary["trained_tokens"]


# ---- messages name settings as the interface spells them ------------------------------------------
def test_setting_is_spelled_per_interface():
    assert setting("max_seq_len", 1024) == "--max-seq-len 1024"
    assert setting("keep_base_outputs", False) == "--no-keep-base-outputs"
    assert setting("max_seq_len", 1024, "recipe") == "max_seq_len: 1024"
    assert setting("max_seq_len", 1024, "api") == "hyperparameters.max_seq_len = 1024"
    assert setting("epochs", None, "api") == "hyperparameters.n_epochs"
    assert setting("keep_base_outputs", False, "api") is None  # the jobs API has no such setting
    assert setting("train_on", "all", "api") is None


def test_a_job_is_not_told_about_flags(tmp_path):
    """In the jobs trainer (interface "api") the no-trained-token error advises no flag."""
    from qforge.plan.policy import _how_to_save
    from qforge.train.data import no_trained_token
    assert "--train-on all" in no_trained_token("d.jsonl", 64, 0)
    token = INTERFACE.set("api")
    try:
        text = no_trained_token("d.jsonl", 64, 2)
        assert "--" not in text and "hyperparameters.max_seq_len = 128" in text
        assert _how_to_save() == ""
    finally:
        INTERFACE.reset(token)
    assert _how_to_save() == "; --no-keep-base-outputs to save it"


def test_fit_advice_and_interrupt_line_follow_the_interface():
    from qforge.plan.policy import _describe
    from qforge.train.loop import _continue_with
    assert _describe({"method": "qlora", "batch_size": 2, "gradient_checkpointing": True}) == \
        "--method qlora --batch-size 2 --gradient-checkpointing"
    assert _continue_with() == "; continue with --resume"
    token = INTERFACE.set("api")
    try:
        assert _describe({"method": "qlora", "batch_size": 2}) == \
            'hyperparameters.method = "qlora", hyperparameters.batch_size = 2'
        assert _continue_with() == ""  # a job resumes by itself
    finally:
        INTERFACE.reset(token)


def test_job_messages_name_the_uploaded_files():
    """The trainer names train.jsonl / valid.jsonl (the job folder's links) as their owner uploaded them."""
    from qforge.jobs.trainer_child import uploaded_names

    class Store:
        files = {"file-a": {"filename": "chat.jsonl"}, "file-b": {"filename": "held-out.jsonl"}}

        def get_file(self, file_id):
            return self.files.get(file_id)

    rename = uploaded_names(Store(), {"training_file": "file-a", "validation_file": "file-b"})
    assert rename("train.jsonl:3: messages[1]: missing key 'role'") == "chat.jsonl:3: messages[1]: missing key 'role'"
    assert rename("valid.jsonl: empty dataset") == "held-out.jsonl: empty dataset"
    assert uploaded_names(Store(), {"training_file": "file-a", "validation_file": None})("valid.jsonl") == "valid.jsonl"
