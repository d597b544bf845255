"""Reconstruction metrics on [0, 1] images and generation metrics on Inception features.

``psnr`` and ``ssim`` are computed here (per image, then averaged).  FID and IS use the Inception
network of torch-fidelity (the port of the TF graph behind the ADM reference statistics) loaded from
a local file (:func:`inception_weights_path`; nothing is downloaded); the features are accumulated
batch by batch (mean and covariance in fp64), so 50k images never sit in memory, and the reference
may be FID statistics (``mu`` / ``sigma`` ``.npz``, e.g. ``adm_in256_stats.npz``) or images.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, PathError, UserError
from ..utils.log import progress_bar


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB: x, y (B, C, H, W) in [0, data_range] -> (B,) fp64 (inf-free: mse clamped at 1e-12)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(data_range**2 / mse)


def mean_color_psnr(y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR (B,) of predicting every pixel of each image by the image's mean colour: the trivial baseline."""
    pred = y.double().mean(dim=(2, 3), keepdim=True).expand_as(y)
    return psnr(pred, y, data_range)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    g = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian 11×11 window, σ 1.5, K1 0.01, K2 0.03, valid region,
    channel mean), as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False, channel_axis=0)``.  x, y: (B, C, H, W) -> (B,) fp64."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    win = min(win_size, x.shape[-1], x.shape[-2])
    win -= (win + 1) % 2  # odd
    w = _gaussian_window(win, sigma, c, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


# ----------------------------------------------------------------------------- Inception features

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_ENV = "RECTOK_FAST_INCEPTION_WEIGHTS"


def _default_inception_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def inception_weights_path(path: str | None = None) -> str:
    """The local file of the FID Inception network (torch-fidelity's port of the TF 2015-12-05 graph, the
    network of the ADM / guided-diffusion reference statistics): ``path`` (``--inception-weights``), else
    ``$RECTOK_FAST_INCEPTION_WEIGHTS``, else torch-fidelity's cache (``$TORCH_HOME/hub/checkpoints``).
    Nothing is downloaded: a missing file is a :class:`~rectok_fast.errors.PathError` saying where to put it."""
    for src, p in (("--inception-weights", path), (f"${INCEPTION_ENV}", os.environ.get(INCEPTION_ENV))):
        if p:
            if not os.path.isfile(p):
                raise PathError(f"{src} {p!r}: no such file (the FID Inception weights {INCEPTION_FILE})")
            return p
    p = _default_inception_path()
    if not os.path.isfile(p):
        raise PathError(
            f"FID/IS need the Inception weights {INCEPTION_FILE} (nothing is downloaded): fetch {INCEPTION_URL} "
            f"on a machine with network and pass --inception-weights FILE, set ${INCEPTION_ENV}, or copy it to {p}"
        )
    return p


def build_inception(weights: str, device) -> callable:
    """``f(images uint8 (B, 3, H, W)) -> (pool features (B, 2048) fp64, logits (B, 1008) fp32)`` through
    torch-fidelity's ``FeatureExtractorInceptionV3`` loaded from ``weights`` (a local file)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError(
            "FID/IS need torch-fidelity (pip install 'rectok_fast[eval]') plus its Inception weights on disk; "
            "PSNR/SSIM are computed without them"
        ) from None
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
    )
    net = net.to(device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, logits = net(images.to(device))
        return f.double().cpu(), logits.float().cpu()

    return features


class FeatureStats:
    """Streaming mean and covariance (fp64) of feature rows: what FID compares."""

    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, f: torch.Tensor) -> None:
        f = f.double().reshape(f.shape[0], -1)
        if self.s is None:
            self.s, self.ss = (
                torch.zeros(f.shape[1], dtype=torch.float64),
                torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64),
            )
        self.n += f.shape[0]
        self.s += f.sum(0)
        self.ss += f.T @ f

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D), as ``np.mean`` / ``np.cov(rowvar=False)``."""
        if self.n < 2:
            raise DataError(f"FID needs at least 2 images, got {self.n}")
        mu = self.s / self.n
        sigma = (self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS (mean, std over ``splits``) from (N, classes) logits: exp(E KL(p(y|x) || p(y)))."""
    p = torch.softmax(logits.double(), dim=1)
    scores = []
    for part in torch.tensor_split(p, min(splits, len(p))):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(py.clamp_min(1e-30)))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(t) > 1 else 0.0


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in fp64.  tr (Σ1 Σ2)^½ = Σ √λ(Σ1^½ Σ2 Σ1^½): the
    eigenvalues of a symmetric PSD matrix, so no non-symmetric matrix square root is needed."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"frechet_distance: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(s1.shape)}/{tuple(s2.shape)}"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    lam, v = torch.linalg.eigh(s1)
    r1 = (v * lam.clamp_min(0).sqrt()) @ v.T
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def load_fid_stats(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mu, sigma)`` of a FID statistics ``.npz`` (``mu`` / ``sigma``: the ``adm_in256_stats.npz``
    format of the guided-diffusion evaluator), or ``None`` when the file holds images (``arr_0``)."""
    if not path.endswith(".npz") or not os.path.isfile(path):
        return None
    with np.load(path) as z:
        keys = set(z.files)
        if {"mu", "sigma"} <= keys:
            return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if "arr_0" in keys:
        return None
    raise DataError(f"{path}: neither FID statistics (mu, sigma) nor an image batch (arr_0); it holds {sorted(keys)}")


# ----------------------------------------------------------------------------- image sources


def _npz_member_batches(path: str, key: str, batch: int):
    """Rows of ``key`` in an (uncompressed or compressed) ``.npz`` read ``batch`` at a time."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered {key}")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for s in range(0, shape[0], batch):
            n = min(batch, shape[0] - s)
            yield np.frombuffer(bytearray(f.read(n * row)), dtype=dtype).reshape(n, *shape[1:])


def count_images(src: str) -> int | None:
    """How many images :func:`image_batches` yields (``None`` when unknown cheaply)."""
    import json

    if src.endswith(".npz"):
        import zipfile

        with zipfile.ZipFile(src) as zf, zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            return int(read(f)[0][0])
    cfg = os.path.join(src, "sample_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return int(json.load(f)["num_images"])
    return len(_image_files(src))


def _image_files(d: str) -> list[str]:
    ext = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.lower().endswith(ext))


def image_batches(src: str, batch: int = 64):
    """uint8 (B, 3, H, W) batches of: an ADM ``.npz`` (``arr_0``, read in chunks), a ``rectok-fast
    sample`` output directory (its uint8 shards), or a folder of image files (sorted by name)."""
    import json

    if src.endswith(".npz"):
        for a in _npz_member_batches(src, "arr_0", batch):
            yield torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
        return
    cfg = os.path.join(src, "sample_config.json")
    if os.path.isfile(cfg) and os.path.isdir(os.path.join(src, "shards")):
        from .sample import iter_shards  # here: sample.py imports the models and loaders, metrics stays light

        with open(cfg) as f:
            c = json.load(f)
        for a, _ in iter_shards(src, int(c["num_images"]), int(c["batch_size"])):
            for s in range(0, len(a), batch):
                yield torch.from_numpy(a[s : s + batch]).permute(0, 3, 1, 2)
        return
    files = _image_files(src)
    if not files:
        raise DataError(f"{src}: no images (.png/.jpg) and no sample output (sample_config.json + shards/)")
    from PIL import Image

    for s in range(0, len(files), batch):
        arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files[s : s + batch]]
        yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def source_features(src: str, features, batch: int = 64, progress: bool = False, desc: str = "inception"):
    """(FeatureStats, logits (N, 1008)) of every image of ``src``."""
    st, logits = FeatureStats(), []
    bar = progress_bar(count_images(src), desc, enabled=progress)
    for x in image_batches(src, batch):
        f, lg = features(x)
        st.add(f)
        logits.append(lg)
        bar.update(x.shape[0])
    bar.close()
    return st, (torch.cat(logits) if logits else torch.zeros(0, 1008))


def generation_metrics(
    gen: str,
    ref: str | None = None,
    *,
    isc: bool = True,
    weights: str | None = None,
    device=None,
    batch_size: int = 64,
    progress: bool = False,
    features=None,
    ref_stats: tuple[np.ndarray, np.ndarray] | None = None,
    **_ignored,
) -> dict:
    """FID (against ``ref``: FID statistics ``.npz`` with ``mu``/``sigma``, an image ``.npz``, a sample
    output or an image folder) and IS of the images of ``gen`` (same forms), streamed in batches of
    ``batch_size`` through torch-fidelity's Inception network.  ``features``: the feature function
    (default :func:`build_inception` of :func:`inception_weights_path`).  Returns ``{"error": ...}``
    explaining what is missing instead when torch-fidelity or the local weights are absent (never
    downloads).  ``ref_stats``: the reference's ``(mu, sigma)`` when already known (``ref`` is then unused)."""
    if features is None:
        try:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if importlib.util.find_spec("torch_fidelity") is None:
                build_inception("", dev)  # raises the explanation
            features = build_inception(inception_weights_path(weights), dev)
        except UserError as e:
            return {"error": str(e)}
    st, logits = source_features(gen, features, batch_size, progress, desc="inception (samples)")
    out: dict = {"num_images": st.n}
    if isc:
        out["is"], out["is_std"] = inception_score(logits)
    if ref is not None or ref_stats is not None:
        stats = ref_stats if ref_stats is not None else load_fid_stats(ref)
        if ref_stats is not None:
            out["ref"] = "given"
        elif stats is None:
            rst, _ = source_features(ref, features, batch_size, progress, desc="inception (reference)")
            stats = rst.mu_sigma()
            out["ref"] = "images"
        else:
            out["ref"] = "stats"
        mu, sigma = st.mu_sigma()
        if stats[0].shape != mu.shape:
            raise DataError(
                f"--ref {ref}: statistics of {stats[0].shape[0]} features, the Inception pool has {mu.shape[0]}"
            )
        out["fid"] = frechet_distance(mu, sigma, *stats)
    return out
