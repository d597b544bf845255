"""Build models from configs and load them from disk, under one trust policy.

Everything that turns a file into a model lives here: :func:`load_tokenizer` / :func:`load_dit`
(a ``save_pretrained`` directory, a training run directory, one of our training checkpoints or a
released ``.pth``), the builders they share with the trainers (:func:`build_rectok`,
:func:`build_ditdh`), and :func:`official_state_dict`, the one helper that unwraps a checkpoint
(``model_ema`` / ``ema`` / ``model`` / ``state_dict``, DDP and ``torch.compile`` prefixes) for
:meth:`RecTok.from_official <rectok_fast.models.rectok.RecTok.from_official>` and
:meth:`DiTDH.from_official <rectok_fast.models.ditdh.DiTDH.from_official>`.

Trust: every ``.pt`` / ``.pth`` goes through :func:`rectok_fast.utils.checkpoint.safe_torch_load`
(``weights_only=True``; ``argparse.Namespace``, ``pathlib`` paths and NumPy scalars/dtypes are
allow-listed for the released checkpoints).  A file that needs any other global raises
:class:`~rectok_fast.utils.checkpoint.UnsafeCheckpointError` naming it; only
``trust_remote_code=True`` (CLI: ``rectok-fast --trust-remote-code``) unpickles in full, with a warning.
``.safetensors`` files cannot hold code and load directly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ModelConfig, RunConfig, from_dict
from ..errors import CheckpointError, ConfigError, ConfigTypeError, PathError
from ..utils.checkpoint import (
    SAFE_GLOBALS,
    TRUST_FLAG,
    TrustRemoteCodeWarning,
    UnsafeCheckpointError,
    safe_torch_load,
    trusting_remote_code,
)
from .ditdh import DITDH_SIZES, DiTDH, DiTDHConfig
from .rectok import RecTok, RecTokConfig

__all__ = [
    "DEFAULT_TEACHER_WIDTH",
    "SAFE_GLOBALS",
    "TRUST_FLAG",
    "TrustRemoteCodeWarning",
    "UnsafeCheckpointError",
    "build_ditdh",
    "build_rectok",
    "load_dit",
    "load_tokenizer",
    "official_state_dict",
    "safe_torch_load",
    "teacher_width",
    "trusting_remote_code",
]

DEFAULT_TEACHER_WIDTH = {"tiny": 64, "dinov3": 1024, "dinov2": 1024, "siglip": 1152}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


# ----------------------------------------------------------------------------- builders


def teacher_width(mc: ModelConfig) -> int:
    """Feature width of ``mc.teacher`` (``mc.extra["teacher_width"]`` wins)."""
    w = mc.extra.get("teacher_width")
    return int(w) if w is not None else DEFAULT_TEACHER_WIDTH.get(mc.teacher, 1024)


def build_rectok(mc: ModelConfig, image_size: int) -> RecTok:
    """A fresh :class:`~rectok_fast.models.rectok.RecTok`: encoder/decoder of size ``mc.name``, one
    semantic decoder for ``mc.teacher`` (none when ``teacher: none``); ``mc.extra`` overrides any
    :class:`~rectok_fast.models.rectok.RecTokConfig` field."""
    extra = {k: v for k, v in mc.extra.items() if k != "teacher_width"}
    for key in ("encoder", "decoder", "sem_decoder"):
        if isinstance(extra.get(key), list):
            extra[key] = tuple(extra[key])
    teachers = {} if mc.teacher in (None, "none") else {mc.teacher: teacher_width(mc)}
    kw = dict(
        img_size=image_size, token_channels=mc.latent_channels, encoder=mc.name, decoder=mc.name, teachers=teachers
    )
    kw.update(extra)
    where = f"model (model.name={mc.name!r}, image size {image_size}, model.extra)"
    cfg = _config_or_error(RecTokConfig, kw, where)
    with _config_errors(where):
        return RecTok(cfg)


def build_ditdh(mc: ModelConfig, channels: int, grid: int, num_classes: int | None = None) -> DiTDH:
    """A fresh DiT^DH: a registry size (``S``/``B``/``L``/``XL``) or ``custom`` with sizes in ``mc.extra``."""
    extra = dict(mc.extra)
    for key in ("hidden_size", "depth", "num_heads"):
        if isinstance(extra.get(key), list):
            extra[key] = tuple(extra[key])
    kw = dict(in_channels=channels, input_size=grid, num_classes=mc.num_classes if num_classes is None else num_classes)
    kw.update(extra)
    key = mc.name.upper().removeprefix("DITDH-").removeprefix("DITDH_")
    where = f"model (model.name={mc.name!r}, model.extra)"
    if key in DITDH_SIZES:
        with _config_errors(where):
            return DiTDH.from_size(key, **kw)
    cfg = _config_or_error(DiTDHConfig, kw, where)
    with _config_errors(where):
        return DiTDH(cfg)


@contextlib.contextmanager
def _config_errors(where: str):
    """A ``ValueError`` / ``TypeError`` of a model built from a recipe (its constructors validate their
    arguments) is a recipe problem: :class:`ConfigError` with the constructor's message."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise (ConfigTypeError if isinstance(e, TypeError) else ConfigError)(f"{where}: {e}") from e


def _config_or_error(cls: type, kw: dict, where: str) -> Any:
    with _config_errors(where):  # TypeError: a key of model.extra that is no field of the model's config
        return cls(**kw)


# ----------------------------------------------------------------------------- checkpoint unwrapping


def read_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    trust_remote_code: bool | None = None,
    what: str = "load",
    mmap: bool = False,
) -> Any:
    """The contents of a checkpoint file under the trust policy (``.safetensors``: a tensor dict)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PathError(f"{what}: no checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu")
    return safe_torch_load(path, map_location=map_location, trust_remote_code=trust_remote_code, what=what, mmap=mmap)


def official_state_dict(
    obj: str | os.PathLike | Mapping,
    *,
    use_ema: bool = True,
    what: str = "from_official",
    drop_prefixes: tuple[str, ...] = (),
    trust_remote_code: bool | None = None,
    mmap: bool = False,
) -> dict[str, torch.Tensor]:
    """The model state dict inside a released (or any ``torch.save``-d) checkpoint.

    ``obj``: a path (read with :func:`read_checkpoint`), a loaded checkpoint dict or a bare state
    dict.  Takes ``model_ema`` (or ``ema``) when ``use_ema`` and present, else ``model``, else
    ``state_dict``, else ``obj`` itself; strips DDP / ``torch.compile`` prefixes (``module.``,
    ``_orig_mod.``, repeated); keeps tensors only and drops keys starting with ``drop_prefixes``
    (e.g. frozen teacher weights).
    """
    if isinstance(obj, (str, os.PathLike)):
        obj = read_checkpoint(obj, trust_remote_code=trust_remote_code, what=what, mmap=mmap)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what}: expected a path, a checkpoint dict or a state dict, got {type(obj).__name__}")
    sd: Mapping = obj
    keys = (("model_ema", "ema") if use_ema else ()) + ("model", "state_dict")
    for key in keys:
        if isinstance(obj.get(key), Mapping):
            sd = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        if drop_prefixes and k.startswith(drop_prefixes):
            continue
        out[k] = v
    return out


# ----------------------------------------------------------------------------- loaders

_KIND_NAME = {"tokenizer": "load_tokenizer", "dit": "load_dit"}
_KIND_LABEL = {"tokenizer": "a RecTok tokenizer", "dit": "a DiT^DH"}
_MODEL_TYPE = {"rectok": "tokenizer", "ditdh": "dit"}


def _held_kind(sd: Any) -> str | None:
    """Which model a state dict / checkpoint holds, from its top-level key prefixes (None: neither)."""
    if not isinstance(sd, Mapping):
        return None
    for key in ("model_ema", "ema", "model", "state_dict"):
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    heads = set()
    for k in sd:
        k = str(k)
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        heads.add(k.split(".", 1)[0])
    if {"y_embedder", "t_embedder"} & heads:
        return "dit"
    if {"encoder", "decoder"} <= heads:
        return "tokenizer"
    return None


def _wrong_kind(path: str, kind: str, held: str | None, detail: str = "") -> CheckpointError:
    holds = f"holds {_KIND_LABEL[held]}" if held else "holds no model this package recognises"
    return CheckpointError(f"{_KIND_NAME[kind]}: {path!r} {holds}, not {_KIND_LABEL[kind]}{detail}")


def _load(path: str | os.PathLike, kind: str, prefer_ema: bool, map_location: Any, trust_remote_code: bool | None):
    what = _KIND_NAME[kind]
    path = os.fspath(path)
    cls = RecTok if kind == "tokenizer" else DiTDH
    if os.path.isdir(path):
        cj = os.path.join(path, "config.json")
        if os.path.exists(cj):
            try:
                import json

                with open(cj) as f:
                    held = _MODEL_TYPE.get(json.load(f).get("model_type"))
            except (OSError, ValueError, AttributeError):
                held = None
            if held is not None and held != kind:
                raise _wrong_kind(path, kind, held, " (a save_pretrained export)")
            return cls.from_pretrained(path)
        for sub in ("export", os.path.join("checkpoints", "latest.pt")):
            p = os.path.join(path, sub)
            if os.path.exists(p):
                return _load(p, kind, prefer_ema, map_location, trust_remote_code)
        raise PathError(f"{what}: {path!r} holds neither config.json, export/ nor checkpoints/latest.pt")
    ckpt = read_checkpoint(path, map_location=map_location, trust_remote_code=trust_remote_code, what=what)
    c = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    rc = from_dict(RunConfig, c) if isinstance(c, dict) and "kind" in c else None
    if rc is None:
        held = _held_kind(ckpt)
        if held is not None and held != kind:
            raise _wrong_kind(path, kind, held)
        try:
            return cls.from_official(ckpt, use_ema=prefer_ema)
        except (RuntimeError, KeyError) as e:  # load_state_dict: missing / unexpected keys, shape mismatches
            first = " ".join(str(e).split())[:200]
            raise _wrong_kind(path, kind, held, f" (its weights do not fit: {first})") from e
    if rc.kind != kind:
        raise _wrong_kind(path, kind, rc.kind, f" (a {rc.kind!r} training checkpoint)")
    if kind == "tokenizer":
        model = build_rectok(rc.model, rc.data.image_size)
    else:
        meta = ckpt.get("data_meta") or {}
        if "channels" not in meta or "grid" not in meta:
            raise CheckpointError(f"{what}: {path!r} is a DiT training checkpoint without data_meta channels/grid")
        model = build_ditdh(rc.model, meta["channels"], meta["grid"], meta.get("num_classes"))
    sd = ckpt["model_ema"] if prefer_ema and ckpt.get("model_ema") is not None else ckpt["model"]
    model.load_state_dict(sd)
    return model.eval()


def load_tokenizer(
    path: str | os.PathLike,
    prefer_ema: bool = True,
    map_location: Any = "cpu",
    *,
    trust_remote_code: bool | None = None,
) -> RecTok:
    """A RecTok (eval mode) from a ``save_pretrained`` directory, a training run directory (its
    ``export/`` or ``checkpoints/latest.pt``), one of our training checkpoints or an official ``.pth``.

    ``prefer_ema``: the EMA weights when the file has them.  ``trust_remote_code``: see the module
    docstring (``None``: the CLI's ``--trust-remote-code``, else off)."""
    return _load(path, "tokenizer", prefer_ema, map_location, trust_remote_code)


def load_dit(
    path: str | os.PathLike,
    prefer_ema: bool = True,
    map_location: Any = "cpu",
    *,
    trust_remote_code: bool | None = None,
) -> DiTDH:
    """A DiT^DH (eval mode) from a ``save_pretrained`` directory, a run directory, one of our
    checkpoints or an official ``.pth`` / ``.safetensors``; arguments as :func:`load_tokenizer`."""
    return _load(path, "dit", prefer_ema, map_location, trust_remote_code)
