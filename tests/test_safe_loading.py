"""Trust policy: no file we are handed runs code (issue 11 §1).

A crafted pickle must not execute through any loader (``RecTok.from_official``, ``DiTDH.from_official``,
``load_tokenizer``, ``load_dit``, ``load_checkpoint``, training resume) nor CLI command (``stats
--tokenizer``, ``sample --dit``, ``train-dit --resume``); the error names the unsafe global and the
opt-in.  Released-layout checkpoints (an ``argparse.Namespace`` holding paths and NumPy scalars) load
without the opt-in; our own checkpoints need no allow-list at all; the opt-in works and warns.
Also: ``index.json`` shard names cannot leave the latent cache directory.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import logging
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from rectok_fast import cli
from rectok_fast.config import save_config
from rectok_fast.data.latents import LatentCacheDataset, shard_path
from rectok_fast.models.ditdh import DiTDH, DiTDHConfig
from rectok_fast.models.loading import load_dit, load_tokenizer, official_state_dict
from rectok_fast.models.rectok import RecTok, RecTokConfig
from rectok_fast.utils.checkpoint import (
    TRUST_FLAG,
    TrustRemoteCodeWarning,
    UnsafeCheckpointError,
    load_checkpoint,
    safe_torch_load,
    trusting_remote_code,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling calls ``builtins.exec`` with code that creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _PathTouch:
    """Tries to sneak through the pathlib allow-list: ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.PosixPath(self.marker),))


def _tiny_rectok() -> RecTok:
    torch.manual_seed(0)
    return RecTok(
        RecTokConfig(
            img_size=32,
            token_channels=4,
            encoder=(64, 1, 2),
            decoder=(64, 1, 2),
            sem_decoder=(32, 1, 2),
            teachers={"t": 8},
        )
    )


def _tiny_dit() -> DiTDH:
    torch.manual_seed(0)
    return DiTDH(DiTDHConfig(in_channels=4, input_size=2, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2)))


def _official_args(tmp_path) -> argparse.Namespace:
    """What the released run scripts pickle beside the weights."""
    return argparse.Namespace(
        output_dir=pathlib.Path(tmp_path) / "out",
        data_path=pathlib.PurePosixPath("/data/imagenet"),
        lr=np.float64(1e-4),
        seed=np.int64(0),
        dtype=np.dtype("float32"),
        use_ema=np.bool_(True),
        img_size=256,
        name="rectok_bb",
    )


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield str(path)
    assert not path.exists(), "the pickle payload ran"


def _evil_files(tmp_path, marker: str) -> dict[str, str]:
    """The payload in every container a loader might meet: a torch zip checkpoint (an official layout
    and a training-checkpoint layout), a legacy torch file, a raw pickle, and the pathlib trick."""
    sd = {"w": torch.zeros(2)}
    files = {
        "zip_official": ({"model": sd, "model_ema": sd, "args": _Payload(marker)}, {}),
        "zip_training": (
            {"model": sd, "config": {"kind": "dit"}, "rng": {"numpy": _Payload(marker)}},
            {},
        ),
        "legacy": ({"model": sd, "args": _Payload(marker)}, {"_use_new_zipfile_serialization": False}),
        "pathlib_touch": ({"model": sd, "args": _PathTouch(marker)}, {}),
    }
    out = {}
    for name, (obj, kw) in files.items():
        out[name] = str(tmp_path / f"{name}.pt")
        torch.save(obj, out[name], **kw)
    out["raw_pickle"] = str(tmp_path / "raw_pickle.pth")
    with open(out["raw_pickle"], "wb") as f:
        pickle.dump({"model": sd, "args": _Payload(marker)}, f)
    return out


_EXPECTED_GLOBAL = {
    "zip_official": "builtins.exec",
    "zip_training": "builtins.exec",
    "legacy": "builtins.exec",
    "raw_pickle": "builtins.exec",
    "pathlib_touch": "builtins.getattr",  # pickle spells a method as getattr(PosixPath, "touch")
}

LOADERS = {
    "RecTok.from_official": lambda p: RecTok.from_official(p),
    "DiTDH.from_official": lambda p: DiTDH.from_official(p),
    "load_tokenizer": lambda p: load_tokenizer(p),
    "load_dit": lambda p: load_dit(p),
    "load_checkpoint": lambda p: load_checkpoint(p),
    "official_state_dict": lambda p: official_state_dict(p),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_malicious_pickle_never_runs_through_a_loader(loader, tmp_path, marker):
    for kind, path in _evil_files(tmp_path, marker).items():
        with pytest.raises(UnsafeCheckpointError) as e:
            LOADERS[loader](path)
        msg = str(e.value)
        assert _EXPECTED_GLOBAL[kind] in msg, (kind, msg)
        assert _EXPECTED_GLOBAL[kind] in e.value.unsafe_globals
        assert "trust_remote_code=True" in msg and TRUST_FLAG in msg
        assert path in msg
        assert not os.path.exists(marker), f"{loader} ran the payload of {kind}"


def test_malicious_pickle_in_a_run_directory(tmp_path, marker):
    """``load_tokenizer(run_dir)`` follows ``checkpoints/latest.pt``: the same refusal."""
    evil = _evil_files(tmp_path, marker)["zip_training"]
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    os.replace(evil, run / "latest.pt")
    for fn in (load_tokenizer, load_dit):
        with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
            fn(str(tmp_path / "run"))


def _cli_refusal(argv: list[str], capsys) -> str:
    """Run ``rectok-fast ARGV`` in-process; it must fail.  The text of the refusal: the exception's
    message, or stderr where the CLI turns user errors into one line and a non-zero exit."""
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None), argv
    return capsys.readouterr().err


def test_cli_stats_and_sample_refuse_malicious_files(tmp_path, marker, capsys):
    evil = _evil_files(tmp_path, marker)["zip_official"]
    msg = _cli_refusal(["stats", "--tokenizer", evil, "--device", "cpu"], capsys)
    assert "builtins.exec" in msg and TRUST_FLAG in msg
    msg = _cli_refusal(
        ["sample", "--dit", evil, "--tokenizer", evil, "--out", str(tmp_path / "s"), "--device", "cpu"], capsys
    )
    assert "builtins.exec" in msg and TRUST_FLAG in msg
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_cli_entry_point_refuses_malicious_tokenizer(tmp_path, marker):
    """The real ``rectok-fast`` process: a non-zero exit, the global named on stderr, no payload run."""
    evil = _evil_files(tmp_path, marker)["zip_official"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "rectok_fast.cli", "stats", "--tokenizer", evil, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert r.returncode != 0
    assert "builtins.exec" in r.stderr and TRUST_FLAG in r.stderr, r.stderr[-2000:]


def _tiny_dit_config(tmp_path) -> tuple[str, object]:
    from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg

    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    cfg = tiny_dit_cfg(str(tmp_path / "run"), lat, max_steps=2)
    path = str(tmp_path / "dit.yaml")
    save_config(cfg, path)
    return path, cfg


def test_resume_refuses_malicious_latest(tmp_path, marker, capsys):
    """``train-dit --resume`` (CLI and Trainer) with a crafted ``latest.pt``: refused before any use."""
    from rectok_fast.train.dit import DiTTrainer

    cfg_path, cfg = _tiny_dit_config(tmp_path)
    evil = _evil_files(tmp_path, marker)["zip_training"]
    ckpt_dir = pathlib.Path(cfg.out) / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    os.replace(evil, ckpt_dir / "latest.pt")
    msg = _cli_refusal(["train-dit", "--config", cfg_path, "--out", cfg.out, "--resume"], capsys)
    assert "builtins.exec" in msg and TRUST_FLAG in msg
    cfg.resume = True
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        DiTTrainer(cfg)


# ----------------------------------------------------------------------------- what loads safely


def test_official_layout_with_namespace_loads_without_opt_in(tmp_path, recwarn):
    tok, dit = _tiny_rectok(), _tiny_dit()
    tsd = {k: v for k, v in tok.state_dict().items() if not k.startswith("latent_")}
    dsd = dit.state_dict()
    args = _official_args(tmp_path)
    tok_path, dit_path = tmp_path / "rectok.pth", tmp_path / "ditdh.pth"
    torch.save(
        {"model": {"module." + k: v for k, v in tsd.items()}, "model_ema": tsd, "args": args, "epoch": 3}, tok_path
    )
    torch.save({"model": dsd, "model_ema": dsd, "args": args, "epoch": np.int64(3)}, dit_path)
    # the file really needs those globals: a bare weights_only load refuses it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tok_path, weights_only=True)
    loaded = safe_torch_load(tok_path)
    assert loaded["args"].output_dir == args.output_dir and loaded["args"].lr == args.lr
    assert loaded["args"].dtype == np.dtype("float32")
    for m in (RecTok.from_official(str(tok_path)), load_tokenizer(str(tok_path))):
        for k, v in tsd.items():
            assert torch.equal(m.state_dict()[k], v), k
    for m in (DiTDH.from_official(str(dit_path)), load_dit(str(dit_path))):
        for k, v in dsd.items():
            assert torch.equal(m.state_dict()[k], v), k
    assert not [w for w in recwarn if issubclass(w.category, TrustRemoteCodeWarning)]


def test_allow_list_is_scoped_to_one_load(tmp_path):
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    safe_torch_load(tmp_path / "ns.pt")
    with pytest.raises(pickle.UnpicklingError):  # nothing was added globally
        torch.load(tmp_path / "ns.pt", weights_only=True)


def test_our_training_checkpoints_need_no_allow_list(tmp_path):
    """A DiT and a tokenizer run: every checkpoint loads with a bare ``weights_only=True``."""
    from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

    from rectok_fast.train.dit import DiTTrainer
    from rectok_fast.train.tokenizer import TokenizerTrainer

    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    DiTTrainer(tiny_dit_cfg(str(tmp_path / "dit"), lat, max_steps=1)).fit()
    TokenizerTrainer(tiny_tokenizer_cfg(str(tmp_path / "tok"), max_steps=1)).fit()
    for run in ("dit", "tok"):
        path = tmp_path / run / "checkpoints" / "latest.pt"
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert isinstance(load_dit(str(tmp_path / "dit")), DiTDH)
    assert isinstance(load_tokenizer(str(tmp_path / "tok")), RecTok)


def _old_format_checkpoint(tmp_path) -> str:
    """A training checkpoint as written before the safe format: the NumPy RNG state is an ndarray."""
    from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg

    from rectok_fast.train.dit import DiTTrainer

    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    cfg = tiny_dit_cfg(str(tmp_path / "old"), lat, max_steps=1)
    DiTTrainer(cfg).fit()
    path = os.path.join(cfg.out, "checkpoints", "latest.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()
    os.remove(path)
    torch.save(state, path)
    return cfg


def test_old_checkpoint_needs_the_opt_in_and_says_so(tmp_path):
    from rectok_fast.train.dit import DiTTrainer

    cfg = _old_format_checkpoint(tmp_path)
    path = os.path.join(cfg.out, "checkpoints", "latest.pt")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(path)
    assert "numpy" in str(e.value) and "older rectok_fast" in str(e.value) and TRUST_FLAG in str(e.value)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # the package logger may not propagate to the root (setup_logging)
    logging.getLogger("rectok_fast").addHandler(handler)
    try:
        with pytest.warns(TrustRemoteCodeWarning):
            state = load_checkpoint(path, trust_remote_code=True)
    finally:
        logging.getLogger("rectok_fast").removeHandler(handler)
    assert any("trust_remote_code=True" in r.getMessage() for r in records)
    assert isinstance(state["rng"]["numpy"], tuple)
    # resume from it under the CLI-style opt-in; the next save is in the safe format
    cfg.resume, cfg.max_steps = True, 2
    with trusting_remote_code(True), pytest.warns(TrustRemoteCodeWarning):
        tr = DiTTrainer(cfg)
    assert tr.step == 1
    tr.fit()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


def test_opt_in_runs_the_unpickler_and_warns(tmp_path, marker):
    """``trust_remote_code=True`` is a real full unpickle (so it must be asked for): shown with a
    payload written to a second marker, which this test then removes."""
    other = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Payload(str(other))}, path)
    with pytest.warns(TrustRemoteCodeWarning, match="trust_remote_code=True"):
        safe_torch_load(path, trust_remote_code=True)
    assert other.exists()
    other.unlink()
    with trusting_remote_code(True), pytest.warns(TrustRemoteCodeWarning):
        safe_torch_load(path)
    assert other.exists()
    other.unlink()
    with trusting_remote_code(True), pytest.raises(UnsafeCheckpointError):  # an explicit False wins
        safe_torch_load(path, trust_remote_code=False)
    assert not other.exists()


def test_cli_flag_turns_the_opt_in_on(tmp_path, capsys):
    """``rectok-fast --trust-remote-code sample --dit OLD ...`` loads a file that needs it (then stops
    at the missing tokenizer); without the flag the same command refuses the DiT."""
    dit = _tiny_dit()
    path = tmp_path / "dit_with_array.pth"
    torch.save({"model": dit.state_dict(), "args": {"mean": np.zeros(3)}}, path)
    argv = ["sample", "--dit", str(path), "--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    msg = _cli_refusal(argv + ["--device", "cpu"], capsys)
    assert "numpy._core.multiarray._reconstruct" in msg or "numpy.core.multiarray._reconstruct" in msg, msg
    with pytest.warns(TrustRemoteCodeWarning, match="load_dit"):
        msg = _cli_refusal([TRUST_FLAG, *argv, "--device", "cpu"], capsys)  # stops at the missing tokenizer
    assert "missing" in msg and "_reconstruct" not in msg, msg


# ----------------------------------------------------------------------------- every torch.load


def _torch_load_calls():
    for root in ("rectok_fast", "tests", "benchmarks", "scripts", "tools", "examples"):
        for p in sorted((REPO / root).rglob("*.py")) if (REPO / root).is_dir() else []:
            tree = ast.parse(p.read_text(), filename=str(p))
            parents = {}
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    parents[child] = node
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                    if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                        fn = node
                        while fn in parents and not isinstance(fn, ast.FunctionDef):
                            fn = parents[fn]
                        yield p.relative_to(REPO).as_posix(), node, getattr(fn, "name", "<module>")


def test_every_torch_load_is_weights_only():
    """Every ``torch.load`` in the package, tests and benchmarks passes ``weights_only=True``; the
    one exception is the opt-in branch of :func:`safe_torch_load`."""
    calls = list(_torch_load_calls())
    assert len(calls) > 5
    unsafe = []
    for path, node, fn in calls:
        kw = {k.arg: k.value for k in node.keywords}
        ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if not ok:
            unsafe.append((path, node.lineno, fn))
    assert [(p, fn) for p, _, fn in unsafe] == [("rectok_fast/utils/checkpoint.py", "safe_torch_load")], unsafe


# ----------------------------------------------------------------------------- latent cache paths


def _cache_with_shard_name(tmp_path, name: str) -> str:
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    save_file(
        {"moments": torch.zeros(2, 4, 8), "labels": torch.zeros(2, dtype=torch.long)}, tmp_path / "outside.safetensors"
    )
    index = {"version": 1, "num": 2, "grid": 2, "channels": 4, "shards": [{"file": name, "count": 2}], "meta": {}}
    (cache / "index.json").write_text(json.dumps(index))
    return str(cache)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS", "..\\outside.safetensors", "", None]
)
def test_latent_index_cannot_escape_the_cache(tmp_path, name):
    if name == "ABS":
        name = str(tmp_path / "outside.safetensors")
    cache = _cache_with_shard_name(tmp_path, name)
    with pytest.raises(ValueError, match="refused") as e:
        LatentCacheDataset(cache)
    assert "index.json" in str(e.value)


def test_latent_index_relative_names_still_load(tmp_path):
    cache = _cache_with_shard_name(tmp_path, "shard.safetensors")
    os.replace(tmp_path / "outside.safetensors", os.path.join(cache, "shard.safetensors"))
    assert len(LatentCacheDataset(cache)) == 2
    assert shard_path("c", "sub/x.safetensors") == os.path.join("c", "sub/x.safetensors")


# ----------------------------------------------------------------------------- moved names


def test_moved_loaders_keep_warning_aliases():
    import rectok_fast.models.loading as loading
    import rectok_fast.utils as utils
    from rectok_fast.train import builders

    for name in ("load_tokenizer", "load_dit", "build_rectok", "build_ditdh", "teacher_width"):
        with pytest.warns(DeprecationWarning, match="models.loading"):
            assert getattr(builders, name) is getattr(loading, name)
    with pytest.warns(DeprecationWarning, match="rectok_fast.utils"):
        assert builders.write_json is utils.write_json


def test_eval_does_not_import_train():
    code = "import sys, rectok_fast.eval.sample, rectok_fast.eval.evaluate; print([m for m in sys.modules if m.startswith('rectok_fast.train')])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
