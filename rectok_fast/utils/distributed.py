"""Process-group helpers for ``torchrun`` (single- and multi-node): NCCL on GPUs, gloo on CPUs.

``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m
rectok_fast.train.dit --config configs/dit/ditdh_xl.yaml`` sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``;
:func:`init_distributed` reads them.  Without them everything runs as a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group from the ``torchrun`` environment (no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (in place on a copy); the identity on one process.  Issue it only
    at log intervals on an accumulator so training steps never block on the host."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        lst = [obj]
        dist.broadcast_object_list(lst, src=0)
        return lst[0]
    return obj


class MetricAccumulator:
    """Sums of named scalar losses kept on the device (``acc.add(loss=..)`` never syncs);
    :meth:`pop_means` does one all-reduce and one host transfer for all of them.  Each name is
    averaged over the calls that provided it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (2, K): row 0 sums, row 1 counts

    def add(self, **values: torch.Tensor | float) -> None:
        new = [k for k in values if k not in self.names]
        if new:
            self.names += new
            extra = torch.zeros(2, len(new), device=self.device, dtype=torch.float64)
            self.sums = extra if self.sums is None else torch.cat([self.sums, extra], dim=1)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        vals, cnts = [], []
        for k in self.names:
            v = values.get(k)
            if v is None:
                vals.append(zero)
                cnts.append(zero)
            else:
                v = (
                    v.detach().to(self.device, torch.float64).reshape(())
                    if isinstance(v, torch.Tensor)
                    else torch.tensor(float(v), device=self.device, dtype=torch.float64)
                )
                vals.append(v)
                cnts.append(zero + 1)
        self.sums = self.sums + torch.stack([torch.stack(vals), torch.stack(cnts)])

    def pop_means(self) -> dict[str, float]:
        if self.sums is None or not self.names:
            return {}
        tot = all_reduce_mean(self.sums)  # means of sums and of counts over ranks: their ratio is the global mean
        sums, counts = tot.tolist()
        out = {k: s / c for k, s, c in zip(self.names, sums, counts) if c > 0}
        self.sums = torch.zeros_like(self.sums)
        return out
