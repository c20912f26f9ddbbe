"""The work one request may ask of the server, checked after tokenising and before any forward.

  max_request_tokens  embeddings: the inputs' tokens summed; completions and chat: every choice's
                      prompt plus its max_tokens (prompts x n), i.e. the KV cache it may fill.
  max_scored_tokens   echo with log-probs keeps a full-vocabulary row of logits per prompt token
                      (SmolLM2: 49,152 float32 values, 192 KiB a token): each prompt scored this
                      way has at most this many tokens.
  max_json_depth      nesting of a request's JSON values (a schema, tool arguments): deeper is a
                      400 before anything walks it recursively.

Embeddings run in chunks of at most `embed_chunk_tokens` padded tokens (one input longer than that
runs alone, up to the context), so memory follows the chunk, not the request. A request over a
limit is a 400 naming the limit, its value and the request's count; nothing was computed.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from .errors import APIError

DEFAULT_MAX_REQUEST_TOKENS = 32768
DEFAULT_MAX_SCORED_TOKENS = 4096
DEFAULT_EMBED_CHUNK_TOKENS = 4096
MAX_JSON_DEPTH = 64


@dataclass
class RequestLimits:
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_scored_tokens: int = DEFAULT_MAX_SCORED_TOKENS
    embed_chunk_tokens: int = DEFAULT_EMBED_CHUNK_TOKENS
    max_json_depth: int = MAX_JSON_DEPTH

    def check_tokens(self, count: int, what: str, param: str) -> None:
        """400 when `count` tokens (what they are, in words) pass max_request_tokens."""
        if count > self.max_request_tokens:
            raise APIError(400, f"{param}: this request asks for {count} tokens ({what}) but the server's "
                           f"max_request_tokens is {self.max_request_tokens}; split it into smaller requests",
                           param=param, code="request_too_large")

    def check_generation(self, prompt_lengths: list[int], max_tokens: list[int], n: int) -> None:
        """Completions and chat: sum over prompts of (prompt + max_tokens) x n."""
        total = sum(p + m for p, m in zip(prompt_lengths, max_tokens)) * n
        self.check_tokens(total, "prompt tokens + max_tokens, for every prompt and each of n choices", "max_tokens")

    def check_scored(self, prompt_lengths: list[int]) -> None:
        """Echo with log-probs: each prompt scored at most max_scored_tokens."""
        longest = max(prompt_lengths, default=0)
        if longest > self.max_scored_tokens:
            raise APIError(400, f"prompt: echo with logprobs scores every prompt token; a prompt here has {longest} "
                           f"tokens but the server's max_scored_tokens is {self.max_scored_tokens}",
                           param="prompt", code="request_too_large")


def embedding_chunks(prompts: list[list[int]], chunk_tokens: int) -> list[list[list[int]]]:
    """`prompts` in order, cut into runs whose padded size (rows x longest row) is at most
    `chunk_tokens`; a prompt longer than that is a chunk of its own."""
    chunks, current, width = [], [], 0
    for p in prompts:
        grown = max(width, len(p))
        if current and grown * (len(current) + 1) > chunk_tokens:
            chunks.append(current)
            current, grown = [], len(p)
        current.append(p)
        width = grown
    if current:
        chunks.append(current)
    return chunks


def json_depth_over(value, limit: int) -> bool:
    """Whether `value` (dicts, lists and pydantic models: a message's tool calls) nests deeper than
    `limit`, walked without recursion."""
    nested = (dict, list, tuple, BaseModel)
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = dict(item).values() if isinstance(item, (dict, BaseModel)) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, nested))
    return False
