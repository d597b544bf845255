"""Latent cache: the tokenizer's posterior moments of a dataset, written once in safetensors shards.

``DIR/index.json`` lists the shards and holds the latent statistics (``mean``/``std`` per channel), the
grid and channel count; ``DIR/shard_00000.safetensors`` ... hold ``moments`` (n, N, 2C) and ``labels``
(n,).  :class:`LatentCacheDataset` returns the moments; the DiT trainer samples the posterior
(``mean + std·ε``) on the fly and normalises with the stored statistics.
"""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

from ..errors import DataError, PathError


class ShardWriter:
    def __init__(self, out_dir: str, shard_size: int = 8192, rank: int = 0):
        self.out_dir, self.shard_size, self.rank = out_dir, shard_size, rank
        os.makedirs(out_dir, exist_ok=True)
        self.buf_m: list[torch.Tensor] = []
        self.buf_y: list[torch.Tensor] = []
        self.n_buf = 0
        self.shards: list[dict] = []

    def add(self, moments: torch.Tensor, labels: torch.Tensor) -> None:
        """Buffer (n, N, 2C) moments and (n,) labels; full shards of ``shard_size`` are written as they fill."""
        moments, labels = moments.detach().cpu(), labels.detach().cpu().long()
        while moments.shape[0]:
            take = min(moments.shape[0], self.shard_size - self.n_buf)
            self.buf_m.append(moments[:take])
            self.buf_y.append(labels[:take])
            self.n_buf += take
            moments, labels = moments[take:], labels[take:]
            if self.n_buf >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.n_buf:
            return
        from safetensors.torch import save_file

        name = f"shard_r{self.rank:03d}_{len(self.shards):05d}.safetensors"
        m, y = torch.cat(self.buf_m).contiguous(), torch.cat(self.buf_y).contiguous()
        tmp = os.path.join(self.out_dir, "." + name + ".tmp")
        save_file({"moments": m, "labels": y}, tmp)
        os.replace(tmp, os.path.join(self.out_dir, name))
        self.shards.append({"file": name, "count": int(m.shape[0])})
        self.buf_m, self.buf_y, self.n_buf = [], [], 0


def write_latent_cache(
    out_dir: str,
    shards: list[dict],
    *,
    grid: int,
    channels: int,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    meta: dict | None = None,
) -> str:
    """Write ``index.json`` (call after every rank's :class:`ShardWriter` flushed; ``shards`` gathered)."""
    index = {
        "version": 1,
        "num": int(sum(s["count"] for s in shards)),
        "grid": int(grid),
        "channels": int(channels),
        "shards": shards,
        "latent_mean": None if mean is None else [float(v) for v in mean.flatten()],
        "latent_std": None if std is None else [float(v) for v in std.flatten()],
        "meta": meta or {},
    }
    path = os.path.join(out_dir, "index.json")
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def shard_path(cache_dir: str, name: object, index: str = "index.json") -> str:
    """``cache_dir/name`` for a shard file listed in ``index``, refusing any name that could leave the
    cache directory: absolute paths, drive letters, ``..`` components, empty or non-string names.
    (Symbolic links inside the cache are followed, as for any file the user put there.)"""
    ok = isinstance(name, str) and name.strip() != "" and "\0" not in name
    if ok:
        parts = name.replace("\\", "/").split("/")
        ok = not (os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0])
        ok = ok and ".." not in parts and not (len(parts[0]) >= 2 and parts[0][1] == ":")
    if not ok:
        raise DataError(
            f"{index}: shard file name {name!r} is not a relative path inside the cache directory "
            "(absolute paths and '..' are refused); the index is corrupt or was not written by `rectok-fast cache-latents`"
        )
    return os.path.join(cache_dir, name)


class LatentCacheDataset(Dataset):
    """``(moments (N, 2C) float32, label)`` from a cache directory (shards loaded into memory once)."""

    def __init__(self, cache_dir: str):
        from safetensors.torch import load_file

        path = os.path.join(cache_dir, "index.json")
        if not os.path.exists(path):
            raise PathError(f"LatentCacheDataset: {path} not found; create it with `rectok-fast cache-latents`")
        with open(path) as f:
            self.index = json.load(f)
        ms, ys = [], []
        for s in self.index["shards"]:
            d = load_file(shard_path(cache_dir, s.get("file") if isinstance(s, dict) else s, index=path))
            ms.append(d["moments"])
            ys.append(d["labels"])
        self.moments = torch.cat(ms)
        self.labels = torch.cat(ys)
        self.grid, self.channels = self.index["grid"], self.index["channels"]
        self.seed, self.epoch = 0, 0

    @property
    def latent_mean(self) -> torch.Tensor | None:
        v = self.index.get("latent_mean")
        return None if v is None else torch.tensor(v)

    @property
    def latent_std(self) -> torch.Tensor | None:
        v = self.index.get("latent_std")
        return None if v is None else torch.tensor(v)

    @property
    def num_classes(self) -> int:
        return int(self.index.get("meta", {}).get("num_classes", int(self.labels.max()) + 1))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.moments.shape[0]

    def __getitem__(self, i: int):
        return self.moments[i].float(), int(self.labels[i])
