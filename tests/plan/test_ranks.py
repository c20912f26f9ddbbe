"""The per-rank memory model (qforge.plan.per_rank): arithmetic from the architectures' own numbers.

What is checked here is counting, not calibration: one process equals the whole-run plan; each
sharded component of an N-process run is the whole one / N up to FSDP's padding; the 4-bit base
of a rank is the 4-bit bytes of the architecture's linear layers / N; activations follow this
rank's rows of the batch; the buffers are the one-process buffers or the vocabulary group's
gather, plus FSDP's blocks; with
--offload-base the device keeps two blocks of base. The seed's rows (405B on four 80 GB cards,
Mixtral 8x22B on one 141 GB card with the base offloaded) are computed from that same model.
"""
import dataclasses
import math

import pytest

from qforge import cli
from qforge.plan import (CPU_BF16, CUDA_BF16, GATHER_COPIES, GATHERED_BLOCKS, GB, OFFLOAD_RESIDENT_BLOCKS, RANK_KEYS,
                         as_arch, vocab_group_bytes, offload_host_bytes, parameter_count, per_rank, plan_run)

SHARDED = ("base", "experts", "embeddings", "adapters", "gradients", "optimizer")
RUN = dict(seq_len=512, batch_size=4, rank=16, residual_bytes=4)  # qforge train's defaults (TrainConfig)


def llama_linear_params(name: str) -> tuple[int, int]:
    """(weights of the decoder linears, number of those tensors) of a dense Llama-shaped arch, from
    its config numbers alone: per layer q, k, v, o and the MLP's gate, up, down."""
    a = as_arch(name)
    h, q, kv, i = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return a.num_layers * per_layer, 7 * a.num_layers


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
@pytest.mark.parametrize("name", ["smollm2", "llama-3.1-8b", "mixtral-8x22b", "gemma-2-9b"])
def test_one_process_is_the_whole_plan(name, method):
    ranks = per_rank(name, method, world=1, **RUN)
    plan = plan_run(name, method, chunked_loss=True, **RUN)
    assert set(ranks) == set(RANK_KEYS) | {"total"}
    assert ranks["total"] == sum(ranks[k] for k in RANK_KEYS) == plan.total
    assert ranks["activations"] == plan.activations and ranks["buffers"] == plan.temporary


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("name", ["smollm2", "llama-3.1-8b", "mixtral-8x22b"])
def test_every_sharded_component_falls_as_one_over_n(name, world):
    one, many = per_rank(name, world=1, **RUN), per_rank(name, world=world, **RUN)
    tensors = 40 * as_arch(name).num_layers + 10  # generous count of tensors: each pads by under a block
    for key in SHARDED:
        if key in ("adapters", "gradients", "optimizer") and (name, world) == ("smollm2", 8):
            continue  # some chunks would cut the optimiser's blocks: see the next test
        # 4-bit tensors keep their second-level constants whole: 4 bytes per 64 * 256 weights of 0.516 bytes
        whole = one[key] * 4 / (64 * 256) / 0.516 if key in ("base", "experts") else 0
        assert one[key] / world <= many[key] <= one[key] / world + whole + tensors * 2048, key


def test_an_adapter_whose_chunks_cut_the_optimisers_blocks_stays_whole():
    # SmolLM2 (hidden 576, kv 192, intermediate 1536) at r=16 over 8 ranks: FSDP's chunk is ceil(rows / 8)
    # rows. A [16, in]: 2 rows; 2 * 576 = 1152 values is 4.5 blocks of 256, so A of q, k, v, o, gate, up
    # stays whole (9216 values), A of down (2 * 1536 = 12 blocks) is cut. B [out, 16]: out / 8 rows of 16;
    # q, o and down (out 576: 1152 values) stay whole, gate and up (out 1536: 3072) are cut, and k and v
    # (3072 values, under the 8-bit state's 4096) are cut anywhere: qforge.dist.shard.keeps_blocks.
    a = as_arch("smollm2")
    per_layer = 6 * 9216 + 3072 + (3 * 9216 + 2 * 384 + 2 * 3072)
    assert per_rank(a, world=8, **RUN)["adapters"] == 4 * a.num_layers * per_layer


def test_405b_base_is_the_4bit_bytes_of_its_linears_over_n():
    linears, count = llama_linear_params("llama-3.1-405b")
    codes = linears // 2
    first_level = math.ceil(linears / 64)  # one uint8 absmax per 64 weights (double quantisation)
    for world in (1, 2, 4, 8):
        base = per_rank("llama-3.1-405b", world=world, **RUN)["base"]
        expected = (codes + first_level) / world  # plus the whole second-level constants, under 0.02 bits a weight
        assert expected <= base <= expected + linears * 0.02 / 8 + count * 4, world
    assert 0.51 * linears / 4 < per_rank("llama-3.1-405b", world=4, **RUN)["base"] < 0.52 * linears / 4


def test_activations_are_this_ranks_rows():
    a = as_arch("llama-3.1-70b")
    one_row = per_rank(a, world=1, seq_len=512, batch_size=1)["activations"]
    assert per_rank(a, world=4, seq_len=512, batch_size=4)["activations"] == one_row
    assert per_rank(a, world=4, seq_len=512, batch_size=2)["activations"] == one_row  # a rank runs >= 1 row
    assert per_rank(a, world=2, seq_len=512, batch_size=4)["activations"] == per_rank(
        a, world=1, seq_len=512, batch_size=2)["activations"]


def test_fsdp_buffers_are_the_vocabulary_gather_blocks_root_and_reduce_scatter():
    a = as_arch("llama-3.1-8b")
    h, q, kv, i, r = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size, 16
    layer_linears = h * q + 2 * h * kv + q * h + 3 * h * i
    block_4bit = layer_linears / 2 + layer_linears / 64  # codes and first-level absmax, whole
    block_adapters = 4 * r * (2 * (h + q) + 2 * (h + kv) + 3 * (h + i))  # float32 A and B of the 7 linears
    root = 4 * h  # the final norm, float32 (the vocabulary matrices are groups of their own)
    vocab = a.vocab_size * h * 2  # one BF16 vocabulary matrix (untied: embeddings and head the same size)
    two = per_rank(a, world=2, **RUN)
    # the same rows per rank (2 of 4 vs 4 of 4 would differ): compare against world=1 at batch 2
    # and the one-pass loss: under FSDP the output layer is no plain nn.Linear for the chunked loss
    half = per_rank(a, world=1, seq_len=512, batch_size=2, rank=16, residual_bytes=4, chunked_loss=False)
    # the larger of: the vocabulary group gathered twice (copy-out) beside the context, and the loss's
    # transient beside the head's group gathered once
    gathered = max(GATHER_COPIES * vocab + CUDA_BF16.context_bytes, half["buffers"] + vocab)
    expected = gathered + GATHERED_BLOCKS * (block_4bit + block_adapters) + root + block_adapters
    assert expected <= two["buffers"] <= expected + 2 * layer_linears * 0.02 / 8 + 4 * h * 16
    assert per_rank(a, world=2, chunked_loss=False, **RUN) == two  # several processes: one pass whatever asked
    assert per_rank(a, world=1, **RUN)["buffers"] > per_rank(a, world=1, seq_len=512, batch_size=2, rank=16, residual_bytes=4)["buffers"]


def test_a_float32_run_holds_and_gathers_its_vocabulary_in_float32():
    """The embedded model trained as benchmarks/scale.py does (float32 compute and residual, tied): its
    108 MiB float32 embedding is held sharded and gathered twice at N=2 (scale.py's probe: +217 MiB)."""
    a = as_arch({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True})
    c = dataclasses.replace(CPU_BF16, compute_bytes=4)
    embed = 49152 * 576 * 4
    assert vocab_group_bytes(a, "qlora", 4, 4) == (embed, 0)
    one, two = (per_rank(a, world=n, seq_len=32, batch_size=4, rank=16, constants=c, residual_bytes=4) for n in (1, 2))
    assert 0 <= one["embeddings"] - embed < 30 * 4 * 576 * 3  # plus the norms, float32
    assert two["buffers"] >= GATHER_COPIES * embed + c.context_bytes


def test_offload_keeps_two_blocks_on_the_device_and_the_rest_on_the_host():
    a = as_arch("mixtral-8x22b")
    on, off = per_rank(a, **RUN), per_rank(a, offload_base=True, **RUN)
    four_bit = on["base"] + on["experts"]
    assert off["base"] == math.ceil(four_bit * OFFLOAD_RESIDENT_BLOCKS / a.num_layers) and off["experts"] == 0
    assert offload_host_bytes(a) == four_bit
    assert off["total"] == on["total"] - four_bit + off["base"]
    for key in ("adapters", "gradients", "optimizer", "embeddings", "activations", "buffers"):
        assert off[key] == on[key], key
    with pytest.raises(ValueError, match="method must be qlora"):
        per_rank(a, "lora", offload_base=True)


def test_offload_with_fsdp_shards_the_host_side_too():
    a = as_arch("llama-3.1-70b")
    assert offload_host_bytes(a, world=4) == per_rank(a, world=4, **RUN)["base"]


def test_seed_row_405b_fits_four_80gb_cards_at_train_defaults():
    ranks = per_rank("llama-3.1-405b", world=4, **RUN)
    assert ranks["total"] <= 80 * GB
    assert per_rank("llama-3.1-405b", world=2, **RUN)["total"] > 80 * GB  # the base alone is 104 GB per card
    linears, _ = llama_linear_params("llama-3.1-405b")
    assert ranks["base"] > 0.5 * linears / 2 / 4 * 1.0  # it is the base, not an allowance, that fills the card


def test_seed_row_mixtral_8x22b_on_one_141gb_card_with_the_base_offloaded():
    a = as_arch("mixtral-8x22b")
    off = per_rank(a, offload_base=True, **RUN)
    assert off["total"] <= 141 * GB
    # the host holds the 4-bit model: about 4.127 bits a weight of everything but embeddings, head, norms, router
    quantised = parameter_count(a) - 2 * a.vocab_size * a.hidden_size
    assert 0.99 * quantised * 4.127 / 8 < offload_host_bytes(a) < 1.01 * quantised * 4.127 / 8


def test_plan_per_gpu_total_is_the_per_rank_total():
    for world in (1, 2, 8):
        plan = plan_run("llama-3.1-70b", "qlora", num_gpus=world, chunked_loss=True, **RUN)
        assert plan.per_gpu_total == per_rank("llama-3.1-70b", world=world, **RUN)["total"]


def test_cpu_constants_pass_through():
    assert per_rank("smollm2", world=2, constants=CPU_BF16, **RUN)["total"] < per_rank("smollm2", world=2, **RUN)["total"]


def test_bad_world():
    with pytest.raises(ValueError, match="world must be a positive integer"):
        per_rank("smollm2", world=0)


def test_cli_405b_on_four_80gb_cards(capsys):
    argv = ["plan", "--model", "llama-3.1-405b", "--gpu", "80GB", "--num-gpus", "4", "--method", "qlora"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "one GPU of 4 (FSDP, everything sharded)" in out
    total = next(line for line in out.splitlines() if line.startswith("total per GPU"))
    want = per_rank("llama-3.1-405b", world=4, **RUN)["total"]
    assert float(total.split()[-2]) * GB == pytest.approx(want, abs=0.01 * GB)
    assert next(line for line in out.splitlines() if line.startswith("fits 80 GB each")).split()[-1] == "yes"
    assert "assumptions not yet measured on a GPU" in out


def test_cli_mixtral_offload(capsys):
    assert cli.main(["plan", "--model", "mixtral-8x22b", "--gpu", "141GB", "--offload-base"]) == 0
    out = capsys.readouterr().out
    table = out.split("--offload-base:")[1]
    assert next(line for line in table.splitlines() if line.startswith("fits 141 GB")).split() == ["fits", "141", "GB",
                                                                                                     "yes"]
    host = next(line for line in table.splitlines() if line.startswith("pinned host"))
    assert float(host.split()[-2]) * GB == pytest.approx(offload_host_bytes("mixtral-8x22b"), abs=0.01 * GB)
    assert cli.main(["plan", "--model", "mixtral-8x22b", "--gpu", "141GB", "--offload-base", "--method", "lora"]) == 2
    assert "--offload-base" in capsys.readouterr().err
