"""Packed rows train as the rows alone would: the trainer's loss (and its gradients) over a packed
batch equals the token-weighted mean of the losses of its examples run one by one (float32), through
the model as the trainer prepares it: 4-bit base with LoRA, gradient checkpointing, qforge's
attention, the one-pass and the chunked loss. transformers keeps the examples apart: it reads the
restarting position_ids (with no attention_mask and no cache) as packed sequences and builds a
block-diagonal causal mask."""
import pytest
import torch

from qforge.model import surgery
from qforge.nn import LoraSpec
from qforge.train.data import collate, pack_examples
from qforge.train.loss import causal_lm_loss
from tests.fixtures import quantize_all, tiny_llama


def trainer_model():
    model = quantize_all(tiny_llama(vocab=96, max_position_embeddings=128))
    surgery.add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    surgery.prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert surgery.use_qforge_attention(model)
    with torch.no_grad():  # B starts at zero: give the adapters a say in the result
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def examples():
    gen = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((9, 3), (14, 5), (6, 0), (11, 4), (5, 2)):
        ids = torch.randint(3, 96, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["one-pass", "chunked"])
def test_packed_loss_and_gradients_equal_the_rows_alone(chunk_rows):
    model, exs = trainer_model(), examples()
    rows = pack_examples(exs, max_seq_len=24)
    assert [len(r["input_ids"]) for r in rows] == [23, 22]  # 2 and 3 examples per row; one pad token
    batch = collate(rows, pad_id=0)
    packed = causal_lm_loss(model, batch, chunk_rows=chunk_rows)
    packed.backward()
    g_packed = adapter_grads(model)

    model.zero_grad(set_to_none=True)
    total, count, alone_loss = 0.0, 0, 0.0
    counts = [sum(1 for y in ex["labels"][1:] if y != -100) for ex in exs]
    for ex, n in zip(exs, counts):
        loss = causal_lm_loss(model, collate([ex], pad_id=0), chunk_rows=chunk_rows)
        (loss * n / sum(counts)).backward()  # the gradients of the token-weighted mean
        alone_loss += loss.item() * n / sum(counts)
    g_alone = adapter_grads(model)
    torch.testing.assert_close(packed.item(), alone_loss, rtol=1e-5, atol=1e-6)
    assert g_packed.keys() == g_alone.keys() and g_packed
    for name in g_alone:
        torch.testing.assert_close(g_packed[name], g_alone[name], rtol=1e-4, atol=1e-6)


def test_without_the_position_ids_the_rows_would_mix():
    """The check has teeth: the same packed batch as one plain sequence gives another loss."""
    model, exs = trainer_model(), examples()
    batch = collate(pack_examples(exs, max_seq_len=24), pad_id=0)
    plain = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    with torch.no_grad():
        assert abs(causal_lm_loss(model, batch).item() - causal_lm_loss(model, plain).item()) > 1e-3
