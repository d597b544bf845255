"""The released weights by name (issue 12 §1): the registry, ``from_pretrained`` over the Hugging Face
cache, ``rectok-fast download`` and ``rectok-fast sample --pretrained/--tokenizer/--guide``.

Nothing here touches the network: each test lays out a hub cache in a temporary directory (the
``models--ORG--NAME/{blobs,snapshots/<commit>,refs/<ref>}`` structure ``huggingface_hub`` reads), points
``HF_HOME`` / ``HF_HUB_CACHE`` at it, sets ``HF_HUB_OFFLINE=1`` and fails any socket connection.  The
checkpoints are tiny random models in the released layout: ``model`` (DDP-prefixed) and ``model_ema``
state dicts with the official key names, a pickled ``argparse.Namespace`` (with paths and NumPy
scalars) under ``args``, and for the tokenizer the frozen teacher weights the official files carry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import socket
import warnings

import numpy as np
import pytest
import torch

from rectok_fast import cli, hub
from rectok_fast.errors import CheckpointError
from rectok_fast.hub import REGISTRY, PretrainedNotFoundError, resolve_pretrained
from rectok_fast.models.ditdh import DiTDH, DiTDHConfig
from rectok_fast.models.rectok import DefaultLatentStatsWarning, RecTok, RecTokConfig

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
REPO = "QingyuShi/RecTok"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


# ----------------------------------------------------------------------------- tiny released-layout files


def _tiny_rectok(seed: int) -> RecTok:
    torch.manual_seed(seed)
    # widths 128/64 so that the head counts the loader infers from widths (width // 64) are the true ones
    cfg = RecTokConfig(
        img_size=32,
        token_channels=4,
        encoder=(128, 1, 2),
        decoder=(128, 1, 2),
        sem_decoder=(64, 1, 1),
        teachers={"t": 8},
    )
    return RecTok(cfg).eval()


def _tiny_dit(seed: int, width: int = 32) -> DiTDH:
    torch.manual_seed(seed)
    cfg = DiTDHConfig(
        in_channels=4, input_size=2, hidden_size=(width, 48), depth=(1, 1), num_heads=(2, 2), num_classes=1000
    )
    m = DiTDH(cfg).eval()
    with torch.no_grad():  # the official init zeroes adaLN and the output: make the velocity non-trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _official_args() -> argparse.Namespace:
    return argparse.Namespace(
        output_dir=pathlib.PosixPath("/runs/out"), lr=np.float64(1e-4), seed=np.int64(0), img_size=256, name="rectok"
    )


def _official_file(model: torch.nn.Module, path: pathlib.Path, teacher_junk: bool = False) -> dict:
    """Write ``model`` as a released checkpoint; its EMA weights are the model's, the raw ones differ."""
    ema = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("latent_")}
    raw = {"module." + k: v + 1.0 for k, v in ema.items()}
    if teacher_junk:  # the released tokenizers carry their frozen teachers
        ema["sem_foundation_models.t.embeddings.patch_embeddings.weight"] = torch.zeros(8, 3, 4, 4)
    torch.save({"model": raw, "model_ema": ema, "args": _official_args(), "epoch": np.int64(3)}, path)
    return ema


def _put(
    cache: pathlib.Path, repo_id: str, files: dict[str, pathlib.Path], commit: str, refs=("main",)
) -> pathlib.Path:
    """Lay ``files`` out as ``huggingface_hub`` does: content-addressed blobs, snapshot symlinks, refs."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        dst = snap / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath(blob, dst.parent))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test_hub: network access to {address} attempted")

    def refuse_lookup(host, *a, **k):
        attempts.append(host)
        raise OSError(f"test_hub: name lookup of {host} attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    yield attempts
    assert not attempts, f"the network was touched: {attempts}"


@pytest.fixture
def hub_env(tmp_path, monkeypatch, no_network):
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def released(hub_env, tmp_path):
    """The five released files (tiny), in the cache at ``COMMIT`` (``main``); ``OLD_COMMIT`` (tag
    ``v0``) holds other weights for ``RecTok.pth`` and ``ditdhs_epoch_0029.pth``."""
    src = tmp_path / "src"
    src.mkdir()
    models = {
        "rectok": _tiny_rectok(1),
        "rectok-decft": _tiny_rectok(2),
        "ditdh-xl-80e": _tiny_dit(3),
        "ditdh-xl-600e": _tiny_dit(4),
        "ditdh-s-30e": _tiny_dit(5, width=16),
    }
    files, ema = {}, {}
    for name, m in models.items():
        fname = REGISTRY[name].filename
        ema[name] = _official_file(m, src / fname, teacher_junk=name.startswith("rectok"))
        files[fname] = src / fname
    snap = _put(hub_env, REPO, files, COMMIT)
    old_dir = src / "old"
    old_dir.mkdir()
    old = {"rectok": _tiny_rectok(11), "ditdh-s-30e": _tiny_dit(15, width=16)}
    for name, m in old.items():
        _official_file(m, old_dir / REGISTRY[name].filename)
    _put(hub_env, REPO, {REGISTRY[n].filename: old_dir / REGISTRY[n].filename for n in old}, OLD_COMMIT, refs=("v0",))
    return {"models": models, "ema": ema, "old": old, "snapshot": snap, "cache": hub_env}


def _same_weights(model: torch.nn.Module, ref: torch.nn.Module) -> bool:
    sd, rsd = model.state_dict(), ref.state_dict()
    return sd.keys() == rsd.keys() and all(torch.equal(sd[k].float().cpu(), rsd[k].float()) for k in rsd)


# ----------------------------------------------------------------------------- the registry


def test_registry_holds_the_released_files():
    want = {
        "rectok": ("RecTok.pth", "tokenizer"),
        "rectok-decft": ("RecTok_decft.pth", "tokenizer"),
        "ditdh-xl-80e": ("ditdhxl_epoch_0079.pth", "dit"),
        "ditdh-xl-600e": ("ditdhxl_epoch_0599.pth", "dit"),
        "ditdh-s-30e": ("ditdhs_epoch_0029.pth", "dit"),
    }
    for name, (fname, kind) in want.items():
        e = REGISTRY[name]
        assert (e.repo_id, e.filename, e.kind, e.loader) == (REPO, fname, kind, "official"), name


# ----------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_by_registry_name(released):
    models = released["models"]
    for name in ("rectok", "rectok-decft"):
        m = RecTok.from_pretrained(name)
        assert isinstance(m, RecTok) and not m.training
        assert m.config.encoder == (128, 1, 2) and m.config.teachers == {"t": 8}
        assert _same_weights(m, models[name]), name  # the EMA weights, the teachers dropped
    for name in ("ditdh-xl-80e", "ditdh-xl-600e", "ditdh-s-30e"):
        m = DiTDH.from_pretrained(name)
        assert m.config == models[name].config
        assert _same_weights(m, models[name]), name
    x, t, y = torch.randn(2, 4, 2, 2), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(DiTDH.from_pretrained("ditdh-xl-600e")(x, t, y), models["ditdh-xl-600e"](x, t, y))
    # the raw (non-EMA) weights on request
    raw = DiTDH.from_pretrained("ditdh-s-30e", use_ema=False)
    assert torch.equal(raw.x_embedder.proj.weight, models["ditdh-s-30e"].x_embedder.proj.weight + 1.0)


def test_released_files_go_straight_to_from_official(released, monkeypatch, tmp_path):
    """A released file skips the generic loaders (which read the whole checkpoint to sniff its kind)."""
    from rectok_fast.models import loading

    def refuse(*a, **k):
        raise AssertionError("generic loader used for a released file")

    monkeypatch.setattr(loading, "load_dit", refuse)
    monkeypatch.setattr(loading, "load_tokenizer", refuse)
    assert _same_weights(DiTDH.from_pretrained("ditdh-s-30e"), released["models"]["ditdh-s-30e"])
    assert _same_weights(RecTok.from_pretrained(f"{REPO}/RecTok.pth"), released["models"]["rectok"])
    shutil.copy(released["snapshot"] / "ditdhs_epoch_0029.pth", tmp_path / "copy.pth")
    with pytest.raises(AssertionError, match="generic loader"):  # a local checkpoint may be ours: sniffed
        DiTDH.from_pretrained(tmp_path / "copy.pth")


def test_from_pretrained_device_and_dtype(released):
    for cls, name in ((RecTok, "rectok"), (DiTDH, "ditdh-s-30e")):
        m = cls.from_pretrained(name, device="cpu", dtype=torch.bfloat16)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, name
        assert {p.device.type for p in m.parameters()} == {"cpu"}
        ref = released["models"][name].state_dict()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v.float(), ref[k].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_from_pretrained_by_repo_id_and_filename(released):
    models = released["models"]
    assert _same_weights(RecTok.from_pretrained(REPO, filename="RecTok_decft.pth"), models["rectok-decft"])
    assert _same_weights(RecTok.from_pretrained(f"{REPO}/RecTok_decft.pth"), models["rectok-decft"])
    assert _same_weights(DiTDH.from_pretrained(REPO, filename="ditdhxl_epoch_0079.pth"), models["ditdh-xl-80e"])
    # the repository alone (the call that used to fail on config.json): the kind's default file
    assert _same_weights(RecTok.from_pretrained(REPO), models["rectok"])
    assert _same_weights(DiTDH.from_pretrained(REPO), models["ditdh-xl-600e"])
    # a released file of the other kind, asked for by path: the kind is still checked
    with pytest.raises(PretrainedNotFoundError, match="DiTDH checkpoint, not a RecTok"):
        RecTok.from_pretrained(REPO, filename="ditdhs_epoch_0029.pth")


def test_from_pretrained_revision(released):
    new, old = released["models"], released["old"]
    for rev in (OLD_COMMIT, "v0"):
        assert _same_weights(RecTok.from_pretrained("rectok", revision=rev), old["rectok"]), rev
        assert _same_weights(
            DiTDH.from_pretrained(REPO, filename="ditdhs_epoch_0029.pth", revision=rev), old["ditdh-s-30e"]
        )
        assert _same_weights(DiTDH.from_pretrained(f"{REPO}/ditdhs_epoch_0029.pth@{rev}"), old["ditdh-s-30e"])
    for rev in (None, "main", COMMIT):
        assert _same_weights(RecTok.from_pretrained("rectok", revision=rev), new["rectok"]), rev
    # a file that revision does not have, offline: one line naming the name and the revision
    with pytest.raises(PretrainedNotFoundError, match=r"ditdh-xl-600e: .*ditdhxl_epoch_0599.pth@v0") as e:
        DiTDH.from_pretrained("ditdh-xl-600e", revision="v0")
    assert "\n" not in str(e.value)


def test_local_paths_come_first(released, tmp_path, monkeypatch):
    models = released["models"]
    # a local directory named like a registry name wins over the name
    monkeypatch.chdir(tmp_path)
    mine = _tiny_rectok(7)
    mine.set_latent_stats(torch.full((4,), 0.5), torch.full((4,), 2.0))
    mine.save_pretrained(tmp_path / "rectok")
    m = RecTok.from_pretrained("rectok")
    assert _same_weights(m, mine) and torch.equal(m.latent_std, torch.full((4,), 2.0))
    # a local official file; a local directory + filename
    pth = released["snapshot"] / "RecTok_decft.pth"
    local = tmp_path / "files"
    local.mkdir()
    shutil.copy(pth, local / "tok.pth")
    assert _same_weights(RecTok.from_pretrained(local / "tok.pth"), models["rectok-decft"])
    assert _same_weights(RecTok.from_pretrained(str(local), filename="tok.pth"), models["rectok-decft"])
    dit = _tiny_dit(9)
    dit.save_pretrained(tmp_path / "dit_export")
    assert _same_weights(DiTDH.from_pretrained(tmp_path / "dit_export", device="cpu"), dit)
    # overrides reach the loader
    assert RecTok.from_pretrained(local / "tok.pth", attn_backend="math").config.attn_backend == "math"


def test_exports_pull_from_the_hub(hub_env, tmp_path):
    """A repository holding ``config.json`` + ``model.safetensors`` (what ``save_pretrained`` writes and
    ``huggingface_hub.upload_folder`` pushes) resolves to the export loader, statistics included."""
    tok, dit = _tiny_rectok(3), _tiny_dit(4)
    tok.set_latent_stats(torch.arange(4.0), torch.full((4,), 3.0))
    tok.save_pretrained(tmp_path / "tok")
    dit.save_pretrained(tmp_path / "dit")
    for name, d in (("me/tiny-tok", tmp_path / "tok"), ("me/tiny-dit", tmp_path / "dit")):
        _put(hub_env, name, {f: d / f for f in ("config.json", "model.safetensors")}, COMMIT)
    m = RecTok.from_pretrained("me/tiny-tok")
    assert _same_weights(m, tok) and torch.equal(m.latent_mean, torch.arange(4.0))
    assert os.path.isdir(resolve_pretrained("me/tiny-tok", "tokenizer"))
    assert _same_weights(DiTDH.from_pretrained("me/tiny-dit", revision=COMMIT), dit)
    with pytest.raises(CheckpointError, match="not a DiT"):
        DiTDH.from_pretrained("me/tiny-tok")
    with pytest.raises(CheckpointError, match="'ditdh' model, not a RecTok"):
        RecTok.from_pretrained("me/tiny-dit")
    # a registered name for one's own export
    hub.register_pretrained("my-tok", "me/tiny-tok", kind="tokenizer")
    try:
        assert _same_weights(RecTok.from_pretrained("my-tok"), tok)
        assert REGISTRY["my-tok"].loader == "export"
    finally:
        del REGISTRY["my-tok"]


def test_errors_are_one_line_and_name_the_known_names(hub_env):
    names = ", ".join(REGISTRY)
    cases = [
        (lambda: RecTok.from_pretrained("rectokk"), r"'rectokk' is neither a local path, a registry name nor a hub"),
        (lambda: DiTDH.from_pretrained("rectok"), r"rectok is a RecTok checkpoint, not a DiTDH one"),
        # the cache is empty and offline: the name, the file, why, the fix, the known names
        (lambda: RecTok.from_pretrained("rectok-decft"), r"rectok-decft: QingyuShi/RecTok/RecTok_decft.pth is not in"),
        (lambda: DiTDH.from_pretrained("me/missing"), r"me/missing: no local path of that name, and me/missing/config"),
        (lambda: RecTok.from_pretrained("rectok", filename="x.pth"), r"a registry name fixes its file"),
    ]
    for fn, pattern in cases:
        with pytest.raises(PretrainedNotFoundError, match=pattern) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg, msg
    with pytest.raises(PretrainedNotFoundError) as e:
        RecTok.from_pretrained("rectok-decft")
    assert "HF_HUB_OFFLINE" in str(e.value) and "rectok-fast download rectok-decft" in str(e.value)
    assert str(hub_env) in str(e.value) and names in str(e.value)
    with pytest.raises(PretrainedNotFoundError, match=r"known names: rectok, rectok-decft$"):
        RecTok.from_pretrained("nope")
    assert isinstance(e.value, FileNotFoundError)


# ----------------------------------------------------------------------------- CLI


def test_download_command(released, capsys):
    snap = released["snapshot"]
    out = cli.main(["download", "rectok-decft", "ditdh-s-30e", f"{REPO}/ditdhxl_epoch_0079.pth"])
    assert out == 0
    lines = capsys.readouterr().out.split()
    assert lines == [str(snap / f) for f in ("RecTok_decft.pth", "ditdhs_epoch_0029.pth", "ditdhxl_epoch_0079.pth")]
    assert all(os.path.isfile(p) for p in lines)
    cli.main(["download", "rectok", "--revision", "v0"])
    assert capsys.readouterr().out.strip().endswith(f"snapshots/{OLD_COMMIT}/RecTok.pth")
    cli.main(["download", "--list"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in REGISTRY) and "ditdhxl_epoch_0599.pth" in listing


def test_download_command_errors(hub_env, capsys):
    assert cli.main(["download", "ditdh-xl-600e"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rectok-fast download: error: ditdh-xl-600e:")
    assert "HF_HUB_OFFLINE" in err and "known names: " in err
    assert cli.main(["download", "not-a-model"]) == 2
    assert "known names: rectok, rectok-decft" in capsys.readouterr().err
    from rectok_fast.errors import UserError

    assert issubclass(PretrainedNotFoundError, UserError) and issubclass(PretrainedNotFoundError, FileNotFoundError)


def test_sample_command_resolves_names(released, tmp_path):
    """``sample --pretrained NAME --tokenizer NAME --guide NAME`` loads the three released models: the
    images equal those of the same models loaded by hand (autoguidance with the S model)."""
    from rectok_fast.eval.sample import generate
    from rectok_fast.utils.images import to_uint8_hwc

    out = tmp_path / "samples"
    argv = ["sample", "--pretrained", "ditdh-xl-600e", "--tokenizer", "rectok-decft", "--guide", "ditdh-s-30e"]
    argv += ["--scale", "1.5", "--num-images", "3", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    argv += ["--npz", "--out", str(out)]
    with pytest.warns(DefaultLatentStatsWarning, match="rectok-fast stats"):
        assert cli.main(argv) == 0
    got = np.load(out / "samples.npz")["arr_0"]
    models = released["models"]

    def by_hand(guide: str) -> np.ndarray:  # the first batch (indices 0, 1; balanced labels 0, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DefaultLatentStatsWarning)
            dit, tok, g = models["ditdh-xl-600e"], models["rectok-decft"], models[guide]
            imgs = generate(
                dit, tok, [0, 1], torch.tensor([0, 1]), steps=2, guidance="autoguidance", scale=1.5, guide_model=g
            )
        return to_uint8_hwc(imgs)

    np.testing.assert_array_equal(got[:2], by_hand("ditdh-s-30e"))
    # a different guide gives different images: the guide really is the S model
    assert not np.array_equal(got[:2], by_hand("ditdh-xl-80e"))


def test_sample_command_unknown_name_is_one_line(released, tmp_path, capsys):
    argv = ["sample", "--pretrained", "ditdh-xl-601e", "--tokenizer", "rectok", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ditdh-xl-601e" in err and "known names: " in err


def test_readme_released_section_runs(released, tmp_path, monkeypatch, capsys):
    """The README's "Sample from the released models" as written, on the tiny offline cache: ``download``,
    ``stats`` on the tokenizer path it printed (embedded images instead of ImageNet), ``sample`` with
    the statistics, then the Python block; with the statistics set nothing warns about defaults."""
    text = README.read_text()
    section = text[text.index("<!-- released:start -->") : text.index("<!-- released:end -->")]
    bash = section.split("```bash\n", 1)[1].split("```", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "rectok-fast download rectok-decft ditdh-xl-600e ditdh-s-30e" in bash
    assert '--tokenizer "$(rectok-fast download rectok-decft)"' in bash and "--out tok_stats" in bash
    assert "--pretrained ditdh-xl-600e --tokenizer rectok-decft --latent-stats tok_stats" in bash
    assert "--guide ditdh-s-30e" in bash
    monkeypatch.chdir(tmp_path)
    assert cli.main(["download", "rectok-decft", "ditdh-xl-600e", "ditdh-s-30e"]) == 0
    tok_path = capsys.readouterr().out.split()[0]
    stats = ["stats", "--tokenizer", tok_path, "--data", "embedded", "--max-images", "4", "--batch-size", "4"]
    assert cli.main([*stats, "--out", "tok_stats", "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "tok_stats" / "stats.json").read_text())
    assert len(saved["latent_mean"]) == 4 and saved["latent_std"] != [1.0] * 4
    assert not list(released["cache"].rglob("stats.json"))  # nothing written into the hub cache
    sample = ["sample", "--pretrained", "ditdh-xl-600e", "--tokenizer", "rectok-decft", "--latent-stats", "tok_stats"]
    sample += ["--guide", "ditdh-s-30e", "--scale", "1.29", "--steps", "2", "--num-images", "2", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DefaultLatentStatsWarning)
        assert cli.main([*sample, "--out", "samples/released"]) == 0
        # the export `stats` wrote is a tokenizer that carries the statistics
        assert cli.main([*sample[:4], "tok_stats", *sample[7:], "--npz", "--out", "s2"]) == 0
        scope: dict = {}
        exec(compile(code, "README.md[released]", "exec"), scope)
    assert tuple(scope["images"].shape) == (4, 3, 32, 32)
    assert torch.equal(scope["tok"].latent_mean, torch.tensor(saved["latent_mean"]))
    assert _same_weights(scope["guide"], released["models"]["ditdh-s-30e"])


# ----------------------------------------------------------------------------- default latent statistics


def test_detokenize_warns_on_default_stats():
    m = _tiny_rectok(0)
    tokens = torch.randn(1, 4, 2, 2)
    with pytest.warns(DefaultLatentStatsWarning, match="set_latent_stats"):
        m.detokenize(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DefaultLatentStatsWarning)
        m.reconstruct(torch.rand(1, 3, 32, 32) * 2 - 1)  # the statistics cancel: no warning
        m.set_latent_stats(torch.full((4,), 0.1), torch.full((4,), 1.5))
        m.detokenize(tokens)
    # back to the defaults (in place): the change is seen
    with torch.no_grad():
        m.latent_mean.zero_()
        m.latent_std.fill_(1.0)
    with pytest.warns(DefaultLatentStatsWarning):
        m.detokenize(tokens)
