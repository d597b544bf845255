"""Datasets and loaders: ImageNet-style folders, file lists, the embedded sample images, latent caches."""

from .datasets import EmbeddedImages, FileListDataset, ImageFolderDataset, build_image_dataset, center_crop_arr
from .latents import LatentCacheDataset, write_latent_cache
from .sampler import DistributedGlobalBatchSampler, build_loader

__all__ = [
    "DistributedGlobalBatchSampler",
    "EmbeddedImages",
    "FileListDataset",
    "ImageFolderDataset",
    "LatentCacheDataset",
    "build_image_dataset",
    "build_loader",
    "center_crop_arr",
    "write_latent_cache",
]
