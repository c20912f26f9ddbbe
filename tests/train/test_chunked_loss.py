"""The chunked cross-entropy: the same loss and gradients as the one-pass head + loss (float32), and a
smaller peak of allocated memory on a long row (torch's CPU memory profiler)."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qforge.train.loss import causal_lm_loss, chunk_rows_for, chunked_cross_entropy
from tests.fixtures import tiny_llama
from tests.numerics import grad_atol

from .test_loss import batch, grads, tiny


@pytest.mark.parametrize("scale, cap, bias", [(1.0, None, False), (0.125, None, True), (1.0, 3.0, False),
                                              (2.0, 3.0, True)])
def test_loss_and_gradients_equal_the_one_pass_head(scale, cap, bias):
    """Hidden-state, weight and bias gradients too, with Granite/Cohere-style scales and Gemma's cap."""
    gen = torch.Generator().manual_seed(0)
    n, h, v = 45, 16, 70
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    b = torch.randn(v, generator=gen, requires_grad=True) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    params = [hidden, weight] + ([b] if bias else [])

    ours = chunked_cross_entropy(hidden, weight, b, y, chunk_rows=8, scale=scale, cap=cap)
    g_ours = torch.autograd.grad(ours * 1.7, params)
    z = F.linear(hidden, weight, b) * scale
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    ref = F.cross_entropy(z, y)
    g_ref = torch.autograd.grad(ref * 1.7, params)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_under_no_grad():
    hidden, weight = torch.randn(20, 8), torch.randn(30, 8)
    y = torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, None, y, chunk_rows=3)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), y))


def test_model_loss_equals_the_one_pass_loss_with_a_trained_tied_head():
    """Through causal_lm_loss on a tiny Llama: LoRA gradients, and a trained head tied to the
    embedding (full fine-tuning), equal to the one-pass path's."""
    model = tiny_llama(vocab=300, tied=True)
    b = batch()
    n = int((b["labels"][:, 1:] != -100).sum())
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    chunked = causal_lm_loss(model, b, chunk_rows=4)
    assert seen == [(1, 300)]  # the head ran once, on the one probe row; the rest went by chunks
    chunked.backward()
    g_chunked = grads(model)
    model.zero_grad()
    one_pass = causal_lm_loss(model, b, chunk_rows=n)
    assert seen[-1] == (n, 300)
    one_pass.backward()
    g_one = grads(model)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-6, atol=1e-6)
    assert g_chunked.keys() == g_one.keys() and "model.embed_tokens.weight" in g_chunked
    for name in g_one:
        torch.testing.assert_close(g_chunked[name], g_one[name], rtol=1e-5, atol=1e-6)


def test_qlora_model_loss_equals_the_plain_loss():
    model, b = tiny(), batch()
    ours = causal_lm_loss(model, b, chunk_rows=5)
    ours.backward()
    g_ours = grads(model)
    model.zero_grad()
    theirs = model(**b, use_cache=False).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    tokens = b["input_ids"].numel()  # each LoRA gradient sums over every position's contribution
    for name, g in grads(model).items():
        torch.testing.assert_close(g_ours[name], g, rtol=1e-5, atol=grad_atol(g, tokens))


def test_an_unknown_logit_transform_takes_the_one_pass_path():
    """A model that scales its logits in a way the config does not say: found by the probe row,
    warned about, and the loss is still right."""
    model, b = tiny(), batch()
    original = model.lm_head.forward
    model.lm_head.forward = lambda x: original(x) * 3.0
    with pytest.warns(UserWarning, match="unknown logit transform"):
        loss = causal_lm_loss(model, b, chunk_rows=5)
    torch.testing.assert_close(loss, model(**b, use_cache=False).loss)
    assert model._qforge_chunked_loss is False


def peak_allocated(fn) -> int:
    """Peak bytes allocated while fn() runs, from the profiler's allocation events (+size, -size)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_chunked_peak_memory_is_below_the_one_pass_peak_on_a_long_row():
    torch.manual_seed(0)
    n, h, v = 2048, 32, 4096  # one-pass float32 logits: 32 MiB; a chunk of 256 rows: 4 MiB
    weight = torch.randn(v, h) * 0.1
    hidden = torch.randn(n, h, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def one_pass():
        F.cross_entropy(F.linear(hidden, weight), y).backward()

    def chunked():
        chunked_cross_entropy(hidden, weight, None, y, chunk_rows=256).backward()

    logits = n * v * 4
    one, ours = peak_allocated(one_pass), peak_allocated(chunked)
    assert one >= 2 * logits  # the logits and the log-softmax (or its gradient) at once
    assert ours < logits / 2 < one / 4


def test_default_chunk_size():
    assert chunk_rows_for(49152) == 170 and chunk_rows_for(128256) == 65 and chunk_rows_for(10**9) == 1


def test_the_planner_knows_the_loss_chunk_and_the_attention_limit():
    """qforge.plan cannot import the trainer or the layers: its copies of their constants agree."""
    from qforge.nn import attention
    from qforge.plan import memory
    from qforge.train import loss
    assert memory.LOGITS_CHUNK_BYTES == loss.LOGITS_CHUNK_BYTES
    assert memory.MATRIX_ATTENTION_SCORES == attention.MATH_MAX_SCORES
    arch = memory.as_arch("smollm2")
    assert memory.loss_rows(arch, 10**6) == chunk_rows_for(arch.vocab_size) and memory.loss_rows(arch, 7) == 7
