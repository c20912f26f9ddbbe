"""`qforge serve --jobs` flags become the server's config, and a server without jobs has no jobs routes at all."""
import argparse
from pathlib import Path

from fastapi.testclient import TestClient

from qforge.commands import serve
from qforge.app import ServeConfig, build_server, jobs_config


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_jobs_flags_become_the_service_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = jobs_config(serve.serve_config(parse("--jobs", "--data-dir", "state", "--memory-budget", "16GB",
                                                  "--max-file-mb", "2")))
    assert config.data_dir == Path("state") and config.memory_budget == 16 * 10 ** 9
    assert config.max_file_bytes == 2 * 2 ** 20 and config.base_model == "smollm2"
    (tmp_path / "models" / "tiny").mkdir(parents=True)  # a folder that exists is a path, not a Hub id
    config = jobs_config(ServeConfig(base="models/tiny"))
    assert config.base_model == str(tmp_path / "models" / "tiny") and config.memory_budget is None
    assert config.data_dir == Path.home() / ".qforge"


def test_without_jobs_the_server_has_no_jobs_routes(tiny_base):
    app, engine = build_server(ServeConfig(base=str(tiny_base), dtype="float32"))
    try:
        assert not hasattr(app.state, "jobs")
        with TestClient(app) as client:
            for path in ("/", "/v1/files", "/v1/fine_tuning/jobs", "/dashboard/app.js"):
                assert client.get(path).status_code == 404
            assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        engine.stop()


def test_the_flags_defaults_are_the_configs(monkeypatch):
    for name in ("QFORGE_API_KEY", "QFORGE_OPERATOR_KEY", "QFORGE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert serve.serve_config(parse()) == ServeConfig()
    cfg = serve.serve_config(parse("--no-worker", "--worker-threads", "3", "--disk-full-retries", "2", "--jobs"))
    assert (cfg.jobs, cfg.start_worker, cfg.worker_threads, cfg.disk_full_retries) == (True, False, 3, 2)


def test_serve_says_what_it_loaded_and_where_to_reach_it():
    from qforge.app import ServeConfig, describe_server
    cfg = ServeConfig(base="smollm2", quant_type="none", dtype="float32", port=8123, jobs=True,
                      api_keys=["sk-a", "sk-b"], adapter_root="/srv/adapters")
    text = describe_server(cfg, ["demo", "support"])
    assert text.splitlines()[0] == ("qforge serve: base 'smollm2' from smollm2 (as stored; float32 compute, "
                                    "device auto)")
    assert "adapters: demo, support (run-time loads under /srv/adapters)" in text
    assert "http://127.0.0.1:8123/v1" in text and "http://127.0.0.1:8123/health" in text
    assert "dashboard: http://127.0.0.1:8123/" in text and "keys: 2" in text
    plain = describe_server(ServeConfig(host="::1", port=9000), [])
    assert "(nf4 unless stored quantised;" in plain and "adapters: none yet" in plain
    assert "http://[::1]:9000/v1" in plain and "dashboard" not in plain and "keys: none" in plain
