"""Reconstruction metrics on [0, 1] images and the generation metrics of external packages.

``psnr`` and ``ssim`` are computed here (per image, then averaged); FID, sFID, IS, precision and
recall come from a maintained package (torch-fidelity, else clean-fid) only when it is installed and
its Inception weights are already on disk: nothing is downloaded, and :func:`generation_metrics`
explains what is missing instead.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


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


def _inception_weights_present() -> tuple[bool, str]:
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    name = "weights-inception-2015-12-05-6726825d.pth"
    p = os.path.join(hub, name)
    return os.path.isfile(p), p


def generation_metrics(
    gen_dir: str,
    ref: str | None = None,
    *,
    fid: bool = True,
    isc: bool = True,
    prc: bool = True,
    cuda: bool | None = None,
) -> dict:
    """FID / IS / precision / recall between a folder of generated PNGs and a reference folder (or a
    torch-fidelity stats file).  Returns ``{"error": ...}`` with a clear explanation when no package
    or no local Inception weights are available (never downloads)."""
    present, wpath = _inception_weights_present()
    try:
        import torch_fidelity
    except ImportError:
        torch_fidelity = None
    if torch_fidelity is not None:
        if not present:
            return {
                "error": f"torch-fidelity is installed but its Inception weights are not at {wpath}; copy them there (they are downloaded on first use on a machine with network) to get FID/IS"
            }
        kw = {
            "input1": gen_dir,
            "cuda": torch.cuda.is_available() if cuda is None else cuda,
            "isc": isc,
            "verbose": False,
        }
        if ref is not None:
            kw.update(input2=ref, fid=fid, prc=prc)
        m = torch_fidelity.calculate_metrics(**kw)
        out = {}
        for k_src, k_dst in (
            ("frechet_inception_distance", "fid"),
            ("inception_score_mean", "is"),
            ("inception_score_std", "is_std"),
            ("precision", "precision"),
            ("recall", "recall"),
        ):
            if k_src in m:
                out[k_dst] = float(m[k_src])
        out["sfid"] = None  # torch-fidelity does not compute sFID
        return out
    try:
        from cleanfid import fid as cfid
    except ImportError:
        cfid = None
    if cfid is not None:
        if ref is None:
            return {"error": "clean-fid needs a reference folder (--ref) to compute FID"}
        try:
            return {"fid": float(cfid.compute_fid(gen_dir, ref, mode="clean")), "is": None}
        except Exception as e:  # clean-fid downloads its weights when absent; report rather than fetch
            return {"error": f"clean-fid failed ({e}); its Inception weights must be available locally"}
    return {
        "error": "FID/IS need torch-fidelity (pip install torch-fidelity) or clean-fid plus their Inception weights cached locally; PSNR/SSIM are reported without them"
    }
