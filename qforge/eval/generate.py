"""Batched greedy generation for evaluation (the serving engine has its own, continuous one)."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_chat(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48,
                  batch_size: int = 16, compute_dtype: torch.dtype | None = None) -> list[str]:
    """Greedy replies to each conversation (a list of {role, content}), rendered with the chat
    template and a generation prompt; left-padded batches, stopping at EOS."""
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            device = next(model.parameters()).device  # the run's device: the model was placed there
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.autocast(device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype not in (None, torch.float32)):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id, use_cache=True)
            new = out[:, enc["input_ids"].shape[1]:]
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return replies
