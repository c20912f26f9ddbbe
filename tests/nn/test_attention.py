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


def test_float32_queries_under_autocast_take_the_matrix_path_at_sdpa_precision():
    """The float32 residual (the default for adapter training) hands attention float32 queries under
    bf16 autocast. The matrix path then rounds q, k, v to BF16 as SDPA's autocast does and keeps the
    scores and probabilities in float32: its output and gradients are as close to a float64
    reference (from the same BF16-rounded inputs) as SDPA's are."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 8, 4, 11, 16
    q, k, v = (torch.randn(b, n, t, d, requires_grad=True) for n in (h, hkv, hkv))
    module = types.SimpleNamespace(training=False, is_causal=True, num_key_value_groups=h // hkv)
    weight = torch.linspace(-1, 1, b * t * h * d).view(b, t, h, d)

    def run(fn):
        for x in (q, k, v):
            x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        (out.float() * weight).sum().backward()
        return out.detach().float(), [x.grad.clone() for x in (q, k, v)]

    calls = []
    math = attention._math_attention
    attention._math_attention = lambda *a, **kw: calls.append(kw) or math(*a, **kw)
    try:
        ours = run(lambda: attention.qforge_attention(module, q, k, v, None)[0])
    finally:
        attention._math_attention = math
    assert calls == [{"wide_scores": True}]
    theirs = run(lambda: sdpa_attention_forward(module, q, k, v, None)[0])
    exact = [x.detach().to(torch.bfloat16).double().requires_grad_() for x in (q, k, v)]
    out = math(*exact, None, d ** -0.5, 0.0, True)
    (out * weight.double()).sum().backward()
    err = lambda got, want: float((got.double() - want).abs().max())  # noqa: E731
    # the output is BF16 on both sides: one BF16 rounding of the same float32 value, or a neighbour
    assert err(ours[0], out.detach()) <= err(theirs[0], out.detach()) * 1.01 + 1e-6
    for name, g_ours, g_theirs, g_exact in zip("qkv", ours[1], theirs[1], (x.grad for x in exact)):
        # each gradient reaches float32 through one BF16 rounding on both sides (the inputs' cast)
        assert err(g_ours, g_exact) <= 2 * err(g_theirs, g_exact), name
