"""Image datasets returning ``(image, label)`` with ``image`` a float32 (3, S, S) tensor in [-1, 1].

Augmentation randomness (crop position, flip) is drawn from a generator seeded by
``(seed, epoch, index)``, never from the global RNG: the same sample gets the same augmentation
whatever the number of workers or ranks, which is what makes resume bit-exact and DDP runs
comparable with single-process ones.  Call :meth:`set_epoch` at every epoch.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, PathError

logger = logging.getLogger("rectok_fast.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")

# scikit-image sample images that ship inside the package (no download); one class each.
EMBEDDED_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "logo",
    "camera",
    "brick",
    "coins",
    "grass",
    "gravel",
    "moon",
    "clock",
)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion): BOX-halve while the short side is >= 2·size, BICUBIC-resize
    the short side to ``image_size``, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    cy = (arr.shape[0] - image_size) // 2
    cx = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[cy : cy + image_size, cx : cx + image_size])


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # A counter-based seed per (seed, epoch, index): independent of worker/rank layout.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


class _AugmentedDataset(Dataset):
    def __init__(self, hflip: bool, seed: int):
        self.hflip = hflip
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _maybe_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.hflip and torch.rand((), generator=g).item() < 0.5:
            return x.flip(-1)
        return x


def load_image(path: str) -> Image.Image:
    """``path`` decoded in full as RGB; an unreadable, truncated or corrupt file raises
    :class:`~rectok_fast.errors.DataError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # decodes every byte: a truncated file fails here
    except FileNotFoundError:
        raise PathError(f"image {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"corrupt or truncated image {path}: {e} (data.skip_corrupt=true skips such files)") from e


class ImageFolderDataset(_AugmentedDataset):
    """``root/<class>/<image>`` (ImageNet layout); classes sorted by name -> label indices.

    An unreadable image raises :class:`~rectok_fast.errors.DataError` naming it.  With
    ``skip_corrupt`` it is logged, counted (:attr:`corrupt`) and replaced by the next readable image
    (deterministically, so resume stays exact) until more than ``max(1, max_corrupt_frac · len)``
    distinct files are corrupt, which raises.  (Counts are per process: with DataLoader workers, each
    worker counts the files it met.)"""

    skip_corrupt = False
    max_corrupt_frac = 0.01

    def __init__(
        self,
        root: str,
        image_size: int,
        hflip: bool = True,
        seed: int = 0,
        *,
        skip_corrupt: bool = False,
        max_corrupt_frac: float = 0.01,
    ):
        super().__init__(hflip, seed)
        self.skip_corrupt, self.max_corrupt_frac = bool(skip_corrupt), float(max_corrupt_frac)
        self.corrupt: set[str] = set()
        if not os.path.isdir(root):
            raise PathError(f"ImageFolderDataset: `root` {root!r} is not a directory")
        self.root, self.image_size = root, image_size
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples: list[tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
                for fn in sorted(files):
                    if fn.endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, fn), ci))
        if not self.samples:
            raise PathError(f"ImageFolderDataset: no images under {root!r} (expected root/<class>/<image>)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int) -> tuple[Image.Image, int]:
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(i + k) % n]
            if path in self.corrupt:
                continue
            try:
                return load_image(path), label
            except (DataError, PathError) as e:
                if not self.skip_corrupt:
                    raise
                self.corrupt.add(path)
                limit = max(1, int(self.max_corrupt_frac * n))
                logger.warning("skipping corrupt image (%d of at most %d): %s", len(self.corrupt), limit, e)
                if len(self.corrupt) > limit:
                    raise DataError(
                        f"{len(self.corrupt)} corrupt images (more than data.max_corrupt_frac={self.max_corrupt_frac} "
                        f"of {n}, at least 1), the last {path}"
                    ) from e
        raise DataError(f"no readable image among the {n} of the dataset")

    def __getitem__(self, i: int):
        im, label = self._read(i)
        img = center_crop_arr(im, self.image_size)
        x = to_tensor(np.asarray(img))
        return self._maybe_flip(x, _sample_generator(self.seed, self.epoch, i)), label


class FileListDataset(ImageFolderDataset):
    """A text file with one ``relative/or/absolute/path [label]`` per line (label 0 when absent)."""

    def __init__(
        self,
        list_path: str,
        image_size: int,
        root: str | None = None,
        hflip: bool = True,
        seed: int = 0,
        *,
        skip_corrupt: bool = False,
        max_corrupt_frac: float = 0.01,
    ):
        _AugmentedDataset.__init__(self, hflip, seed)
        self.skip_corrupt, self.max_corrupt_frac = bool(skip_corrupt), float(max_corrupt_frac)
        self.corrupt = set()
        self.image_size = image_size
        root = root or os.path.dirname(os.path.abspath(list_path))
        self.samples = []
        if not os.path.isfile(list_path):
            raise PathError(f"FileListDataset: no file list at {list_path!r}")
        with open(list_path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                    p, lab = parts[0], int(parts[1])
                    if lab < 0:
                        raise DataError(f"FileListDataset: {list_path!r}: negative label in line {line!r}")
                else:
                    p, lab = line, 0
                self.samples.append((p if os.path.isabs(p) else os.path.join(root, p), lab))
        if not self.samples:
            raise DataError(f"FileListDataset: {list_path!r} lists no images")
        self.classes = [str(i) for i in range(max(lab for _, lab in self.samples) + 1)]


def load_embedded_images(names: tuple[str, ...] = EMBEDDED_NAMES) -> list[np.ndarray]:
    """scikit-image's bundled sample images as (H, W, 3) uint8 arrays (grey ones replicated to RGB,
    RGBA composited on white).  Raises a clear error when scikit-image is not installed."""
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover - dev extra
        raise ImportError(
            "--data embedded needs scikit-image (pip install scikit-image); it ships the sample images"
        ) from e
    out = []
    for n in names:
        a = np.asarray(getattr(skd, n)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.shape[2] == 4:
            alpha = a[..., 3:4].astype(np.float32) / 255.0
            a = (a[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
        out.append(np.ascontiguousarray(a[..., :3]))
    return out


class EmbeddedImages(_AugmentedDataset):
    """Random ``image_size`` crops (+ flips) of scikit-image's sample images, one class per image.

    Each image is downscaled by ``scale`` (and upscaled if its short side is below 2.5·size).  The
    bottom ``max(size, 25%)`` rows of every image are reserved for ``split="heldout"``; ``train``
    crops never touch them, so held-out PSNR measures generalisation to unseen pixels.
    ``length`` is the virtual epoch length; sample ``i`` shows image ``i % num_images``.
    """

    def __init__(
        self,
        image_size: int,
        split: str = "train",
        length: int = 4096,
        scale: float = 0.5,
        hflip: bool = True,
        seed: int = 0,
        names: tuple[str, ...] = EMBEDDED_NAMES,
    ):
        super().__init__(hflip and split == "train", seed)
        if split not in ("train", "heldout"):
            raise ValueError(f"EmbeddedImages: `split` must be 'train' or 'heldout', got {split!r}")
        self.image_size, self.split, self.length = image_size, split, int(length)
        self.names = tuple(names)
        self.images = []
        for a in load_embedded_images(self.names):
            im = Image.fromarray(a)
            w, h = im.size
            s = max(scale, 2.5 * image_size / min(w, h))
            im = im.resize(
                (max(image_size, round(w * s)), max(image_size, round(h * s))),
                resample=Image.BICUBIC if s > 1 else Image.BOX,
            )
            self.images.append(np.asarray(im))
        self.classes = list(self.names)

    @property
    def num_classes(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return self.length

    def _rows(self, h: int) -> tuple[int, int]:
        hold = max(self.image_size, round(0.25 * h))
        return (0, h - hold) if self.split == "train" else (h - hold, h)

    def __getitem__(self, i: int):
        k = i % len(self.images)
        a = self.images[k]
        h, w = a.shape[:2]
        r0, r1 = self._rows(h)
        # held-out crops are fixed per index (epoch-independent) so evaluation is reproducible
        g = _sample_generator(self.seed, self.epoch if self.split == "train" else 0, i)
        y = r0 + int(torch.randint(0, max(1, r1 - r0 - self.image_size + 1), (), generator=g))
        x0 = int(torch.randint(0, w - self.image_size + 1, (), generator=g))
        x = to_tensor(a[y : y + self.image_size, x0 : x0 + self.image_size])
        return self._maybe_flip(x, g), k


def build_image_dataset(data_cfg, split: str = "train", seed: int = 0) -> Dataset:
    """The dataset named by a :class:`rectok_fast.config.DataConfig` (``embedded`` / ``folder`` / ``filelist``)."""
    src = data_cfg.source
    if src == "embedded":
        return EmbeddedImages(
            data_cfg.image_size,
            split=split,
            length=data_cfg.embedded_len,
            scale=data_cfg.embedded_scale,
            hflip=data_cfg.hflip,
            seed=seed,
        )
    if src not in ("folder", "filelist"):
        raise DataError(f"data.source must be 'embedded', 'folder' or 'filelist', got {src!r}")
    if data_cfg.path is None:
        raise DataError(f"data.source={src!r} needs data.path")
    corrupt = {
        "skip_corrupt": getattr(data_cfg, "skip_corrupt", False),
        "max_corrupt_frac": getattr(data_cfg, "max_corrupt_frac", 0.01),
    }
    if src == "folder":
        return ImageFolderDataset(
            data_cfg.path, data_cfg.image_size, hflip=data_cfg.hflip and split == "train", seed=seed, **corrupt
        )
    return FileListDataset(
        data_cfg.path,
        data_cfg.image_size,
        root=data_cfg.root,
        hflip=data_cfg.hflip and split == "train",
        seed=seed,
        **corrupt,
    )


def default_embedded_scale(image_size: int) -> float:
    """The bundled recipes' downscale of the embedded images for ``image_size``-px crops:
    ``min(0.5, image_size / 256)`` (0.125 at 32 px, 0.5 at 128 px and above)."""
    return min(0.5, float(image_size) / 256.0)


def embedded_scale_for(
    tokenizer_path: str | os.PathLike | None, image_size: int, default: float | None = None
) -> float:
    """``data.embedded_scale`` the tokenizer at ``tokenizer_path`` was trained with, so that ``stats``,
    ``eval`` and ``cache-latents`` on ``--data embedded`` see the images training saw.

    Read from the run's ``config.yaml`` (``tokenizer_path`` a run dir, its ``export/`` or a file under
    ``checkpoints/``); when there is none (a released model, a lone export), ``default``
    (``None``: :func:`default_embedded_scale`)."""
    import yaml

    if tokenizer_path is not None:
        p = os.path.abspath(os.fspath(tokenizer_path))
        base = p if os.path.isdir(p) else os.path.dirname(p)
        for d in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
            f = os.path.join(d, "config.yaml")
            if not os.path.isfile(f):
                continue
            try:
                with open(f) as fh:
                    c = yaml.safe_load(fh) or {}
            except (OSError, yaml.YAMLError):
                break
            data = c.get("data") if isinstance(c, dict) and c.get("kind", "tokenizer") == "tokenizer" else None
            if isinstance(data, dict) and int(data.get("image_size", image_size)) == int(image_size):
                return float(data.get("embedded_scale", 0.5))
            break
    return default_embedded_scale(image_size) if default is None else float(default)
