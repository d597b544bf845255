"""Build models from a :class:`rectok_fast.config.ModelConfig` and load tokenizers / DiTs from disk."""

from __future__ import annotations

import json
import os

import torch

from ..config import ModelConfig, RunConfig, from_dict

DEFAULT_TEACHER_WIDTH = {"tiny": 64, "dinov3": 1024, "dinov2": 1024, "siglip": 1152}


def teacher_width(mc: ModelConfig) -> int:
    w = mc.extra.get("teacher_width")
    return int(w) if w is not None else DEFAULT_TEACHER_WIDTH.get(mc.teacher, 1024)


def build_rectok(mc: ModelConfig, image_size: int):
    """A fresh :class:`~rectok_fast.models.rectok.RecTok`: encoder/decoder of size ``mc.name``, one
    semantic decoder for ``mc.teacher`` (none when ``teacher: none``); ``mc.extra`` overrides any
    :class:`~rectok_fast.models.rectok.RecTokConfig` field."""
    from ..models.rectok import RecTok, RecTokConfig

    extra = {k: v for k, v in mc.extra.items() if k != "teacher_width"}
    for key in ("encoder", "decoder", "sem_decoder"):
        if isinstance(extra.get(key), list):
            extra[key] = tuple(extra[key])
    teachers = {} if mc.teacher in (None, "none") else {mc.teacher: teacher_width(mc)}
    kw = dict(
        img_size=image_size, token_channels=mc.latent_channels, encoder=mc.name, decoder=mc.name, teachers=teachers
    )
    kw.update(extra)
    return RecTok(RecTokConfig(**kw))


def build_teacher(mc: ModelConfig, device: torch.device, image_size: int):
    """The frozen teacher named by ``mc.teacher`` (``tiny`` needs no weights; the others load from
    ``mc.teacher_path`` or their hub name, see :func:`rectok_fast.models.teachers.load_teacher`)."""
    from ..models.teachers import load_teacher

    patch = int(mc.extra.get("patch_size", 16))
    if mc.teacher == "tiny":
        return load_teacher(
            "tiny",
            device=device,
            tokenizer_patch=patch,
            width=teacher_width(mc),
            patch_size=patch,
            max_grid=max(16, image_size // patch),
        )
    return load_teacher(mc.teacher, mc.teacher_path, device=device, tokenizer_patch=patch)


def build_ditdh(mc: ModelConfig, channels: int, grid: int, num_classes: int | None = None):
    """A fresh DiT^DH: a registry size (``S``/``B``/``L``/``XL``) or ``custom`` with sizes in ``mc.extra``."""
    from ..models.ditdh import DITDH_SIZES, DiTDH, DiTDHConfig

    extra = dict(mc.extra)
    for key in ("hidden_size", "depth", "num_heads"):
        if isinstance(extra.get(key), list):
            extra[key] = tuple(extra[key])
    kw = dict(in_channels=channels, input_size=grid, num_classes=mc.num_classes if num_classes is None else num_classes)
    kw.update(extra)
    key = mc.name.upper().removeprefix("DITDH-").removeprefix("DITDH_")
    if key in DITDH_SIZES:
        return DiTDH.from_size(key, **kw)
    return DiTDH(DiTDHConfig(**kw))


def _run_config_of(ckpt: dict) -> RunConfig | None:
    c = ckpt.get("config")
    return from_dict(RunConfig, c) if isinstance(c, dict) else None


def load_tokenizer(path: str, prefer_ema: bool = True, map_location="cpu"):
    """A RecTok from a ``save_pretrained`` directory, a training run directory (its ``export/`` or
    ``checkpoints/latest.pt``), one of our training checkpoints, or an official ``.pth``."""
    from ..models.rectok import RecTok

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return RecTok.from_pretrained(path)
        for sub in ("export", os.path.join("checkpoints", "latest.pt")):
            p = os.path.join(path, sub)
            if os.path.exists(p):
                return load_tokenizer(p, prefer_ema, map_location)
        raise FileNotFoundError(
            f"load_tokenizer: {path!r} holds neither config.json, export/ nor checkpoints/latest.pt"
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    rc = _run_config_of(ckpt) if isinstance(ckpt, dict) else None
    if rc is not None and rc.kind == "tokenizer":
        model = build_rectok(rc.model, rc.data.image_size)
        sd = ckpt["model_ema"] if prefer_ema and ckpt.get("model_ema") is not None else ckpt["model"]
        model.load_state_dict(sd)
        return model.eval()
    return RecTok.from_official(ckpt, use_ema=prefer_ema)


def load_dit(path: str, prefer_ema: bool = True, map_location="cpu"):
    """A DiT^DH from a ``save_pretrained`` directory, a run directory, one of our checkpoints or an official ``.pth``."""
    from ..models.ditdh import DiTDH

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return DiTDH.from_pretrained(path)
        for sub in ("export", os.path.join("checkpoints", "latest.pt")):
            p = os.path.join(path, sub)
            if os.path.exists(p):
                return load_dit(p, prefer_ema, map_location)
        raise FileNotFoundError(f"load_dit: {path!r} holds neither config.json, export/ nor checkpoints/latest.pt")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    rc = _run_config_of(ckpt) if isinstance(ckpt, dict) else None
    if rc is not None and rc.kind == "dit":
        meta = ckpt.get("data_meta", {})
        model = build_ditdh(rc.model, meta["channels"], meta["grid"], meta.get("num_classes"))
        sd = ckpt["model_ema"] if prefer_ema and ckpt.get("model_ema") is not None else ckpt["model"]
        model.load_state_dict(sd)
        return model.eval()
    return DiTDH.from_official(ckpt, use_ema=prefer_ema)


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
