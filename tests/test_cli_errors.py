"""Issue 11 §3: every user error ends with one stderr line ``rectok-fast CMD: error: ...`` naming the key,
file or argument, no traceback, exit status 2; ``--debug`` shows the traceback; bugs still raise.

Most cases call :func:`rectok_fast.cli.main` in-process (the code ``python -m rectok_fast.cli`` runs,
``sys.exit(main())``), which keeps the file fast on a CPU; one case runs the real process (and
tests/test_faults.py another, for SIGTERM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

from rectok_fast import cli
from rectok_fast.config import load_config, parse_overrides
from rectok_fast.errors import ConfigError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the tiny DiT of tests/pipeline_helpers.py as command-line overrides
DIT_OVER = [
    "device=cpu",
    "model.latent_channels=8",
    "model.extra.hidden_size=[32,48]",
    "model.extra.depth=[1,1]",
    "model.extra.num_heads=[2,2]",
    "optim.total_steps=50",
    "optim.amp=none",
    "data.global_batch_size=8",
    "log.progress=false",
]


def _one_error_line(capsys, cmd: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"rectok-fast {cmd}: error: "), err[-3000:]
    for n in needles:
        assert n in last, (n, last)
    return last


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert cli.main(argv) == 2
    return _one_error_line(capsys, argv[0], *needles)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny tokenizer export, a 4-class DiT export and a latent cache of 4 classes (nothing trained)."""
    from rectok_fast.models.loading import build_ditdh, build_rectok

    d = tmp_path_factory.mktemp("models")
    tcfg = tiny_tokenizer_cfg(str(d / "unused"))
    tok = build_rectok(tcfg.model, 32)
    tok.save_pretrained(str(d / "tok"))
    lat = synthetic_latent_cache(str(d / "lat"))
    dcfg = tiny_dit_cfg(str(d / "unused"), lat)
    dit = build_ditdh(dcfg.model, 8, 2, 4)
    dit.save_pretrained(str(d / "dit"))
    torch.save({"model": dit.state_dict()}, str(d / "dit_official.pth"))
    return {"tok": str(d / "tok"), "dit": str(d / "dit"), "dit_pth": str(d / "dit_official.pth"), "lat": lat}


# ----------------------------------------------------------------------------- config and arguments


def test_overrides_after_options_are_parsed(tmp_path, capsys):
    """The form train/dit.py documents: `--config X data.latents=Y --out Z distributed=fsdp` parses (then
    fails on the missing cache, naming it, instead of `unrecognized arguments`)."""
    missing = str(tmp_path / "no_cache")
    argv = ["train-dit", "--config", "dit/tiny", f"data.latents={missing}", "--out", str(tmp_path / "x")]
    argv += ["distributed=fsdp", "device=cpu"]
    _fails(capsys, argv, "no_cache", "index.json")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.blr=fast", "optim.blr"),
        ("data.global_batch_size=0", "data.global_batch_size"),
        ("log.ckpt_every=0", "log.ckpt_every"),
        ("optim.blrr=1", "blrr"),
        ("data.image_size=big", "data.image_size"),
        ("novalue", "key=value"),
        ("optim.betas=[0.9", "optim.betas"),
        ("data.embedded_len=4", "smaller than one global batch"),
        ("data.image_size=33", "not a multiple of patch_size"),
        ("model.extra.nope=1", "'nope'"),
        ("model.extra.gamma=fast", "gamma"),
        ("loss.perceptual_enabled=true loss.lpips_path=/nonexistent/lpips", "/nonexistent/lpips"),
    ],
)
def test_bad_override_is_one_line(tmp_path, capsys, override, needle):
    _fails(capsys, ["train-tokenizer", "--out", str(tmp_path / "o"), "--max-steps", "1", *override.split()], needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda without a GPU")
def test_missing_device_is_one_line(tmp_path, capsys):
    _fails(capsys, ["train-tokenizer", "--out", str(tmp_path / "o"), "--device", "cuda"], "--device cuda")


def test_kernel_noise_without_triton_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter
    argv = ["train-tokenizer", "--out", str(tmp_path / "o"), "device=cpu", "noise=kernel", "--max-steps", "1"]
    _fails(capsys, argv, "noise=kernel", "noise=materialized")


def test_bad_yaml_value_is_one_line(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("kind: dit\nlog:\n  ckpt_every: 0\n")
    _fails(capsys, ["train-dit", "--config", str(p), "--out", str(tmp_path / "o")], "log.ckpt_every")
    _fails(capsys, ["train-dit", "--config", str(tmp_path / "nope.yaml")], "nope.yaml")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_max_steps_must_be_positive(tmp_path, capsys, n):
    _fails(capsys, ["train-tokenizer", "--out", str(tmp_path / "o"), "--max-steps", n], "max_steps", n)


def test_config_errors_are_user_errors_and_builtin_types():
    with pytest.raises(ConfigError, match="optim.blr") as e:
        load_config(None, ["optim.blr=fast"])
    assert isinstance(e.value, TypeError) and isinstance(e.value, UserError)
    with pytest.raises(KeyError):
        load_config(None, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="given both"):
        parse_overrides(["optim=1", "optim.blr=2"])


# ----------------------------------------------------------------------------- sample / eval


@pytest.mark.parametrize("opt, value", [("--num-images", "0"), ("--batch-size", "0"), ("--steps", "0")])
def test_sample_counts_must_be_positive(models, tmp_path, capsys, opt, value):
    argv = ["sample", "--dit", models["dit"], "--tokenizer", models["tok"], "--out", str(tmp_path / "s"), opt, value]
    _fails(capsys, argv, opt)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("classes", ["999", "-1", "4", "1,x"])
def test_sample_classes_checked_against_the_model(models, tmp_path, capsys, classes):
    """The DiT has 4 classes: 4 is its CFG null class, not a class to sample."""
    argv = ["sample", "--dit", models["dit"], "--tokenizer", models["tok"], "--out", str(tmp_path / "s")]
    argv += ["--classes", classes, "--device", "cpu"]
    last = _fails(capsys, argv, "--classes")
    if classes != "1,x":
        assert "4 classes" in last


def test_eval_needs_an_input(capsys):
    _fails(capsys, ["eval"], "--tokenizer", "--samples")
    _fails(capsys, ["eval", "--samples", "/nonexistent/samples.npz"], "/nonexistent/samples.npz")


# ----------------------------------------------------------------------------- files


def test_checkpoint_of_the_other_kind_says_what_it_holds(models, tmp_path, capsys):
    out = str(tmp_path / "s")
    _fails(capsys, ["sample", "--dit", models["tok"], "--tokenizer", models["tok"], "--out", out], "RecTok tokenizer")
    argv = ["sample", "--dit", models["dit"], "--tokenizer", models["dit_pth"], "--out", out]
    _fails(capsys, argv, "dit_official.pth", "holds a DiT^DH, not a RecTok tokenizer")
    _fails(capsys, ["stats", "--tokenizer", models["dit"]], "holds a DiT^DH")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_is_named(models, tmp_path, capsys, damage):
    good = open(models["dit_pth"], "rb").read()
    bad = tmp_path / "dit.pth"
    bad.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"hello world", "empty": b""}[damage])
    argv = ["sample", "--dit", str(bad), "--tokenizer", models["tok"], "--out", str(tmp_path / "s")]
    last = _fails(capsys, argv, str(bad), "truncated, corrupt or not a torch checkpoint")
    assert "trust" not in last  # no opt-in offered for a broken file


def test_corrupt_image_names_the_file(models, tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "imgs" / "c0"
    root.mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "good.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(root / "bad.png")
    data = (root / "bad.png").read_bytes()
    (root / "bad.png").write_bytes(data[: len(data) // 2])  # truncated
    _fails(capsys, ["stats", "--tokenizer", models["tok"], "--data", str(tmp_path / "imgs")], "bad.png", "skip_corrupt")


def test_corrupt_image_in_a_loader_worker_is_one_line(tmp_path, capsys):
    """Training with DataLoader workers: the worker's error comes back as the one line naming the file."""
    from PIL import Image

    root = tmp_path / "imgs" / "c0"
    root.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 10, 10)).save(root / f"{i}.png")
    (root / "0.png").write_bytes((root / "0.png").read_bytes()[:60])
    argv = ["train-tokenizer", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "imgs"), "device=cpu"]
    argv += ["data.image_size=32", "data.global_batch_size=4", "data.num_workers=1", "model.latent_channels=8"]
    argv += ["model.extra.encoder=[64,1,2]", "model.extra.decoder=[64,1,2]", "model.extra.sem_decoder=[32,1,2]"]
    argv += ["model.extra.teacher_width=32", "model.extra.patch_size=16", "log.progress=false", "--max-steps", "1"]
    last = _fails(capsys, argv, "0.png", "truncated")
    assert "Original Traceback" not in last and "worker" not in last


def test_skip_corrupt_logs_counts_and_fails_above_the_threshold(tmp_path):
    import logging

    from PIL import Image

    from rectok_fast.config import DataConfig
    from rectok_fast.data.datasets import build_image_dataset
    from rectok_fast.errors import DataError

    root = tmp_path / "imgs" / "c0"
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 10, 10)).save(root / f"{i}.png")
    for i in (1, 4):
        data = (root / f"{i}.png").read_bytes()
        (root / f"{i}.png").write_bytes(data[: len(data) // 2])
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), image_size=32, hflip=False)
    with pytest.raises(DataError, match="1.png"):
        build_image_dataset(cfg)[1]
    skip = DataConfig(**{**cfg.__dict__, "skip_corrupt": True, "max_corrupt_frac": 0.34})  # 2 of 6 allowed
    ds = build_image_dataset(skip)
    seen: list[str] = []
    h = logging.Handler(logging.WARNING)
    h.emit = lambda r: seen.append(r.getMessage())
    lg = logging.getLogger("rectok_fast.data")
    lg.addHandler(h)
    try:
        xs = [ds[i][0] for i in range(6)]
    finally:
        lg.removeHandler(h)
    assert torch.equal(xs[1], xs[2]) and torch.equal(xs[4], xs[5])  # replaced by the next readable image
    assert ds.corrupt == {str(root / "1.png"), str(root / "4.png")}
    assert len(seen) == 2 and "1.png" in seen[0] and "(1 of at most 2)" in seen[0] and "4.png" in seen[1]
    ds = build_image_dataset(DataConfig(**{**skip.__dict__, "max_corrupt_frac": 0.2}))  # 1 of 6 allowed
    ds[1]
    with pytest.raises(DataError, match="2 corrupt images.*4.png"):
        ds[4]


def test_rerun_into_a_run_dir_is_refused(models, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 4}\n')
    argv = ["train-dit", "--out", str(out), f"data.latents={models['lat']}", *DIT_OVER]
    _fails(capsys, argv, "--resume", "--overwrite", str(out))
    assert (out / "metrics.jsonl").read_text() == '{"step": 4}\n'  # untouched
    _fails(capsys, [*argv, "--resume", "--overwrite"], "--resume", "--overwrite")


def test_overwrite_starts_afresh(models, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000009.pt").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 9}\n')
    argv = ["train-dit", "--out", str(out), f"data.latents={models['lat']}", *DIT_OVER, "--max-steps", "1"]
    assert cli.main([*argv, "--overwrite", "log.log_every=1"]) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.pt", "step_00000001.pt"]
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1]


# ----------------------------------------------------------------------------- train-dit data, demo


def test_train_dit_takes_the_classes_of_the_cache(tmp_path):
    from rectok_fast.train.dit import DiTTrainer

    for n in (18, 3):  # more than the recipe's classes (crashed), fewer (got a too-large model)
        lat = synthetic_latent_cache(str(tmp_path / f"lat{n}"), n=36, num_classes=n)
        tr = DiTTrainer(tiny_dit_cfg(str(tmp_path / f"o{n}"), lat, model={"num_classes": 16}))
        assert tr.num_classes == n and tr.raw_model.num_classes == n
        assert tr.raw_model.y_embedder.embedding_table.num_embeddings == n + 1


def test_online_tokenisation_uses_the_tokenizers_image_size(models, tmp_path):
    from rectok_fast.models.loading import load_tokenizer
    from rectok_fast.train.dit import DiTTrainer

    t = load_tokenizer(models["tok"])
    t.set_latent_stats(torch.zeros(8), torch.ones(8))
    t.save_pretrained(str(tmp_path / "tok"))
    over = {"latents": None, "image_size": 256, "embedded_len": 16}  # the recipe says 256 px, the tokenizer 32
    cfg = tiny_dit_cfg(str(tmp_path / "o"), None, data=over, model={"tokenizer": str(tmp_path / "tok")})
    tr = DiTTrainer(cfg)
    x, _ = tr.dataset[0]
    assert x.shape == (3, 32, 32) and tr.num_classes == 16


def test_demo_passes_stage2_steps(monkeypatch):
    from rectok_fast.train import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.update(k) or {})
    demo.main(["--stage2-steps", "0", "--out", "x"])
    assert seen["stage2_steps"] == 0


def test_embedded_scale_follows_the_tokenizer_run(tmp_path):
    """`stats` / `eval` / `cache-latents --data embedded` crop the images as the tokenizer's training did."""
    from rectok_fast.config import save_config
    from rectok_fast.data.datasets import default_embedded_scale, embedded_scale_for

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    save_config(tiny_tokenizer_cfg(str(run)), str(run / "config.yaml"))  # 32 px, embedded_scale 0.25
    for p in (run, run / "export", run / "checkpoints" / "latest.pt"):
        assert embedded_scale_for(str(p), 32) == 0.25
    assert embedded_scale_for(str(tmp_path / "lone_export"), 32) == default_embedded_scale(32) == 0.125
    assert default_embedded_scale(256) == 0.5 and embedded_scale_for(None, 128, default=0.3) == 0.3


def test_stats_and_eval_crop_like_the_tokenizer_run(models, tmp_path, monkeypatch):
    """``--data embedded`` in ``stats`` / ``eval`` / ``cache-latents`` uses the run's ``data.embedded_scale``."""
    import shutil

    from rectok_fast.config import save_config
    from rectok_fast.eval import evaluate
    from rectok_fast.train import cache_latents, stats

    run = tmp_path / "run"
    shutil.copytree(models["tok"], run / "export")
    save_config(tiny_tokenizer_cfg(str(run)), str(run / "config.yaml"))  # 32 px, embedded_scale 0.25
    seen = []

    class Seen(Exception):
        pass

    def capture(data_cfg, *a, **k):
        seen.append((data_cfg.image_size, data_cfg.embedded_scale))
        raise Seen

    for mod in (evaluate, stats, cache_latents):
        monkeypatch.setattr(mod, "build_image_dataset", capture)
    export = str(run / "export")
    for argv in (["--tokenizer", export], ["--tokenizer", export, "--device", "cpu"]):
        with pytest.raises(Seen):
            (evaluate.main if len(argv) == 2 else stats.main)(argv)
    with pytest.raises(Seen):
        cache_latents.main(["--tokenizer", export, "--out", str(tmp_path / "lat"), "--device", "cpu"])
    assert seen == [(32, 0.25)] * 3


# ----------------------------------------------------------------------------- --debug, bugs, real process


def test_bugs_still_raise(monkeypatch):
    from rectok_fast.train import stats

    def boom(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(stats, "main", boom)
    with pytest.raises(ZeroDivisionError):
        cli.main(["stats"])


def test_module_entry_points_handle_errors_like_the_cli(monkeypatch, capsys, tmp_path):
    """``python -m rectok_fast.train.dit ...`` (the torchrun form) ends like ``rectok-fast train-dit``."""
    monkeypatch.setattr(sys, "argv", ["dit.py", "--out", str(tmp_path / "o"), "optim.blr=fast"])
    with pytest.raises(SystemExit) as e:
        cli.run_as_main("train-dit")
    assert e.value.code == 2
    _one_error_line(capsys, "train-dit", "optim.blr")
    import rectok_fast.train.dit as mod

    assert 'run_as_main("train-dit")' in open(mod.__file__).read()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "rectok_fast.cli", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )


def test_real_process_debug_shows_the_traceback(tmp_path):
    """The real process (one run: starting Python with torch is slow here): ``--debug`` prints the
    traceback, and the last line is still the one-line error, exit 2."""
    r = _run("--debug", "train-tokenizer", "--out", str(tmp_path / "o"), "optim.blr=fast")
    assert r.returncode == 2 and "Traceback" in r.stderr and "ConfigTypeError" in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().split("\n")[-1]
    assert last.startswith("rectok-fast train-tokenizer: error: ") and "optim.blr" in last
