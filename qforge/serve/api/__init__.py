"""The OpenAI-compatible HTTP surface over an Engine and an AdapterRegistry.

    schemas.py    request bodies (pydantic, strict)
    streaming.py  one generation: engine events onto the event loop, answered whole or as SSE
    state.py      what the routes share: engine, registry, keys, adapter owners; request metrics
    routes.py     create_app and the routes
    errors.py     OpenAI's error shape and the exception handlers

Generation options beyond sampling: log-probs (`logprobs`, `echo`, `top_logprobs`: logprobs.py),
`response_format` json_object / json_schema and `tools` / `tool_choice` (structured.py, tools.py).
With API keys, every route but /health needs `Authorization: Bearer KEY`; keys have roles
(qforge.serve.auth): /metrics, every key's usage and the server-wide adapters are the operator's, a
user key sees and manages only its own. Errors are OpenAI's shape: {"error": {message, type, param, code}}.
"""
from .errors import APIError, ClientGone, error_body, internal_error
from .routes import DEFAULT_CHAT_MAX_TOKENS, MAX_BODY_BYTES, adapter_chat_template, create_app
from .state import AppState

__all__ = ["APIError", "ClientGone", "error_body", "internal_error", "DEFAULT_CHAT_MAX_TOKENS", "MAX_BODY_BYTES",
           "adapter_chat_template", "create_app", "AppState"]
