"""Log-probabilities of tokens, and OpenAI's two response shapes for them.

The engine records, for every token it samples for a request that asked (and for every prompt token
when the request wants the prompt's own log-probs, `echo`), one `TokenLogprob`: the token's
log-probability under the model's raw distribution (log-softmax of the float32 logits: no temperature,
top_p or grammar mask applied) and the `k` most likely alternatives. The API turns them into

  legacy completions: {"tokens": [str], "token_logprobs": [float|None], "top_logprobs": [{str: float}|None],
                       "text_offset": [int]}  (the first prompt token has no log-prob: None)
  chat completions:   {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's text is its own bytes decoded as UTF-8; a token that holds part of a multi-byte character
shows the replacement character, and its `bytes` field carries the real bytes (as OpenAI does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


def step_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The log-prob of `token` and the top k, from one row of float32 logits (V,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = _top(logp, k)
    return TokenLogprob(token, float(logp[token]), top)


PROMPT_CHUNK = 256  # prompt positions scored at once: memory ~ PROMPT_CHUNK x vocab float32, whatever the prompt


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Log-probs of a prompt's tokens from its logits (P, V) at the same P positions: token i is
    scored by position i - 1; the first token has none. Holds all P x V at once (the reference
    for chunked_prompt_logprobs)."""
    return [None] + _score(logits[:-1], ids[1:], k)


def chunked_prompt_logprobs(hidden: torch.Tensor, ids: list[int], k: int,
                            head: Callable[[torch.Tensor], torch.Tensor],
                            chunk: int = PROMPT_CHUNK) -> list[TokenLogprob | None]:
    """prompt_logprobs of a prompt from its final hidden states (P, H) instead of its logits:
    `head` maps (C, H) hidden states to (C, V) logits, called on `chunk` positions at a time, so
    at most chunk x V logits (and their log-softmax) exist at once, not P x V."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, chunk):
        stop = min(start + chunk, len(ids) - 1)       # positions start..stop-1 score ids[start+1..stop]
        out += _score(head(hidden[start:stop]), ids[start + 1:stop + 1], k)
    return out


def output_logit_transform(config, logits: torch.Tensor) -> torch.Tensor:
    """What a family's forward does to lm_head's output: Cohere multiplies by `logit_scale`,
    Granite divides by `logits_scaling`, Gemma 2/3 soft-cap with `final_logit_softcapping`."""
    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "logit_scale", None) is not None:
        logits = logits * text.logit_scale
    if getattr(text, "logits_scaling", None) is not None:
        logits = logits / text.logits_scaling
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _score(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of logits (C, V): row i scores targets[i]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    chosen = logp.gather(1, torch.tensor(targets, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    if k <= 0:
        return [TokenLogprob(tok, lp, []) for tok, lp in zip(targets, chosen)]
    values, index = logp.topk(k, dim=-1)  # (C, k): one call (and one device sync) per chunk, not per row
    tops = [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
    return [TokenLogprob(tok, lp, top) for tok, lp, top in zip(targets, chosen, tops)]


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, index = logp.topk(k)
    return list(zip(index.tolist(), values.tolist()))


# ---- token text ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for: byte-level BPE (GPT-2, Llama 3, SmolLM) or SentencePiece
    (with its <0xNN> byte tokens); special tokens as their names."""
    return _token_bytes(tokenizer, token)


def _token_bytes(tokenizer, token: int) -> bytes:
    cache = _cache_for(tokenizer)
    got = cache.get(token)
    if got is None:
        piece = tokenizer.convert_ids_to_tokens(int(token))
        if piece is None:
            got = b""
        elif token in set(tokenizer.all_special_ids):
            got = piece.encode()
        elif (m := _BYTE_TOKEN.match(piece)):
            got = bytes([int(m.group(1), 16)])
        else:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                got = bytes(decoder[c] for c in piece)
            else:
                got = piece.replace("\u2581", " ").encode()
        cache[token] = got
    return got


_CACHES: dict[int, dict[int, bytes]] = {}


def _cache_for(tokenizer) -> dict[int, bytes]:
    return _CACHES.setdefault(id(tokenizer), {})


def token_text(tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def trim_to_text(tokenizer, entries: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The leading entries whose tokens make up `text` (a stop string cuts an answer inside or after
    a token: the tokens past the cut are not part of it)."""
    length, out = 0, []
    for entry in entries:
        if length >= len(text):
            break
        out.append(entry)
        length += len(token_text(tokenizer, entry.token))
    return out


# ---- response shapes -----------------------------------------------------------------------------
def completion_logprobs(tokenizer, entries: list[TokenLogprob | None], tokens: list[int],
                        start_offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object for `tokens` (entries[i] scores tokens[i]; None: unscored).
    `text_offset` counts characters from `start_offset`, token by token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for tok, entry in zip(tokens, entries):
        text = token_text(tokenizer, tok)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(entry.logprob)
            top: dict[str, float] = {}
            for t, lp in entry.top:
                top.setdefault(token_text(tokenizer, t), lp)
            out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [...], "refusal": None}."""
    return {"content": [_chat_entry(tokenizer, e) for e in entries], "refusal": None}


def _chat_entry(tokenizer, entry: TokenLogprob) -> dict:
    item = _chat_token(tokenizer, entry.token, entry.logprob)
    item["top_logprobs"] = [_chat_token(tokenizer, t, lp) for t, lp in entry.top]
    return item


def _chat_token(tokenizer, token: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
