"""causal_lm_loss: logits only where a target is, the same loss and gradients as transformers'."""
import torch

from qforge.model.surgery import add_adapter
from qforge.nn import LoraSpec
from qforge.train.loss import causal_lm_loss
from tests.fixtures import quantize_all, tiny_llama
from tests.numerics import grad_atol


def tiny(seed=0):
    model = quantize_all(tiny_llama(vocab=300, tied=False, seed=seed))
    add_adapter(model, "default", LoraSpec(r=4, dropout=0.0, dtype=torch.float32))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 20), generator=gen)
    labels = ids.clone()
    labels[0, :12] = -100           # a prompt
    labels[1, 15:] = -100           # padding at the end
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels[2, :] = -100
    labels[2, 5] = ids[2, 5]        # a single target in a row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_equal_transformers():
    model, b = tiny(), batch()
    ours = causal_lm_loss(model, b)
    ours.backward()
    g_ours = grads(model)
    model.zero_grad()
    theirs = model(**b, use_cache=False).loss
    theirs.backward()
    g_theirs = grads(model)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 0
    tokens = b["input_ids"].numel()  # each LoRA gradient sums over every position's contribution
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-5, atol=grad_atol(g_theirs[name], tokens))
    assert not model.lm_head._forward_pre_hooks  # the hook is gone


def test_head_sees_only_target_rows():
    model, b = tiny(), batch()
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    causal_lm_loss(model, b)
    assert seen == [torch.Size([int((b["labels"][:, 1:] != -100).sum()), 300])]


def test_no_target_falls_back_to_the_plain_loss():
    model, b = tiny(), batch()
    b["labels"][:] = -100
    assert torch.isnan(causal_lm_loss(model, b))  # transformers' mean over nothing
