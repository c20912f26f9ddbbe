"""Counters, gauges and histograms rendered in Prometheus' text format (version 0.0.4), and the
per-model / per-API-key token ledger behind `GET /v1/usage`.

Small and dependency-free on purpose: a server with a few dozen series does not need
prometheus_client. Every method is thread-safe (the engine thread and the HTTP threads both write).
"""
from __future__ import annotations

import bisect
import math
import threading
import time

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets, labels=()):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            series = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                series[i] += 1
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> int:
        series = self._series.get(tuple(str(labels[n]) for n in self.label_names))
        return series[-1] if series else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            cumulative = 0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(self.label_names, key, inf)} {series[-1]}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {series[-1]}")
        return lines


class Metrics:
    """Every series the server exports. The engine sets the queue / batch / step series; the API the
    request, token and latency ones."""

    def __init__(self):
        self.requests = Counter("qforge_requests_total", "HTTP requests by route and status code.", ("route", "status"))
        self.prompt_tokens = Counter("qforge_prompt_tokens_total", "Prompt tokens processed, by model.", ("model",))
        self.completion_tokens = Counter("qforge_completion_tokens_total", "Tokens generated, by model.", ("model",))
        self.finished = Counter("qforge_generations_total", "Finished generations by finish reason.", ("reason",))
        self.queue_depth = Gauge("qforge_queue_depth", "Requests waiting to join the running batch.")
        self.running = Gauge("qforge_running_requests", "Requests in the running batch.")
        self.loaded_adapters = Gauge("qforge_loaded_adapters", "Adapters resident in memory.")
        self.adapter_loads = Counter("qforge_adapter_loads_total", "Adapter loads from disk (first loads and reloads).")
        self.adapter_evictions = Counter("qforge_adapter_evictions_total", "Adapters evicted by the LRU.")
        self.batch_size = Histogram("qforge_batch_size", "Rows per decode step.", BATCH_BUCKETS)
        self.step_seconds = Histogram("qforge_step_seconds", "Duration of one forward pass.", STEP_BUCKETS, ("phase",))
        self.latency = Histogram("qforge_request_latency_seconds", "Request latency, arrival to last token.",
                                 LATENCY_BUCKETS, ("route",))
        self.ttft = Histogram("qforge_time_to_first_token_seconds", "Arrival to first generated token.",
                              LATENCY_BUCKETS)
        self.queue_wait = Histogram("qforge_queue_wait_seconds", "Arrival to joining the batch.", LATENCY_BUCKETS)

    def all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> str:
        return "\n".join(line for metric in self.all() for line in metric.render()) + "\n"


class UsageLedger:
    """Prompt and completion tokens since start, per model (base or adapter) and per API key."""

    def __init__(self):
        self.since = int(time.time())
        self._lock = threading.Lock()
        self._by: dict[str, dict[str, dict[str, int]]] = {"model": {}, "api_key": {}}
        self._per_key: dict[str, dict[str, dict[str, int]]] = {}  # api key -> model -> counts

    def record(self, model: str, api_key: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            tables = ((self._by["model"], model), (self._by["api_key"], api_key),
                      (self._per_key.setdefault(api_key, {}), model))
            for table, key in tables:
                row = table.setdefault(key, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                             "total_tokens": 0})
                row["requests"] += 1
                row["prompt_tokens"] += prompt_tokens
                row["completion_tokens"] += completion_tokens
                row["total_tokens"] += prompt_tokens + completion_tokens

    def snapshot(self, api_key: str | None = None) -> dict:
        """Every key's usage; with `api_key`, only that key's (its models, its own row)."""
        with self._lock:
            if api_key is not None:
                own = self._by["api_key"].get(api_key)
                return {"object": "usage", "since": self.since,
                        "by_model": {k: dict(v) for k, v in self._per_key.get(api_key, {}).items()},
                        "by_api_key": {api_key: dict(own)} if own else {}}
            return {"object": "usage", "since": self.since,
                    "by_model": {k: dict(v) for k, v in self._by["model"].items()},
                    "by_api_key": {k: dict(v) for k, v in self._by["api_key"].items()}}
