"""A distributed sampler that lays out *global* batches, plus the loader builder.

Global batch ``k`` of an epoch is ``perm[k·G : (k+1)·G]`` (``G`` = micro-batch × world size ×
accumulation steps, ``perm`` seeded by ``(seed, epoch)``).  Micro-batch ``m`` of rank ``r`` is the
contiguous slice starting at :func:`slot_offset` ``(m·world + r)·micro``.  So a run on ``W`` ranks sees
exactly the samples (and, with :func:`slot_offset`, the noise) of a single-process run with the same
global batch, and resuming at step ``s`` just skips ``s`` global batches, no RNG replay needed.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError


def slot_offset(micro_index: int, rank: int, world: int, micro: int) -> int:
    """Position of a rank's micro-batch inside the global batch."""
    return (micro_index * world + rank) * micro


class DistributedGlobalBatchSampler(Sampler[int]):
    """Per-rank indices for whole global batches; drop the incomplete last one; ``set_epoch`` per epoch."""

    def __init__(
        self,
        dataset_len: int,
        micro_batch: int,
        *,
        rank: int = 0,
        world: int = 1,
        accum: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if dataset_len < micro_batch * world * accum:
            raise DataError(
                f"dataset of {dataset_len} samples is smaller than one global batch ({micro_batch}×{world}×{accum}): "
                "lower data.global_batch_size or use more data"
            )
        self.n, self.micro, self.rank, self.world, self.accum = dataset_len, micro_batch, rank, world, accum
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Epoch ``epoch``, skipping its first ``start_step`` global batches (resume mid-epoch)."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        G = self.global_batch
        for step in range(self.start_step, self.steps_per_epoch):
            for m in range(self.accum):
                base = step * G + slot_offset(m, self.rank, self.world, self.micro)
                yield from perm[base : base + self.micro]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum * self.micro


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: stop signals sent to the whole process group (Ctrl-C
    in a terminal, a cluster's preemption ``kill -TERM -PGID``) are left to the main process, which
    finishes its step, writes a checkpoint and then shuts the workers down; a worker dying on them would
    fail that step instead.

    The worker leaves the main process's group (``setpgrp``), so group-wide signals never reach it, and
    ignores SIGINT. It keeps SIGTERM's default action: a SIGTERM sent to the worker itself — by its
    parent (``multiprocessing`` terminates daemonic children at exit) or by whoever signals each pid —
    still ends it. (Ignoring SIGTERM outright made an interpreter whose loader iterator was never shut
    down hang at exit, joining a worker that would not terminate.)
    """
    import os
    import signal

    try:
        os.setpgrp()
    except OSError:  # pragma: no cover - not permitted (e.g. a session leader): keep the group
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_loader_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the DataLoader workers still alive (a loader an exception left open).
    multiprocessing would SIGTERM them and join; the workers keep SIGTERM's default action, but one busy
    in a long ``__getitem__`` or blocked in a C call would still make the exit wait."""
    import multiprocessing
    import os
    import signal

    from torch.utils.data._utils.worker import _worker_loop

    for p in multiprocessing.active_children():
        if p.daemon and getattr(p, "_target", None) is _worker_loop and p.pid:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass


_EXIT_HOOK: list = []


def _register_exit_hook() -> None:
    if not _EXIT_HOOK:  # runs in multiprocessing's exit function, before it terminates and joins children
        from multiprocessing.util import Finalize

        _EXIT_HOOK.append(Finalize(None, _kill_loader_workers_at_exit, exitpriority=100))


def build_loader(
    dataset: Dataset,
    micro_batch: int,
    *,
    rank: int = 0,
    world: int = 1,
    accum: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over :class:`DistributedGlobalBatchSampler`; its own generator keeps the global
    RNG untouched (so model randomness is unaffected by loader restarts)."""
    if num_workers > 0:
        _register_exit_hook()
    sampler = DistributedGlobalBatchSampler(
        len(dataset), micro_batch, rank=rank, world=world, accum=accum, shuffle=shuffle, seed=seed
    )
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start_step: int = 0) -> None:
    loader.sampler.set_epoch(epoch, start_step)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
