"""Training across processes and machines: a process group (gloo on the CPU, NCCL on GPUs) and
FSDP2 sharding of the whole model, each rank holding 1/N of the 4-bit base, the adapters, their
gradients and optimiser state, and the embeddings (shard.py); gradients across ranks (grads.py);
whole tensors for checkpoints and back (consolidate.py); what each rank holds (held.py)."""
from .group import (DEFAULT_TIMEOUT_S, Group, RankLost, close_group, fault_point, init_group, launched_by_torchrun,
                    lost_contact)
from .shard import held_bytes, local_quantised_bytes, shard_base, shard_block, shard_root

__all__ = ["Group", "RankLost", "init_group", "close_group", "fault_point", "launched_by_torchrun", "lost_contact",
           "shard_base",
           "shard_block", "shard_root", "held_bytes",
           "local_quantised_bytes", "DEFAULT_TIMEOUT_S"]
