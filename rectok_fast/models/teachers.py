"""Frozen teachers for RecTok's semantic distillation (method §2).

Every teacher has one interface: ``forward(images) -> (B, N, width)`` with ``images`` (B, 3, H, W)
in [-1, 1] (the tokenizer's input), ``N = (H/16)²`` patch tokens (CLS and register tokens dropped),
plus ``.width`` and ``.patch_size``.  Preprocessing happens on the device of the images: map to
[0, 1], resize to ``g·patch_size`` when the teacher's patch is not 16 (DINOv2's 14) so that the
token grids match, normalise with the teacher's mean/std, cast to the teacher's dtype (bf16 on GPU
by default).  There is no uint8 / image-processor round trip.

* :class:`DINOv2Teacher` — a timm ViT (``vit_large_patch14_dinov2.lvd142m``);
* :class:`DINOv3Teacher` — a transformers ``AutoModel`` (``facebook/dinov3-vitl16-pretrain-lvd1689m``);
* :class:`SigLIPTeacher` — a timm ViT (``vit_large_patch16_siglip_256``);
* :class:`TinyTeacher` — a randomly initialised small ViT with the same interface (tests, demos).

:func:`load_teacher` builds one from a local directory or a hub name.  Nothing here downloads unless
the caller names a hub model; missing packages or weights raise :class:`TeacherUnavailableError`
saying how to provide them.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..nn.layers import Block, RMSNorm

TOKENIZER_PATCH = 16

DEFAULT_SOURCES = {
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
    "dinov3": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "siglip": "vit_large_patch16_siglip_256",
}
_PACKAGES = {"dinov2": "timm", "dinov3": "transformers", "siglip": "timm"}
_HOW = (
    "Provide the weights in one of these ways: (1) `pip install 'rectok_fast[teachers]'` (timm + transformers) on a "
    "machine that can reach the model hub and call load_teacher({name!r}) (hub name {hub!r}); (2) download once and "
    "pass the local directory: load_teacher({name!r}, '/path/to/dir') (a transformers snapshot for dinov3; for timm "
    "teachers a directory with model.safetensors or pytorch_model.bin); (3) for tests and demos use TinyTeacher()."
)


class TeacherUnavailableError(UserError, RuntimeError):
    """A teacher's package or weights are missing; the message says how to provide them (a user error:
    one line in the CLI)."""


class Teacher(nn.Module):
    """Base: preprocessing on device + a frozen backbone returning patch tokens."""

    width: int
    patch_size: int

    def __init__(
        self,
        width: int,
        patch_size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        tokenizer_patch: int = TOKENIZER_PATCH,
    ):
        super().__init__()
        self.width = int(width)
        self.patch_size = int(patch_size)
        self.tokenizer_patch = int(tokenizer_patch)
        self._norm = (tuple(mean), tuple(std))
        self.register_buffer("pixel_mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # ``.to(bf16)`` casts the backbone; the normalisation constants stay exact fp32
        super()._apply(fn, *args, **kwargs)
        dev = self.pixel_mean.device
        self.pixel_mean = torch.tensor(self._norm[0], device=dev).reshape(1, 3, 1, 1)
        self.pixel_std = torch.tensor(self._norm[1], device=dev).reshape(1, 3, 1, 1)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised (B, 3, g·patch, g·patch) in the backbone's dtype."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: `images` must be (B, 3, H, W), got {tuple(images.shape)}")
        gh, gw = images.shape[-2] // self.tokenizer_patch, images.shape[-1] // self.tokenizer_patch
        x = (images.float() + 1.0) * 0.5
        size = (gh * self.patch_size, gw * self.patch_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        return x.to(self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> patch features (B, (H/16)·(W/16), width) (backbone dtype)."""
        return self.features(self.preprocess(images))

    def train(self, mode: bool = True) -> Teacher:  # frozen: always eval
        return super().train(False)

    def extra_repr(self) -> str:
        return f"width={self.width}, patch_size={self.patch_size}"


class TinyTeacher(Teacher):
    """A randomly initialised small ViT (CLS + patch tokens) with the teacher interface."""

    def __init__(
        self,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch_size: int = TOKENIZER_PATCH,
        max_grid: int = 16,
        seed: int | None = 0,
    ):
        super().__init__(width, patch_size)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)  # the same random teacher every time (without touching the global RNG)
            self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
            self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, max_grid * max_grid, width) * 0.02)
            self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
            self.norm = RMSNorm(width)
        self.max_grid = max_grid
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, w, gh, gw)
        gh, gw = x.shape[-2:]
        if gh > self.max_grid or gw > self.max_grid:
            raise ValueError(f"TinyTeacher: grid {gh}x{gw} exceeds max_grid {self.max_grid}")
        pos = self.pos_embed.reshape(1, self.max_grid, self.max_grid, -1)[:, :gh, :gw].reshape(1, gh * gw, -1)
        x = x.flatten(2).transpose(1, 2) + pos
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]


class TimmTeacher(Teacher):
    """A timm ViT (``forward_features`` -> all tokens); drops ``num_prefix_tokens`` (CLS + registers)."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        super().__init__(model.num_features, patch, mean, std)
        self.model = model.eval().requires_grad_(False)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)[:, self.num_prefix_tokens :]


class DINOv2Teacher(TimmTeacher):
    """DINOv2 (timm, patch 14): images resized to ``g·14`` so its grid matches the tokenizer's."""


class SigLIPTeacher(TimmTeacher):
    """SigLIP (timm, patch 16, normalisation mean = std = 0.5, no prefix tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__(model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class DINOv3Teacher(Teacher):
    """DINOv3 (transformers ``AutoModel``, patch 16): ``last_hidden_state`` minus CLS and registers."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        cfg = model.config
        super().__init__(cfg.hidden_size, getattr(cfg, "patch_size", 16), mean, std)
        self.model = model.eval().requires_grad_(False)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, self.num_prefix_tokens :]


# ----------------------------------------------------------------------------- loading


def _import(name: str, package: str, hub: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise TeacherUnavailableError(
            f"load_teacher({name!r}) needs the `{package}` package, which is not importable ({e}). "
            + _HOW.format(name=name, hub=hub)
        ) from e


def _looks_local(source: str) -> bool:
    """A path (absolute, relative with ./ or ~, or existing) rather than a hub name."""
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


def _unavailable(name: str, hub: str, what: str, e: BaseException | None = None) -> TeacherUnavailableError:
    cause = f" ({type(e).__name__}: {e})" if e is not None else ""
    return TeacherUnavailableError(f"load_teacher({name!r}): {what}{cause}. " + _HOW.format(name=name, hub=hub))


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint file -> flat state dict (unwraps ``model_state_dict`` / ``state_dict`` / ``model``,
    strips a DDP ``module.`` prefix)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _timm_local(timm, name: str, path: str, hub: str, arch: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """Build the timm model described by a local directory / weights file and load its weights.

    The architecture comes from (first match) the ``arch`` argument, the directory's timm
    ``config.json`` (``architecture`` + ``model_args`` + ``num_classes``, the layout of the timm hub
    snapshots and of ``timm.models.save_for_hf``), or the default hub name.  The weights go through
    timm's ViT ``checkpoint_filter_fn`` (original Meta DINOv2 / OpenCLIP key layouts, pos-embed grid
    resampling) and load strictly (a classifier head the model does not have is dropped)."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
        cfg_file = os.path.join(path, "config.json")
    else:
        files, cfg_file = [path], os.path.join(os.path.dirname(path), "config.json")
    weights = next((f for f in files if os.path.isfile(f)), None)
    if weights is None:
        raise _unavailable(name, hub, f"no weights at {path!r} (looked for {', '.join(files)})")
    model_args: dict[str, Any] = {}
    if arch is None and os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cfg = json.load(f)
        arch = cfg.get("architecture")
        model_args = dict(cfg.get("model_args") or {})
        if "num_classes" in cfg:
            model_args.setdefault("num_classes", cfg["num_classes"])
    arch = arch or hub
    try:
        model = timm.create_model(arch, pretrained=False, **{**model_args, **kwargs})
    except Exception as e:
        raise _unavailable(name, hub, f"timm could not build architecture {arch!r} for {weights!r}", e) from e
    try:
        sd = _read_state_dict(weights)
        try:
            from timm.models.vision_transformer import checkpoint_filter_fn
        except ImportError:  # pragma: no cover - very old timm
            checkpoint_filter_fn = None
        if checkpoint_filter_fn is not None and hasattr(model, "pos_embed"):
            sd = checkpoint_filter_fn(sd, model)
        if getattr(model, "num_classes", None) == 0:
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        model.load_state_dict(sd)
    except Exception as e:
        raise _unavailable(
            name,
            hub,
            f"the weights {weights!r} do not fit timm's {arch!r} (put the timm config.json next to them, or pass "
            "arch=<timm architecture>)",
            e,
        ) from e
    return model


def _timm_model(name: str, source: str, hub: str, arch: str | None = None) -> nn.Module:
    timm = _import(name, "timm", hub)
    kwargs: dict[str, Any] = dict(dynamic_img_size=True)  # any g·patch grid, pos-embed interpolated
    if _looks_local(source):
        return _timm_local(timm, name, os.path.expanduser(source), hub, arch, kwargs)
    try:
        return timm.create_model(source, pretrained=True, **kwargs)
    except Exception as e:  # no network, unknown name, ...
        raise _unavailable(name, hub, f"could not load {source!r} through timm", e) from e


def _hf_norm(source: str, local: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean`` / ``image_std`` of a transformers snapshot's ``preprocessor_config.json`` (DINOv3's
    satellite models do not use ImageNet's); ImageNet's when there is none."""
    try:
        if local:
            path = os.path.join(source, "preprocessor_config.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, "preprocessor_config.json")
        with open(path) as f:
            cfg = json.load(f)
        mean, std = tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"])
        if len(mean) == 3 and len(std) == 3:
            return mean, std
    except Exception:  # no file / no hub access / other keys: the paper's ImageNet statistics
        pass
    return IMAGENET_MEAN, IMAGENET_STD


def _dinov3_model(source: str, hub: str) -> DINOv3Teacher:
    transformers = _import("dinov3", "transformers", hub)
    local = _looks_local(source)
    path = os.path.expanduser(source) if local else source
    if local and not os.path.isdir(path):
        raise _unavailable("dinov3", hub, f"{source!r} is not a directory (a transformers snapshot)")
    try:
        model = transformers.AutoModel.from_pretrained(path)
    except Exception as e:
        raise _unavailable(
            "dinov3", hub, f"could not load {source!r} through transformers (DINOv3 needs transformers >= 4.56)", e
        ) from e
    mean, std = _hf_norm(path, local)
    return DINOv3Teacher(model, mean=mean, std=std)


def load_teacher(
    name: str,
    source: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
    tokenizer_patch: int = TOKENIZER_PATCH,
    **tiny_kwargs: Any,
) -> Teacher:
    """Build a frozen teacher in eval mode.

    Args:
        name: ``"dinov2"``, ``"dinov3"``, ``"siglip"`` or ``"tiny"`` (a :class:`TinyTeacher`).
        source: a local directory / weights file, or a hub name (default: the paper's model,
            :data:`DEFAULT_SOURCES`; loading a hub name downloads when the machine can reach the hub).
        device: where to put it (default CPU).
        dtype: parameter dtype; default bf16 on CUDA, fp32 elsewhere.
        arch: timm teachers from a local source: the timm architecture of the weights (default: the
            directory's timm ``config.json``, else the hub name's architecture).
        tokenizer_patch: the patch size of the tokenizer the teacher serves: its token grid is
            ``(H / tokenizer_patch, W / tokenizer_patch)`` whatever the teacher's own patch size.
        tiny_kwargs: arguments of :class:`TinyTeacher` for ``name="tiny"``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name == "tiny":
        teacher: Teacher = TinyTeacher(**tiny_kwargs)
    elif name in DEFAULT_SOURCES:
        hub = DEFAULT_SOURCES[name]
        src = os.fspath(source) if source is not None else hub
        if _looks_local(src) and not os.path.exists(os.path.expanduser(src)):
            raise _unavailable(name, hub, f"no weights at {src!r}")
        if name == "dinov3":
            teacher = _dinov3_model(src, hub)
        else:
            model = _timm_model(name, src, hub, arch)
            teacher = DINOv2Teacher(model) if name == "dinov2" else SigLIPTeacher(model)
    else:
        raise ValueError(f"load_teacher: unknown teacher {name!r}; expected one of {['tiny', *DEFAULT_SOURCES]}")
    teacher.tokenizer_patch = int(tokenizer_patch)
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
