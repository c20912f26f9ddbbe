"""The processes of one run and the few collectives the training loop needs.

`Group()` is the single process: every collective is the identity, so the loop has no branches
for it. `init_group()` joins the process group torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT): gloo on the CPU, NCCL when GPUs are present.

Every collective has a bounded wait (QFORGE_DIST_TIMEOUT seconds, default 300): a rank that dies or
stops answering turns into an error in the others, not a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch

DEFAULT_TIMEOUT_S = 300.0
GRAD_BUCKET = 1 << 25  # elements per all-reduce of gradients (128 MiB in float32)


class RankLost(RuntimeError):
    """A collective failed: another rank died, was killed, or did not answer in time."""


@dataclass
class Group:
    """This process's place in the run. The default is a run of one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def rows(self, batch: list[int]) -> tuple[list[int], float]:
        """This rank's rows of a global micro-batch (every world-th row from its rank), and the
        weight its loss carries: 1, or 0 when the batch has fewer rows than ranks. A rank without
        rows still runs the first row at weight 0, so that every rank joins the same collectives."""
        mine = batch[self.rank::self.world]
        return (mine, 1.0) if mine else (batch[:1], 0.0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks, in float64."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective(torch.distributed.all_reduce, t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (in float32, in buckets): for
        the parameters kept whole on every rank (FSDP reduce-scatters the sharded ones itself).

        The loop weights every rank's loss by its share of the global batch's tokens, so the sum is
        the gradient of the single-process loss of the whole global batch."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]  # the same set on every rank: same model, same code
        bucket: list[torch.Tensor] = []
        for g in grads:
            bucket.append(g)
            if sum(b.numel() for b in bucket) >= GRAD_BUCKET:
                self._sum_bucket(bucket)
                bucket = []
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self._collective(torch.distributed.all_reduce, flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def copy_from_rank0(self, params: list[torch.Tensor]) -> None:
        """Overwrite `params` with rank 0's values, so that every replica starts the same. Plain
        tensors: call it before sharding (qforge.train.run.shard_for_group does)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                self._collective(torch.distributed.broadcast, p.data, src=0)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (pickled; for small things such as a checkpoint's adapter)."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on some rank (e.g. Ctrl-C reached only some of them)."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        box = [None] * self.world if self.is_main else None
        self._collective(torch.distributed.gather_object, obj, box, dst=0)
        return box

    def barrier(self) -> None:
        """Wait for every rank (e.g. while rank 0 writes a checkpoint)."""
        if not self.distributed:
            return
        if self.device.type == "cpu":  # gloo's monitored barrier names a rank that does not arrive
            self._collective(torch.distributed.monitored_barrier, timeout=datetime.timedelta(seconds=self.timeout_s))
        else:
            self._collective(torch.distributed.barrier)

    def _collective(self, op, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except (RuntimeError, torch.distributed.DistError) as exc:
            raise lost(self, exc) from exc


def lost(group: Group, exc: BaseException) -> RankLost:
    return RankLost(f"rank {group.rank} of {group.world}: lost contact with another rank (it died, was killed, "
                    f"or did not answer within {group.timeout_s:g} s; set QFORGE_DIST_TIMEOUT to wait longer): "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def lost_contact(exc: BaseException) -> bool:
    """Whether `exc` says another rank is gone: RankLost (a Group collective), torch.distributed's
    DistError, or the plain RuntimeError gloo raises inside FSDP's own collectives in forward and
    backward ("Connection closed by peer", "gloo::...")."""
    if isinstance(exc, (RankLost, torch.distributed.DistError)):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("gloo", "NCCL", "Connection closed"))


def fault_point(group: Group, step: int) -> None:
    """Fault injection for tests: QFORGE_DIST_FAULT="RANK:STEP" makes rank RANK vanish (os._exit, no
    clean-up, as a crashed or killed process would) once it has finished optimiser step STEP."""
    spec = os.environ.get("QFORGE_DIST_FAULT")
    if spec and spec == f"{group.rank}:{step}":
        print(f"rank {group.rank}: QFORGE_DIST_FAULT={spec}: exiting abruptly", flush=True)
        os._exit(17)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device_kind: str | None, cuda_available: bool) -> tuple[str, str]:
    """(backend, device type) of a distributed run whose --device is `device_kind`: "cuda" is NCCL
    with one GPU per rank, "cpu" gloo on the CPU, None / "auto" the former when CUDA is available.
    --device cuda without a GPU is a ValueError (qforge.devices says so before any rank starts)."""
    kind = (device_kind or "auto").split(":")[0]
    if kind == "auto":
        kind = "cuda" if cuda_available else "cpu"
    if kind == "cuda":
        if not cuda_available:
            raise ValueError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu")
        return "nccl", "cuda"
    if kind == "cpu":
        return "gloo", "cpu"
    raise ValueError(f"--device {device_kind!r}: expected auto, cpu or cuda")


def init_group(timeout_s: float | None = None, device_kind: str | None = None) -> Group:
    """Join the process group torchrun set up (a run of one process when WORLD_SIZE is absent or 1).

    The backend follows the run's device (backend_for): NCCL with each rank on GPU LOCAL_RANK for
    cuda, gloo on the CPU for cpu; unspecified, NCCL when CUDA is available.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("QFORGE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(timeout_s=timeout_s)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend, kind = backend_for(device_kind, torch.cuda.is_available())
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                             **({"device_id": device} if backend == "nccl" else {}))
    return Group(rank=rank, world=world, local_rank=local_rank, device=device, timeout_s=timeout_s)


def close_group(group: Group) -> None:
    if group.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
