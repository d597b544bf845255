"""Evaluation: PSNR / SSIM (always); FID / IS on torch-fidelity's Inception network from a local weights file."""

from .metrics import mean_color_psnr, psnr, ssim

__all__ = ["mean_color_psnr", "psnr", "ssim"]
