"""Serving: one shared 4-bit base, many LoRA adapters per batch, behind an OpenAI-compatible API.

engine.py (continuous batching, KV cache), lora_slots.py (preallocated adapter slots: several adapters
in one batch), registry.py (named adapters, LRU of resident ones, adapter-root checks), api/ (the FastAPI
app: schemas, streaming, routes), metrics.py (Prometheus text, usage).
FastAPI is imported only by `qforge.serve.api` (and qforge.app, which builds a server with its jobs service).
"""
from .engine import Engine, Event, QueueFull, Request, RequestError, SamplingParams
from .metrics import Metrics, UsageLedger
from .registry import AdapterError, AdapterRegistry, detach_adapter

__all__ = ["Engine", "Event", "QueueFull", "Request", "RequestError", "SamplingParams", "Metrics", "UsageLedger",
           "AdapterRegistry", "AdapterError", "detach_adapter"]
