"""The "qforge" attention (matrix products for short CPU training sequences, SDPA otherwise)
against transformers' SDPA attention on a small Llama: the same logits and gradients with padding
on either side and grouped-query heads, and generation with a KV cache unchanged."""
import pytest
import torch

from qforge.nn import attention
from tests.fixtures import tiny_llama


def tiny(seed=0):
    return tiny_llama(vocab=120, seed=seed, heads=8, max_position_embeddings=64)


def run(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_training_forward_and_backward_equal_sdpa(padding):
    attention.register()
    model = tiny()
    ids = torch.randint(0, 120, (3, 11))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, 7:] = 0
        mask[2, 4:] = 0
    elif padding == "left":
        mask[0, :5] = 0
        mask[1, :2] = 0
    calls = []
    math = attention._math_attention
    attention._math_attention = lambda *a, **k: calls.append(1) or math(*a, **k)
    try:
        got_logits, got = run(model, attention.NAME, ids, mask)
    finally:
        attention._math_attention = math
    assert len(calls) == 2, "the matrix path should serve both layers of a short training batch"
    want_logits, want = run(model, "sdpa", ids, mask)
    keep = mask.bool()  # logits at padded positions are not used by anything
    torch.testing.assert_close(got_logits[keep], want_logits[keep], rtol=1e-5, atol=1e-5)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_generation_with_a_cache_goes_to_sdpa_and_is_unchanged():
    attention.register()
    model = tiny(1).eval()
    ids = torch.randint(0, 120, (2, 6))
    model.set_attn_implementation("sdpa")
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.set_attn_implementation(attention.NAME)
    calls = []
    math = attention._math_attention
    attention._math_attention = lambda *a, **k: calls.append(1) or math(*a, **k)
    try:
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    finally:
        attention._math_attention = math
    assert torch.equal(got, want)
    assert not calls  # no autograd: SDPA throughout


def test_long_sequences_go_to_sdpa(monkeypatch):
    attention.register()
    monkeypatch.setattr(attention, "MATH_MAX_SCORES", 3 * 8 * 10 * 10)  # 3 rows x 8 heads x 10 x 10
    model = tiny()
    calls = []
    math = attention._math_attention
    monkeypatch.setattr(attention, "_math_attention", lambda *a, **k: calls.append(1) or math(*a, **k))
    for length, expect in ((10, 2), (11, 0)):
        calls.clear()
        ids = torch.randint(0, 120, (3, length))
        run(model, attention.NAME, ids, torch.ones_like(ids))
        assert len(calls) == expect, length


def test_non_causal_without_a_mask_attends_everywhere():
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))

    class Bidirectional(torch.nn.Module):
        is_causal = False
        training = True

    got, _ = attention.qforge_attention(Bidirectional(), q, k, v, None, is_causal=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_arguments_the_matrix_path_lacks_go_to_sdpa_and_other_models_are_not_switched(monkeypatch):
    from qforge.model.surgery import use_qforge_attention
    calls = []
    math = attention._math_attention
    monkeypatch.setattr(attention, "_math_attention", lambda *a, **k: calls.append(1) or math(*a, **k))
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    module = torch.nn.Module()
    with pytest.raises(Exception):  # transformers' SDPA function refuses a softcap: it was not dropped
        attention.qforge_attention(module, q, k, v, None, softcap=30.0)
    assert not calls
    model = tiny()
    model.set_attn_implementation("eager")
    assert use_qforge_attention(model) is False and model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert use_qforge_attention(model) is True and model.config._attn_implementation == attention.NAME
