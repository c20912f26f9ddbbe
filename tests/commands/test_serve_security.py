"""The serve command's start-up checks: no open server on a non-loopback address, keys from the
environment, well-formed --adapter flags. None of these load a model."""
import argparse
from pathlib import Path

import pytest

from qforge.cli import main
from qforge.commands import serve
from qforge import app


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_key(host):
    app.check_bind(host, [], insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_non_loopback_without_a_key_is_refused_unless_insecure(host):
    with pytest.raises(ValueError, match="--api-key"):
        app.check_bind(host, [], insecure=False)
    app.check_bind(host, ["k"], insecure=False)
    app.check_bind(host, [], insecure=True)


def test_the_command_refuses_before_loading_anything(capsys, monkeypatch):
    monkeypatch.delenv("QFORGE_API_KEY", raising=False)
    monkeypatch.setattr(app, "build_server", lambda *a: pytest.fail("must not load the model"))
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to serve on non-loopback address '0.0.0.0'" in capsys.readouterr().err
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_keys_come_from_flags_and_the_environment(monkeypatch):
    monkeypatch.setenv("QFORGE_API_KEY", "env1, env2")
    assert serve.api_keys(parse("--api-key", "flag")) == ["flag", "env1", "env2"]
    monkeypatch.delenv("QFORGE_API_KEY")
    assert serve.api_keys(parse()) == []


def test_flags_and_names():
    args = parse("--base", "/models/llama-folder", "--adapter", "x=/a/b", "--adapter", "y=c")
    cfg = serve.serve_config(args)
    assert cfg.adapters[0] == ("x", Path("/a/b")) and cfg.served_name() == "llama-folder"
    assert serve.serve_config(parse()).served_name() == "smollm2"
    assert (args.max_batch, args.max_queue, args.max_loaded_adapters, args.port) == (32, 256, 16, 8000)
