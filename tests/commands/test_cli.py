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
        if not text.strip():
            missing.append(f"{action.option_strings or action.dest}: no help")
        elif action.option_strings and "default:" not in formatter._get_help_string(action).lower():
            missing.append(f"{action.option_strings}: help does not say the default")
    assert not missing, missing
