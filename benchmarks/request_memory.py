"""Memory of the largest requests the server's default limits allow (issue 28), on a live server.

Builds the server as `qforge serve` does (qforge.app.build_server over a ServeConfig with the
default limits), then sends, one at a time, each request of the table below and samples the
process's resident memory (RSS, /proc/self/statm) every 5 ms while it runs: `peak_mib` is the
highest RSS seen, `added_mib` that minus the RSS just before the request. The requests:

  embed_1x8192    one input of the whole context (8,192 tokens): a chunk of its own
  embed_4x8192    4 such inputs (32,768 tokens: max_request_tokens): 4 chunks, one after another
  embed_16x2048   16 inputs of 2,048 (32,768 tokens): 8 chunks of 2 x 2,048
  echo_4096       /v1/completions echo + logprobs 5, max_tokens 0, a 4,096-token prompt
                  (max_scored_tokens: its full-vocabulary logits are kept)
  over_budget     48 x 2,048 embeddings: refused with a 400 before any forward

    PYTHONPATH=$PWD python benchmarks/request_memory.py [--only embed_1x8192,echo_4096]

Last line: name=value figures (peak and added MiB per request).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2 ** 20


class Sampler:
    """The highest RSS seen while the block runs (sampled every 5 ms by a thread)."""

    def __enter__(self):
        self.before, self.peak, self._stop = rss_mib(), rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def requests_table(vocab_token: int = 1000) -> dict[str, tuple[str, dict]]:
    ids = lambda n: [vocab_token + (i % 500) for i in range(n)]  # noqa: E731 - plain token ids, any text
    return {
        "embed_1x8192": ("/v1/embeddings", {"model": "smollm2", "input": [ids(8192)]}),
        "embed_4x8192": ("/v1/embeddings", {"model": "smollm2", "input": [ids(8192)] * 4}),
        "embed_16x2048": ("/v1/embeddings", {"model": "smollm2", "input": [ids(2048)] * 16}),
        "echo_4096": ("/v1/completions", {"model": "smollm2", "prompt": ids(4096), "echo": True, "logprobs": 5,
                                          "max_tokens": 0}),
        "over_budget": ("/v1/embeddings", {"model": "smollm2", "input": [ids(2048)] * 48}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated request names (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fastapi.testclient import TestClient

    from qforge.app import ServeConfig, build_server

    cfg = ServeConfig()
    app, engine = build_server(cfg)
    figures = []
    with TestClient(app) as client:
        print(f"defaults: max_request_tokens={cfg.max_request_tokens} max_scored_tokens={cfg.max_scored_tokens} "
              f"threads={__import__('torch').get_num_threads()} rss_after_load_mib={rss_mib():.0f}", flush=True)
        for name, (path, body) in requests_table().items():
            if args.only and name not in args.only.split(","):
                continue
            start = time.perf_counter()
            with Sampler() as s:
                r = client.post(path, json=body)
            seconds = time.perf_counter() - start
            print(f"{name:14s} status={r.status_code} peak_mib={s.peak:.0f} added_mib={s.peak - s.before:.0f} "
                  f"seconds={seconds:.1f}", flush=True)
            figures.append(f"{name}_peak_mib={s.peak:.0f} {name}_added_mib={s.peak - s.before:.0f}")
    engine.stop()
    print(" ".join(figures))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
