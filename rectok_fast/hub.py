"""The released models by name, and where ``from_pretrained`` / the CLI find weights.

A *spec* names weights in one of three ways, tried in this order:

1. an existing local path: a ``save_pretrained`` directory (``config.json`` + ``model.safetensors``),
   a training run directory, or a checkpoint file (an official ``.pth``, one of ours, a ``.safetensors``);
2. a registry name (:data:`REGISTRY`: ``rectok``, ``rectok-decft``, ``ditdh-xl-80e``, ``ditdh-xl-600e``,
   ``ditdh-s-30e``, plus whatever :func:`register_pretrained` added);
3. a Hugging Face hub repository id, ``ORG/NAME`` (optionally ``ORG/NAME/path/in/repo.pth`` and
   ``@REVISION``; or ``filename=`` / ``revision=``).  A repository holding ``config.json`` is one of our
   exports (pushed with ``huggingface_hub.upload_folder`` from a ``save_pretrained`` directory); a
   released repository (``QingyuShi/RecTok``, plain ``.pth`` files) needs a file, and without one its
   default for the model kind is taken (``rectok`` for a tokenizer, ``ditdh-xl-600e`` for a DiT).

Hub files go through ``huggingface_hub.hf_hub_download``: its cache (``HF_HUB_CACHE`` / ``HF_HOME``,
read when the call is made), ``HF_HUB_OFFLINE=1`` (cache only, never the network) and revision
pinning (a branch, tag or commit hash).  :func:`resolve_pretrained` returns a local path; the models'
``from_pretrained`` then load it through :mod:`rectok_fast.models.loading` (``weights_only=True``
with the allow-list for the released files' ``argparse.Namespace``).

Failures are one-line :class:`PretrainedNotFoundError` messages naming the spec and the known names.

``rectok-fast download NAME...`` (:func:`main`) fetches into the cache and prints each local path.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass

from .errors import PathError

logger = logging.getLogger("rectok_fast")

__all__ = [
    "DEFAULT_FOR_KIND",
    "KINDS",
    "REGISTRY",
    "PretrainedEntry",
    "PretrainedNotFoundError",
    "download",
    "load_pretrained",
    "register_pretrained",
    "resolve_pretrained",
]

KINDS = ("tokenizer", "dit")
_KIND_CLASS = {"tokenizer": "RecTok", "dit": "DiTDH"}
OFFICIAL_REPO = "QingyuShi/RecTok"


class PretrainedNotFoundError(PathError):
    """A spec that is no local path, no registry name and no hub file we could get (one-line message;
    a :class:`~rectok_fast.errors.UserError` and a ``FileNotFoundError``)."""

    kind = "weights"


class _NoSuchFile(PretrainedNotFoundError):
    """The repository (revision) exists on the hub but has no such file."""


@dataclass(frozen=True)
class PretrainedEntry:
    """One named set of weights.

    ``filename=None``: the repository is one of our exports (``config.json`` + ``model.safetensors``);
    otherwise the file (an official checkpoint).  ``revision``: a pinned branch, tag or commit
    (``None``: ``main``).  ``kind``: ``"tokenizer"`` (:class:`~rectok_fast.models.rectok.RecTok`) or
    ``"dit"`` (:class:`~rectok_fast.models.ditdh.DiTDH`)."""

    name: str
    repo_id: str
    filename: str | None
    kind: str
    description: str = ""
    revision: str | None = None

    @property
    def loader(self) -> str:
        """``"official"`` (a released checkpoint, shapes inferred) or ``"export"`` (``save_pretrained``)."""
        return "export" if self.filename is None else "official"


REGISTRY: dict[str, PretrainedEntry] = {}
_REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ORG/NAME


def register_pretrained(
    name: str,
    repo_id: str,
    filename: str | None = None,
    kind: str = "tokenizer",
    description: str = "",
    revision: str | None = None,
) -> PretrainedEntry:
    """Add (or replace) a registry name, e.g. for your own export pushed to the hub."""
    if kind not in KINDS:
        raise ValueError(f"register_pretrained: kind must be one of {KINDS}, got {kind!r}")
    if not _REPO_RE.fullmatch(repo_id):
        raise ValueError(f"register_pretrained: {repo_id!r} is not a hub repository id (ORG/NAME)")
    entry = PretrainedEntry(name, repo_id, filename, kind, description, revision)
    REGISTRY[name] = entry
    return entry


for _args in (
    ("rectok", "RecTok.pth", "tokenizer", "RecTok tokenizer (paper release)"),
    ("rectok-decft", "RecTok_decft.pth", "tokenizer", "RecTok tokenizer with the fine-tuned pixel decoder"),
    ("ditdh-xl-80e", "ditdhxl_epoch_0079.pth", "dit", "DiT^DH-XL on RecTok latents, 80 epochs"),
    ("ditdh-xl-600e", "ditdhxl_epoch_0599.pth", "dit", "DiT^DH-XL on RecTok latents, 600 epochs"),
    ("ditdh-s-30e", "ditdhs_epoch_0029.pth", "dit", "DiT^DH-S, 30 epochs: the autoguidance model"),
):
    register_pretrained(_args[0], OFFICIAL_REPO, _args[1], _args[2], _args[3])
del _args

DEFAULT_FOR_KIND = {"tokenizer": "rectok", "dit": "ditdh-xl-600e"}
"""What a bare ``QingyuShi/RecTok`` (no file) means for each model kind."""


def known_names(kind: str | None = None) -> list[str]:
    return [n for n, e in REGISTRY.items() if kind is None or e.kind == kind]


def _known(kind: str | None = None) -> str:
    return "known names: " + ", ".join(known_names(kind))


# ----------------------------------------------------------------------------- hub access


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (``huggingface_hub`` itself reads it once, at import)."""
    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ["HF_HUB_OFFLINE"])
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE`` or ``HF_HOME/hub`` as set now; ``None``: ``huggingface_hub``'s default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:  # a declared dependency; only a broken install gets here
        raise PretrainedNotFoundError(
            "hub downloads need huggingface_hub (pip install huggingface_hub), or pass a local path"
        ) from e
    return huggingface_hub


def _fetch(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    cache_dir: str | None,
    local_files_only: bool | None,
    label: str,
) -> str:
    """``hf_hub_download`` with every failure turned into one line naming ``label`` and the file."""
    hub = _hub()
    from huggingface_hub import utils as errors  # the error classes' home in every version we support

    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    cache_dir = cache_dir or hub_cache_dir()
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    try:
        from . import __version__

        return hub.hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            library_name="rectok_fast",
            library_version=__version__,
        )
    except errors.LocalEntryNotFoundError:
        cache = cache_dir or hub.constants.HF_HUB_CACHE
        if not offline:
            why = "the hub could not be reached"
        else:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        fetch = f"`rectok-fast download {label}`" if label in REGISTRY else "it"
        hint = f"fetch {fetch} where the hub is reachable" + (" (HF_HUB_OFFLINE unset)" if offline else "")
        local = "" if label in REGISTRY else "no local path of that name, and "
        raise PretrainedNotFoundError(
            f"{label}: {local}{where} is not in the Hugging Face cache {cache} and {why}; "
            f"{hint}, or pass a local path ({_known()})"
        ) from None
    except errors.GatedRepoError:
        raise PretrainedNotFoundError(
            f"{label}: {repo_id} is gated on the hub: accept its terms and log in (huggingface-cli login)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise PretrainedNotFoundError(
            f"{label}: no hub repository {repo_id!r} (nor a local path or a registry name; {_known()})"
        ) from None
    except errors.RevisionNotFoundError:
        raise PretrainedNotFoundError(f"{label}: {repo_id} has no revision {revision!r}") from None
    except errors.EntryNotFoundError:
        raise _NoSuchFile(f"{label}: {repo_id} has no file {filename!r}{_at(revision)}") from None
    except (errors.HfHubHTTPError, OSError) as e:  # network errors, disk errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedNotFoundError(f"{label}: could not fetch {where}: {first}") from e


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _snapshot_commit(path: str) -> str | None:
    """The commit hash of a file inside a ``.../snapshots/<commit>/...`` cache path."""
    parts = os.path.normpath(path).split(os.sep)
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return None


def is_released_file(path: str) -> bool:
    """Whether ``path`` is a registry entry's checkpoint in a hub cache (``models--ORG--NAME/snapshots/<commit>/FILE``)."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 4 or parts[-3] != "snapshots" or not parts[-4].startswith("models--"):
        return False
    repo_id = parts[-4][len("models--") :].replace("--", "/", 1)
    return any(e.repo_id == repo_id and e.filename == parts[-1] for e in REGISTRY.values())


def _fetch_export(repo_id, *, revision, cache_dir, local_files_only, label) -> str:
    """``config.json`` + ``model.safetensors`` of one commit; returns their snapshot directory."""
    kw = dict(cache_dir=cache_dir, local_files_only=local_files_only, label=label)
    cfg = _fetch(repo_id, "config.json", revision=revision, **kw)
    # pin the commit the config came from, so the weights cannot come from a later push
    weights = _fetch(repo_id, "model.safetensors", revision=_snapshot_commit(cfg) or revision, **kw)
    if os.path.dirname(cfg) != os.path.dirname(weights):
        raise PretrainedNotFoundError(
            f"{label}: config.json and model.safetensors of {repo_id} are in different snapshots"
        )
    return os.path.dirname(cfg)


# ----------------------------------------------------------------------------- resolution


def _split_spec(spec: str) -> tuple[str, str | None, str | None] | None:
    """``ORG/NAME[/path/file][@REV]`` -> (repo_id, filename, revision); ``None`` if not of that form."""
    rev = None
    if "@" in spec:
        spec, rev = spec.rsplit("@", 1)
        if not rev:
            return None
    parts = spec.split("/")
    if len(parts) < 2 or not _REPO_RE.fullmatch("/".join(parts[:2])) or any(not p for p in parts):
        return None
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None), rev


def _check_kind(label: str, entry_kind: str, kind: str | None) -> None:
    if kind is not None and entry_kind != kind:
        raise PretrainedNotFoundError(
            f"{label} is a {_KIND_CLASS[entry_kind]} checkpoint, not a {_KIND_CLASS[kind]} one "
            f"(use {_KIND_CLASS[entry_kind]}.from_pretrained; {kind} names: {', '.join(known_names(kind))})"
        )


def resolve_pretrained(
    spec: str | os.PathLike,
    kind: str | None = None,
    *,
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
) -> str:
    """The local path of the weights ``spec`` names (see the module docstring), downloading if needed.

    ``kind`` (``"tokenizer"`` / ``"dit"`` / ``None``): the model kind asked for; a registry name of the
    other kind raises, and a released repository without ``filename`` takes its default for the kind.
    ``filename`` / ``revision``: a file inside the repository / a branch, tag or commit (a registry
    name's own pin is overridden by ``revision``).  ``cache_dir``: instead of ``HF_HUB_CACHE``.
    ``local_files_only``: cache only (``None``: ``HF_HUB_OFFLINE``).

    Returns a file (a checkpoint) or a directory (a ``save_pretrained`` export or a run directory)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"resolve_pretrained: kind must be one of {KINDS} or None, got {kind!r}")
    spec = os.fspath(spec)
    kw = dict(cache_dir=cache_dir, local_files_only=local_files_only)
    # 1. a local path
    if os.path.exists(spec):
        if filename is None:
            return spec
        path = os.path.join(spec, filename)
        if not os.path.exists(path):
            raise PretrainedNotFoundError(f"{spec}: no file {filename!r} in this directory")
        return path
    # 2. a registry name
    entry = REGISTRY.get(spec) or REGISTRY.get(spec.lower())
    if entry is not None:
        _check_kind(entry.name, entry.kind, kind)
        if filename is not None and filename != entry.filename:
            raise PretrainedNotFoundError(
                f"{entry.name}: a registry name fixes its file ({entry.repo_id}/{entry.filename}); "
                f"pass the repository id {entry.repo_id!r} with filename={filename!r} instead"
            )
        rev = revision or entry.revision
        if entry.filename is None:
            return _fetch_export(entry.repo_id, revision=rev, label=entry.name, **kw)
        return _fetch(entry.repo_id, entry.filename, revision=rev, label=entry.name, **kw)
    # 3. a hub repository id
    parsed = _split_spec(spec)
    if parsed is None:
        raise PretrainedNotFoundError(
            f"{spec!r} is neither a local path, a registry name nor a hub repository id (ORG/NAME); {_known(kind)}"
        )
    repo_id, fname, rev = parsed
    if fname is not None and filename is not None and fname != filename:
        raise PretrainedNotFoundError(f"{spec}: names the file {fname!r} but filename={filename!r}")
    if rev is not None and revision is not None and rev != revision:
        raise PretrainedNotFoundError(f"{spec}: names the revision {rev!r} but revision={revision!r}")
    fname, rev = fname or filename, rev or revision
    if fname is not None:
        for e in REGISTRY.values():  # a released file asked for by its path: still check the kind
            if e.repo_id == repo_id and e.filename == fname:
                _check_kind(f"{repo_id}/{fname} ({e.name})", e.kind, kind)
        return _fetch(repo_id, fname, revision=rev, label=spec, **kw)
    released = [e for e in REGISTRY.values() if e.repo_id == repo_id and e.filename is not None]
    if released:  # a released repository: plain checkpoints, no config.json
        if kind is None:
            raise PretrainedNotFoundError(
                f"{repo_id} holds several checkpoints: name one ({', '.join(e.name for e in released)}) "
                f"or pass filename= ({', '.join(e.filename for e in released)})"
            )
        default = REGISTRY[DEFAULT_FOR_KIND[kind]]
        if default.repo_id != repo_id:
            default = next((e for e in released if e.kind == kind), None)
        if default is None:
            raise PretrainedNotFoundError(f"{repo_id} has no {kind} checkpoint; {_known(kind)}")
        others = [e.name for e in released if e.kind == kind and e is not default]
        logger.info(
            "%s: taking %s (%s)%s",
            repo_id,
            default.filename,
            default.name,
            f"; the others: {', '.join(others)} (or pass filename=)" if others else "",
        )
        return _fetch(repo_id, default.filename, revision=rev, label=spec, **kw)
    try:
        return _fetch_export(repo_id, revision=rev, label=spec, **kw)
    except _NoSuchFile:
        raise PretrainedNotFoundError(
            f"{repo_id}{_at(rev)} holds no config.json + model.safetensors (not a save_pretrained export): "
            "pass filename= for a checkpoint in it"
        ) from None


def load_pretrained(
    cls,
    kind: str,
    name_or_path: str | os.PathLike,
    load_export,
    *,
    filename: str | None = None,
    revision: str | None = None,
    device=None,
    dtype=None,
    use_ema: bool = True,
    trust_remote_code: bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    overrides: dict | None = None,
):
    """The body of ``RecTok.from_pretrained`` / ``DiTDH.from_pretrained`` (``cls``, ``kind``).

    Resolves ``name_or_path`` (:func:`resolve_pretrained`), then loads a ``save_pretrained`` directory with
    ``load_export(path)`` (the class's own format), a released file (or any checkpoint file when there
    are config ``overrides``) with ``cls.from_official``, and anything else (checkpoint files, run directories) with
    :func:`rectok_fast.models.loading.load_tokenizer` / ``load_dit``; then ``device`` / ``dtype``."""
    from .models import loading

    path = resolve_pretrained(
        name_or_path, kind, filename=filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        model = load_export(path)
    elif overrides or is_released_file(path):
        # a released file straight to from_official: DiTDH's memory-maps it, so whatever else the
        # checkpoint holds (the raw weights, optimizer state) is never read into memory
        if os.path.isdir(path):
            raise ValueError(
                f"{cls.__name__}.from_pretrained: config overrides need an export or a checkpoint file, not {path}"
            )
        model = cls.from_official(path, use_ema=use_ema, trust_remote_code=trust_remote_code, **overrides)
    else:
        load = loading.load_tokenizer if kind == "tokenizer" else loading.load_dit
        model = load(path, prefer_ema=use_ema, trust_remote_code=trust_remote_code)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def download(
    specs: list[str],
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
) -> list[str]:
    """Fetch each spec into the hub cache (a local path is returned as it is); the local paths."""
    return [
        resolve_pretrained(s, None, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        for s in specs
    ]


# ----------------------------------------------------------------------------- rectok-fast download


def list_text() -> str:
    width = max(map(len, REGISTRY))
    lines = [f"{'name':<{width}}  {'kind':<9}  {'file':<45}  description"]
    for e in REGISTRY.values():
        where = f"{e.repo_id}/{e.filename or '(export)'}" + (f"@{e.revision}" if e.revision else "")
        lines.append(f"{e.name:<{width}}  {e.kind:<9}  {where:<45}  {e.description}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast download",
        description=(
            "Fetch released (or your own) weights into the Hugging Face cache and print one local path per "
            "line, in the order given. NAME: a registry name (--list), a hub repository id ORG/NAME "
            "(ORG/NAME/file.pth, @REVISION), or a local path (printed as it is). HF_HUB_CACHE / HF_HOME "
            "choose the cache, HF_HUB_OFFLINE=1 checks the cache only."
        ),
    )
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--revision", default=None, help="branch, tag or commit hash (default: main, or the name's pin)")
    p.add_argument("--cache-dir", default=None, help="instead of HF_HUB_CACHE")
    p.add_argument("--list", action="store_true", help="list the registry names and exit")
    return p


def main(argv: list[str] | None = None) -> list[str]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list:
        print(list_text())
        return []
    if not args.names:
        p.error("name at least one model (rectok-fast download --list shows the registry)")
    out = []
    for name in args.names:  # a failure is a PretrainedNotFoundError: one line and exit 2 from the CLI
        path = resolve_pretrained(name, None, revision=args.revision, cache_dir=args.cache_dir)
        print(path, flush=True)
        out.append(path)
    return out


if __name__ == "__main__":
    main()
