"""Constants shared across layers, defined once: the float dtypes the ops accept, the dtypes the
Triton kernels compute in, the index dtypes, and the ImageNet normalisation of the teachers and the
perceptual losses."""

from __future__ import annotations

import torch

#: float dtypes every op accepts (fp64 runs the reference or an fp64 kernel, per op)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: float dtypes the fp32-accumulating row-loss kernels take; fp64 runs the reference under "auto"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: integer dtypes of index tensors (``ids_keep``, ``ids_restore``)
INDEX_DTYPES = (torch.int64, torch.int32)

#: per-channel RGB mean and standard deviation of ImageNet (inputs in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["FLOAT_DTYPES", "IMAGENET_MEAN", "IMAGENET_STD", "INDEX_DTYPES", "KERNEL_DTYPES"]
