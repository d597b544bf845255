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

from ..errors import DeviceError


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
            raise DeviceError("--device cuda (device=cuda) requested but no CUDA device is visible")
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
    """Sums of named scalar losses: tensors stay on the device (``acc.add(loss=..)`` never syncs),
    Python numbers (the learning rate) stay on the host (no tensor is made from them per step);
    :meth:`pop_means` does one host-to-device copy of the host sums, one all-reduce and one
    device-to-host transfer for all of them.  Each name is averaged over the calls that provided it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (2, K): row 0 sums, row 1 counts (device values)
        self.host: dict[str, list[float]] = {}  # name -> [sum, count] of Python numbers

    def add(self, **values: torch.Tensor | float) -> None:
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        for k, v in values.items():
            if not isinstance(v, torch.Tensor):
                acc = self.host.setdefault(k, [0.0, 0.0])
                acc[0] += float(v)
                acc[1] += 1.0
        if not tensors:
            return
        new = [k for k in tensors if k not in self.names]
        if new:
            self.names += new
            extra = torch.zeros(2, len(new), device=self.device, dtype=torch.float64)
            self.sums = extra if self.sums is None else torch.cat([self.sums, extra], dim=1)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        vals, cnts = [], []
        for k in self.names:
            v = tensors.get(k)
            if v is None:
                vals.append(zero)
                cnts.append(zero)
            else:
                vals.append(v.detach().to(self.device, torch.float64).reshape(()))
                cnts.append(zero + 1)
        self.sums = self.sums + torch.stack([torch.stack(vals), torch.stack(cnts)])

    def pop_means(self) -> dict[str, float]:
        host = [k for k in self.host if k not in self.names]
        if not self.names and not host:
            return {}
        names = self.names + host
        # once per log interval: the host sums join the device sums for one all-reduce
        rows = [[self.host.get(k, [0.0, 0.0])[i] for k in names] for i in (0, 1)]
        tot = torch.tensor(rows, dtype=torch.float64, device=self.device)
        if self.sums is not None:
            tot[:, : len(self.names)] += self.sums
        tot = all_reduce_mean(tot)  # means of sums and of counts over ranks: their ratio is the global mean
        sums, counts = tot.tolist()
        out = {k: s / c for k, s, c in zip(names, sums, counts) if c > 0}
        if self.sums is not None:
            self.sums = torch.zeros_like(self.sums)
        self.host = {}
        return out
