"""Typed run configurations: YAML files + dataclasses + ``key=value`` command-line overrides.

A config file mirrors the dataclass tree (``data:``, ``model:``, ``optim:``, ``loss:``, ...).  Unknown
keys are errors (a typo never silently does nothing).  Overrides use dotted paths whose values are
parsed as YAML scalars, e.g. ``optim.blr=2e-4 data.batch_size=64 model.extra.gamma=0.5``.

Epoch-based settings (``optim.epochs``, ``optim.warmup_epochs``, ``loss.gan_start_epoch`` ...) are
converted to optimizer steps once the dataset size is known (:func:`steps_per_epoch`); ``--max-steps``
only stops a run early and never changes the learning-rate schedule, so a stopped run can be resumed
bit-exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError, ConfigKeyError, ConfigTypeError, PathError


@dataclass
class DataConfig:
    """Where images come from and how a batch is built.

    ``source``: ``embedded`` (scikit-image's sample images, random crops + flips, no download),
    ``folder`` (ImageNet layout ``path/<class>/<image>``) or ``filelist`` (a text file of
    ``relative/path.jpg [label]`` lines, resolved against ``root``).  ``latents``: a directory
    written by ``cache-latents`` (DiT training from cached posterior moments).
    """

    source: str = "embedded"
    path: str | None = None
    root: str | None = None
    latents: str | None = None
    image_size: int = 256
    hflip: bool = True
    global_batch_size: int = 256
    grad_accum: int = 1
    num_workers: int = 4
    pin_memory: bool = True
    embedded_len: int = 4096  # virtual epoch length of the embedded dataset (random crops)
    embedded_scale: float = 0.5  # images are downscaled by this before cropping
    skip_corrupt: bool = False  # skip unreadable images (each logged and counted) instead of failing
    max_corrupt_frac: float = 0.01  # ... but fail once more than this fraction of the dataset (>= 1 image) is corrupt


@dataclass
class ModelConfig:
    """Which network to build.  ``name``: a registry size (``tiny``/``small``/``base``/``large`` for
    RecTok, ``S``/``B``/``L``/``XL`` for DiT^DH).  ``extra`` is forwarded verbatim to the model
    constructor (every option of docs/method.md: ``noise_schedule``, ``gamma``, ``sem_input_type``, ...)."""

    name: str = "tiny"
    latent_channels: int = 128
    teacher: str = "tiny"  # "tiny" | "dinov3" | "dinov2" | "siglip" (RecTok only)
    teacher_path: str | None = None
    num_classes: int = 1000  # DiT only
    tokenizer: str | None = None  # DiT: path of a saved tokenizer (save_pretrained dir) for online tokenisation
    init: str | None = None  # path to a checkpoint / pretrained dir to start from (stage 2 starts from stage 1)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW + per-step schedule.  ``lr = blr * global_batch_size / 256`` unless ``lr`` is given.

    ``schedule``: ``cosine`` (linear warm-up for ``warmup_frac`` of all steps, then cosine to
    ``min_lr``) or ``const_linear`` (DiT: constant until ``decay_start_epoch``, then linear to
    ``min_lr`` at ``decay_end_epoch``).
    """

    blr: float = 1e-4
    lr: float | None = None
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    epochs: float = 200
    total_steps: int | None = None  # overrides epochs when set
    schedule: str = "cosine"
    warmup_frac: float = 0.25
    warmup_steps: int | None = None
    decay_start_epoch: float = 40
    decay_end_epoch: float = 800
    grad_clip: float | None = 3.0
    ema_decay: float = 0.999
    amp: str = "bf16"  # "bf16" | "fp16" | "none"; autocast is only enabled on CUDA unless amp_cpu
    amp_cpu: bool = False


@dataclass
class LossConfig:
    """Tokenizer losses (method §3).  Weights of 0 disable a term; ``perceptual`` needs local weights."""

    l2: float = 1.0
    perceptual: float = 1.0
    perceptual_enabled: bool = True
    lpips_weight: float = 1.0
    convnext_weight: float = 0.1
    lpips_path: str | None = None  # dir with vgg16 + lpips linear weights, or None for the caches
    convnext_path: str | None = None
    kl: float = 1e-6
    semantic: float = 1.0
    gan: float = 0.1  # method §3: the released checkpoints' weight
    gan_start_epoch: float = 100
    disc_lr_mult: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    label_dropout: float = 0.1  # DiT: class-label drop-out probability


@dataclass
class LogConfig:
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    milestone_every: int | None = None
    image_every: int = 5000
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "rectok_fast"
    progress: bool = True


@dataclass
class RunConfig:
    """A whole training run (tokenizer stage 1/2 or DiT)."""

    kind: str = "tokenizer"  # "tokenizer" | "dit"
    stage: int = 1
    seed: int = 0
    out: str = "runs/default"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    max_steps: int | None = None
    resume: bool = False
    overwrite: bool = False  # start afresh in an `out` that already holds a run (its checkpoints/metrics are removed)
    compile: bool = False
    distributed: str = "ddp"  # "ddp" | "fsdp" (FSDP2, DiT only)
    # loss noise of the fused ops: "materialized" (tensors drawn from the shared generator and sliced
    # per rank), "kernel" (one shared seed per step + this rank's sample offset: Philox noise made in
    # the kernel, never stored; needs the Triton path) or "auto" (kernel on CUDA, else materialized)
    noise: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- dict <-> dataclass


def _resolve_type(tp: Any) -> Any:
    if isinstance(tp, str):
        return eval(tp, vars(typing), {})  # only our own annotations reach here
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _resolve_type(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigTypeError(f"config: `{where}` must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError):
                continue
        raise ConfigTypeError(f"config: `{where}` = {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigTypeError(f"config: `{where}` must be a list, got {value!r}")
        args = typing.get_args(tp)
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (a,) = typing.get_args(tp)
        return [_coerce(v, a, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # "1e-4" is a str to PyYAML
        except ValueError:
            raise ConfigTypeError(f"config: `{where}` must be a number, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigTypeError(f"config: `{where}` must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, d: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ``KeyError`` naming them."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigKeyError(f"config: unknown key(s) {unknown} in `{where or cls.__name__}` (known: {sorted(names)})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML / JSON / checkpoints."""

    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(dataclasses.asdict(cfg))


def parse_overrides(items: list[str] | None) -> dict:
    """``["a.b=1", "c=[0.9, 0.95]"]`` -> ``{"a": {"b": 1}, "c": [0.9, 0.95]}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is given both as a value and as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge (``over`` wins); ``extra`` sub-dicts merge key by key too."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str) -> dict:
    """Load a YAML config; a top-level ``base: other.yaml`` (relative to this file) is merged first."""
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise PathError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(d).__name__}")
    base = d.pop("base", None)
    if base is not None:
        d = merge(load_yaml(os.path.join(os.path.dirname(path), base)), d)
    return d


def load_config(path: str | None = None, overrides: list[str] | dict | None = None, cls: type = RunConfig) -> Any:
    """Config from a YAML file (or the defaults) with overrides applied (a list of ``key=value`` or a dict)."""
    d = load_yaml(path) if path else {}
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    cfg = from_dict(cls, merge(d, over))
    if cls is RunConfig:
        validate_run_config(cfg)
    return cfg


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"config: `{key}` = {value!r} must be {need}")


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Range checks of the values a run needs before any work starts (raises :class:`ConfigError`
    naming the key): batch sizes, intervals and step counts positive, fractions in range."""
    d, o, lg = cfg.data, cfg.optim, cfg.log
    for key, v in (("data.global_batch_size", d.global_batch_size), ("data.grad_accum", d.grad_accum),
                   ("data.image_size", d.image_size), ("data.embedded_len", d.embedded_len),
                   ("log.log_every", lg.log_every), ("log.ckpt_every", lg.ckpt_every)):  # fmt: skip
        _check(v >= 1, key, v, "a positive integer")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    _check(d.embedded_scale > 0, "data.embedded_scale", d.embedded_scale, "> 0")
    _check(0 <= d.max_corrupt_frac <= 1, "data.max_corrupt_frac", d.max_corrupt_frac, "in [0, 1]")
    _check(lg.keep_last >= 0, "log.keep_last", lg.keep_last, ">= 0 (0 keeps every checkpoint)")
    _check(lg.image_every >= 0, "log.image_every", lg.image_every, ">= 0 (0 disables preview grids)")
    if lg.milestone_every is not None:
        _check(lg.milestone_every >= 1, "log.milestone_every", lg.milestone_every, "a positive integer or null")
    if cfg.max_steps is not None:
        _check(cfg.max_steps >= 1, "max_steps (--max-steps)", cfg.max_steps, "a positive integer")
    if o.total_steps is not None:
        _check(o.total_steps >= 1, "optim.total_steps", o.total_steps, "a positive integer or null")
    _check(o.epochs > 0, "optim.epochs", o.epochs, "> 0")
    _check(o.blr > 0 or o.lr is not None, "optim.blr", o.blr, "> 0")
    if o.lr is not None:
        _check(o.lr > 0, "optim.lr", o.lr, "> 0 or null")
    for key, v in (("optim.warmup_frac", o.warmup_frac),):
        _check(0 <= v <= 1, key, v, "in [0, 1]")
    if o.warmup_steps is not None:
        _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0 or null")
    _check(0 <= o.ema_decay <= 1, "optim.ema_decay", o.ema_decay, "in [0, 1]")
    _check(o.amp in ("bf16", "fp16", "none"), "optim.amp", o.amp, "one of 'bf16', 'fp16', 'none'")
    _check(o.schedule in ("cosine", "const_linear"), "optim.schedule", o.schedule, "'cosine' or 'const_linear'")
    _check(cfg.kind in ("tokenizer", "dit"), "kind", cfg.kind, "'tokenizer' or 'dit'")
    _check(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "'auto', 'cpu' or 'cuda'")
    _check(cfg.distributed in ("ddp", "fsdp"), "distributed", cfg.distributed, "'ddp' or 'fsdp'")
    _check(cfg.noise in ("auto", "materialized", "kernel"), "noise", cfg.noise, "'auto', 'materialized' or 'kernel'")
    _check(cfg.model.num_classes >= 1, "model.num_classes", cfg.model.num_classes, "a positive integer")
    _check(0 <= cfg.loss.label_dropout <= 1, "loss.label_dropout", cfg.loss.label_dropout, "in [0, 1]")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (resume continues the run in `out`)")
    return cfg


def save_config(cfg: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_dir() -> str:
    """Where the recipes live: ``configs/`` of a source checkout, else the copy installed with the
    package as ``rectok_fast/configs`` (a wheel / non-editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(here), "configs")
    return checkout if os.path.isdir(checkout) else os.path.join(here, "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A path as given, or a recipe name like ``tokenizer/tiny`` looked up under ``configs/``."""
    if os.path.exists(name_or_path):
        return name_or_path
    cand = os.path.join(config_dir(), name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.exists(cand):
        return cand
    raise PathError(f"config {name_or_path!r} not found (neither a file nor a recipe under {config_dir()})")


def steps_per_epoch(dataset_len: int, global_batch_size: int) -> int:
    """Optimizer steps per epoch (the last incomplete global batch is dropped)."""
    return max(1, dataset_len // global_batch_size)


def total_steps(optim: OptimConfig, spe: int) -> int:
    """The schedule length in optimizer steps (``total_steps`` or ``epochs × steps_per_epoch``)."""
    return int(optim.total_steps) if optim.total_steps is not None else max(1, round(optim.epochs * spe))


def lr_for(optim: OptimConfig, global_batch_size: int) -> float:
    """Peak learning rate: ``lr`` if set, else ``blr · global_batch_size / 256`` (method §3)."""
    return float(optim.lr) if optim.lr is not None else optim.blr * global_batch_size / 256


def data_overrides(spec: str | None) -> dict:
    """``--data`` of the CLIs as a config override: ``embedded``, an image folder or a file list."""
    if spec is None:
        return {}
    if spec == "embedded":
        return {"data": {"source": "embedded"}}
    if os.path.isdir(spec):
        return {"data": {"source": "folder", "path": spec}}
    if os.path.isfile(spec):
        return {"data": {"source": "filelist", "path": spec}}
    raise PathError(f"--data {spec!r}: not 'embedded', a directory or a file list")
