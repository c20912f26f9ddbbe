"""The README's quickstart runs as written: its commands are read from README.md (so the test
follows the text and the text cannot rot) and run on the embedded model with a tiny step count:
`qforge train`, `qforge serve` with one call of the official `openai` client, `qforge export`."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def quickstart() -> tuple[list[str], str]:
    """(the `qforge ...` command lines of the quickstart's shell blocks, its Python block)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    commands = [line.split("  #")[0].strip() for lang, body in blocks if lang == "sh"
                for line in body.splitlines() if line.strip().startswith("qforge ")]
    python = [body for lang, body in blocks if lang == "python"]
    assert python, "the quickstart has no Python block"
    return commands, python[0]


def test_the_quickstart_names_the_four_steps():
    commands, python = quickstart()
    assert [c.split()[1] for c in commands] == ["train", "serve", "export"]
    assert "from openai import OpenAI" in python and "127.0.0.1:8000/v1" in python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "QFORGE_DEBUG": "1"}


def qforge(command: str) -> list[str]:
    """A README command line as argv for this interpreter (`qforge` may not be on PATH)."""
    return [sys.executable, "-m", "qforge", *command.split()[1:]]


def wait_for_server(url: str, proc: subprocess.Popen, limit_s: float = 600) -> None:
    """Poll until the server answers (a bound on waiting, not an assertion about speed)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qforge serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("qforge serve did not answer")


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(tmp_path):
    pytest.importorskip("openai")
    train, serve, export = quickstart()[0]
    python = quickstart()[1]
    (tmp_path / "qforge").symlink_to(REPO / "qforge")  # the quickstart's data path, from a fresh folder
    train = re.sub(r"--max-steps \d+", "--max-steps 2", train)
    assert "--max-steps 2" in train, "the quickstart's train command gives no --max-steps to shorten"
    done = subprocess.run(qforge(train), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    out = Path(tmp_path, re.search(r"--output-dir (\S+)", train).group(1))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert done.stdout.lstrip().startswith("training qlora on smollm2: ")

    port = free_port()
    server = subprocess.Popen(qforge(serve) + ["--port", str(port)], cwd=tmp_path, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/v1/models", server)
        script = python.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        script = script.replace("messages=", "max_tokens=8, messages=")  # a short reply is enough here
        client = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env(), capture_output=True,
                                text=True, timeout=600)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip(), "the openai client printed no reply"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as reply:
            names = [m["id"] for m in json.load(reply)["data"]]
        adapter = re.search(r"--adapter (\w+)=", serve).group(1)
        assert adapter in names and f'model="{adapter}"' in python
    finally:
        server.terminate()
        server.wait(timeout=60)

    done = subprocess.run(qforge(export), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    gguf = Path(tmp_path, re.search(r"--out (\S+)", export).group(1))
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_readme_first_screen_and_links():
    """`make demo` and `make test` in the first screen; every relative link of README.md and docs/
    names a file that exists; the sections other pages and developers point at are there."""
    text = (REPO / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    for heading in ("## Quickstart", "## Limitations", "## qforge beside Unsloth, Axolotl, LLaMA-Factory and TRL"):
        assert f"\n{heading}\n" in text, heading
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
