import re

import pytest

from qforge.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_device_cuda_without_a_gpu_is_one_line_and_fast(tmp_path):
    """--device is resolved once, before any model is loaded: on a machine without CUDA, one line."""
    import subprocess
    import sys

    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("this machine has a GPU")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    for argv in (["train", "--data", str(data), "--device", "cuda", "--output-dir", str(tmp_path / "r")],
                 ["train", "--data", str(data), "--device", "cuda", "--nproc", "2", "--output-dir", str(tmp_path / "r")],
                 ["serve", "--device", "cuda:1"], ["quantize", "smollm2", str(tmp_path / "q"), "--device", "cuda"],
                 ["merge", "--base", "smollm2", "--adapter", str(tmp_path), "--out", str(tmp_path / "m"),
                  "--device", "cuda"]):
        proc = subprocess.run([sys.executable, "-m", "qforge", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
        assert len(lines) == 1 and "no CUDA GPU" in lines[0], (argv, proc.stderr)
        assert not (tmp_path / "q").exists()


def test_resolve_device_names():
    import pytest
    import torch

    from qforge.devices import DeviceError, resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="expected auto"):
        resolve_device("tpu")


def test_version(capsys):
    import qforge
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"qforge {qforge.__version__}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_of_every_command_has_help_with_its_default(command):
    """Walks each sub-command's argparse parser: every option has help text, and the help shown
    (as the command's formatter renders it) states the default."""
    import argparse

    from qforge.cli import build_parser

    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    missing = []
    for action in sub._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        text = action.help or ""
        description = re.sub(r"\(default[: ][^)]*\)", "", text).strip(" .;,")
        if not description:
            missing.append(f"{action.option_strings or action.dest}: no description, only {text!r}")
        elif action.option_strings and not re.search(r"default[: ]", formatter._get_help_string(action).lower()):
            missing.append(f"{action.option_strings}: help does not say the default")
    assert not missing, missing
    shown = formatter._format_usage(sub.usage, sub._actions, sub._mutually_exclusive_groups, None)
    hidden = [a.option_strings for a in sub._actions if a.choices and a.option_strings and a.metavar is not None
              and not all(str(c) in shown or str(c) in (a.help or "") for c in a.choices)]
    assert not hidden, f"choices shown neither in the usage line nor in the help: {hidden}"
    doubled = [a.option_strings for a in sub._actions
               if formatter._get_help_string(a).lower().count("default") > 1 + (a.help or "").lower().count("default")]
    assert not doubled, f"help says the default twice: {doubled}"


# settings with a fixed set of values: `train --help` must show them, as argparse's {a,b,c}
TRAIN_CHOICES = {"--method": "{qlora,lora,full,dpo,orpo}", "--optimizer": "{paged_adamw_8bit,adamw_8bit,adamw}",
                 "--quant-type": "{nf4,fp4,hqq4,hqq3,hqq2}", "--lr-scheduler": "{cosine,linear,constant}",
                 "--train-on": "{assistant,all}", "--compute-dtype": "{bfloat16,float16,float32}",
                 "--objective": "{sft,dpo,orpo}", "--wandb-mode": "{online,offline,disabled}",
                 "--report-to": "{tensorboard,wandb,none}"}


def test_train_help_is_grouped_and_shows_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for heading in ("data:", "model:", "method:", "training:", "output:", "tracking:", "hardware:"):
        assert f"\n{heading}\n" in out, heading
    for flag, choices in TRAIN_CHOICES.items():
        assert f"{flag} {choices}" in out, flag
    for flag in ("--evals-per-epoch", "--saves-per-epoch", "--wandb-project", "--wandb-entity", "--wandb-name"):
        line = out[out.index(f"  {flag} "):].split("\n  --")[0]
        assert "Weights" in line or "per epoch" in line, line


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "fast"], "argument --lr: expected a number > 0, such as 2e-4, got 'fast'"),
    (["--method", "qlorra"], "argument --method: invalid choice: 'qlorra'"),
    (["--max-steps", "0"], "argument --max-steps: expected a whole number >= 1, got 0"),
    (["--save-every", "-1"], "argument --save-every: expected a whole number >= 0, got -1"),
    (["--eval-fraction", "1.5"], "argument --eval-fraction: expected a number in [0, 1), got 1.5"),
    (["--rank", "r16"], "argument --rank: expected a whole number >= 1, got 'r16'"),
    (["--field-map", "question"], "field_map: expected YOUR_KEY=TARGET pairs"),
    (["--field-map", "question=asker"], "field_map: 'question' -> 'asker': the target must be one of"),
])
def test_a_bad_value_is_one_line_naming_the_flag(capsys, argv, expected):
    """A bad value is one line on stderr (not argparse's usage block), exit status 2."""
    try:
        code = main(["train", "--data", "unused.jsonl", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert lines[0].startswith("qforge train: error: ")
