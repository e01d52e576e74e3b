"""Data parallelism under ``torchrun``: one process per device, DistributedDataParallel, gloo on CPU, nccl on GPU.

Every rank builds the same model from the same seed and draws the same depth at every micro-batch (the depth
sampler's generator is seeded identically and advanced in lockstep; ``--check-ranks`` verifies it with an
all-reduce). The global micro-batch (``batch_size`` sequences per rank x world size) is the one a single process
with that batch size would read; each rank takes its own disjoint slice of it. Losses are weighted by each rank's
share of the predicted tokens, so the averaged gradient is the gradient of the global mean loss, as in one process.
Only rank 0 evaluates, writes metrics and checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ApolloError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ApolloError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ApolloError(f"unknown device {name!r} (choose from auto, cpu, cuda)")


def setup(device: str) -> Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1:
        return Dist(0, 1, dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def shutdown() -> None:
    """Leave the process group, if this process joined one (the CLI's last act, also after an error)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that prints errors and results."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a few numbers over the ranks (float64, so token counts stay exact)."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def same_on_all_ranks(d: Dist, value: int) -> bool:
    """True when every rank holds the same integer (min == max over the ranks)."""
    if not d.active:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


def check_same(d: Dist, value: int, what: str) -> None:
    if not same_on_all_ranks(d, value):
        raise ApolloError(f"ranks disagree on {what}: the run would diverge (same seed, same data on every rank?)")


def weights_digest(model: nn.Module) -> int:
    """An exact fingerprint of all parameters (a hash of their bytes), for comparing ranks."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    """DDP over ``module`` (rebuilt after every growth: its parameters change). Every live layer is used at every
    sampled depth >= the live count, so no parameter goes unused and ``find_unused_parameters`` is not needed."""
    if not d.active:
        return module
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)  # no running-stat buffers
