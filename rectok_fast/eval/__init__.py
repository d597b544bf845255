"""Evaluation: PSNR / SSIM (always), FID / IS / precision-recall through torch-fidelity or clean-fid when installed."""

from .metrics import mean_color_psnr, psnr, ssim

__all__ = ["mean_color_psnr", "psnr", "ssim"]
