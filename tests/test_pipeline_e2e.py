"""stats -> cache-latents -> DiT from the cache (and online) -> sample -> eval, on tiny models; and the
DiT loader reproducing the golden samples of the original implementation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import reference_file
from pipeline_helpers import tiny_dit_cfg, tiny_tokenizer_cfg

from rectok_fast.config import DataConfig
from rectok_fast.data import EmbeddedImages, LatentCacheDataset
from rectok_fast.train.builders import load_dit, load_tokenizer
from rectok_fast.train.cache_latents import cache_latents
from rectok_fast.train.dit import DiTTrainer
from rectok_fast.train.stats import run_stats
from rectok_fast.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    m = train_tokenizer(tiny_tokenizer_cfg(str(out), max_steps=2))
    return m["export"]


DATA = DataConfig(source="embedded", image_size=32, embedded_len=8, embedded_scale=0.25)


def test_stats_match_direct_computation(tokenizer_export, tmp_path):
    res = run_stats(tokenizer_export, DATA, out=str(tmp_path / "with_stats"), batch_size=3, device="cpu")
    tok = load_tokenizer(str(tmp_path / "with_stats"))
    ds = EmbeddedImages(32, length=8, scale=0.25, hflip=False)
    with torch.no_grad():
        means = (
            tok.encode(torch.stack([ds[i][0] for i in range(8)]))[..., : tok.token_channels]
            .reshape(-1, tok.token_channels)
            .double()
        )
    torch.testing.assert_close(tok.latent_mean, means.mean(0).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.latent_std, means.std(0, unbiased=False).float(), atol=1e-5, rtol=1e-5)
    assert res["tokens"] == 8 * 4 and json.load(open(tmp_path / "with_stats" / "stats.json"))["tokens"] == 32


def test_cache_train_sample_eval(tokenizer_export, tmp_path, monkeypatch):
    tok_dir = str(tmp_path / "tok")
    run_stats(tokenizer_export, DATA, out=tok_dir, device="cpu")
    lat = str(tmp_path / "lat")
    res = cache_latents(tok_dir, DATA, lat, batch_size=3, flip=True, shard_size=5, device="cpu")
    assert res["num"] == 16 and res["shards"] == 4
    cache = LatentCacheDataset(lat)
    tok = load_tokenizer(tok_dir)
    ds = EmbeddedImages(32, length=8, scale=0.25)
    with torch.no_grad():
        want = tok.encode(ds[1][0][None])[0]
    # shard order: batch 0 = images 0-2 then their flips, so image 1 is row 1
    torch.testing.assert_close(cache[1][0], want, atol=1e-5, rtol=1e-5)
    assert cache[1][1] == 1 and cache.num_classes == ds.num_classes
    torch.testing.assert_close(cache.latent_mean, tok.latent_mean)

    # DiT from the cache, with a preview grid through the tokenizer
    dcfg = tiny_dit_cfg(
        str(tmp_path / "dit"),
        lat,
        max_steps=3,
        data={"global_batch_size": 4},
        model={"tokenizer": tok_dir, "num_classes": ds.num_classes},
        log={"image_every": 3},
    )
    tr = DiTTrainer(dcfg)
    tr.fit()
    tr.export()
    assert os.path.exists(os.path.join(dcfg.out, "images", "samples_00000003.png"))
    # the same DiT trained online from images (no cache)
    ocfg = tiny_dit_cfg(
        str(tmp_path / "dit_online"),
        None,
        max_steps=2,
        data={
            "latents": None,
            "source": "embedded",
            "image_size": 32,
            "embedded_len": 8,
            "embedded_scale": 0.25,
            "global_batch_size": 4,
        },
        model={"tokenizer": tok_dir, "num_classes": ds.num_classes},
    )
    assert DiTTrainer(ocfg).fit()["step"] == 2

    from rectok_fast.eval.evaluate import main as eval_main
    from rectok_fast.eval.sample import main as sample_main
    from rectok_fast.eval.sample import sample_noise

    out = str(tmp_path / "samples")
    sample_main(
        [
            "--dit",
            dcfg.out,
            "--tokenizer",
            tok_dir,
            "--out",
            out,
            "--num-images",
            "5",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--guidance",
            "cfg",
            "--scale",
            "1.5",
            "--npz",
            "--png",
            "--device",
            "cpu",
        ]
    )
    arr = np.load(os.path.join(out, "samples.npz"))
    assert (
        arr["arr_0"].shape == (5, 32, 32, 3)
        and arr["arr_0"].dtype == np.uint8
        and list(arr["arr_1"]) == [i % ds.num_classes for i in range(5)]
    )
    assert len(os.listdir(os.path.join(out, "images"))) == 5 and os.path.exists(os.path.join(out, "grid.png"))
    # per-index noise: the same image whatever the batch / rank layout
    torch.testing.assert_close(sample_noise([3], (2, 2), 0, "cpu")[0], sample_noise([1, 3], (2, 2), 0, "cpu")[1])
    from test_sample_stream import fake_inception

    from rectok_fast.eval import evaluate

    monkeypatch.setattr(evaluate, "inception_weights_path", lambda path=None: "stand-in")
    monkeypatch.setattr(evaluate, "build_inception", lambda weights, device: fake_inception)
    res = eval_main(
        [
            "--tokenizer",
            tok_dir,
            "--num-images",
            "8",
            "--rfid",
            "--samples",
            os.path.join(out, "samples.npz"),
            "--out",
            str(tmp_path / "eval"),
            "--device",
            "cpu",
        ]
    )
    r = res["reconstruction"]
    assert r["num_images"] == 8 and 0 < r["ssim"] <= 1 and r["psnr"] > 0 and r["psnr_mean_color_baseline"] > 0
    assert r["rfid"] > 0 and res["generation"]["num_images"] == 5 and res["generation"]["is"] >= 1
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["reconstruction"]["num_images"] == 8


def test_load_dit_official_checkpoint_reproduces_golden_samples(tmp_path):
    from rectok_fast.sampling import sample

    golden = torch.load(reference_file("golden_ditdh_tiny.pt"), map_location="cpu", weights_only=True)
    path = tmp_path / "official.pth"
    torch.save({"model": golden["state_dict"], "model_ema": golden["state_dict"]}, path)
    dit = load_dit(str(path))
    o = golden["outputs"]
    out = sample(
        dit, o["sample_noise"], golden["inputs"]["y"], golden["config"]["steps"] - 1, guidance="cfg", scale=1.7
    )
    assert ((out - o["sample_euler_cfg"]).norm() / o["sample_euler_cfg"].norm()).item() <= 1e-5


def test_demo_smoke(tmp_path):
    """The demo end to end with a handful of steps: every artefact and metric is produced."""
    from PIL import Image

    from rectok_fast.train.demo import run_demo

    m = run_demo(
        str(tmp_path), "cpu", tokenizer_steps=3, dit_steps=3, stage2_steps=2, threads=1, progress=False, sample_steps=2
    )
    for f in ("reconstructions.png", "samples.png", "metrics.json"):
        assert os.path.exists(tmp_path / f)
    saved = json.load(open(tmp_path / "metrics.json"))
    for k in ("psnr", "ssim", "psnr_mean_color_baseline", "tokenizer_steps", "dit_steps", "seconds"):
        assert k in saved
    assert saved["tokenizer_steps"] == 5 and saved["dit_steps"] == 3 and m["psnr"] == saved["psnr"]
    w, h = Image.open(tmp_path / "samples.png").size
    assert w > h > 0
    # the images come from the stage-2 model, and tokenizer_final describes it
    assert saved["tokenizer_final_stage"] == 2 and saved["tokenizer_final"] != saved["tokenizer_stage1_final"]
    # captions: a left margin for the row captions and a top margin for the class names (96-px cells)
    from rectok_fast.data.datasets import EMBEDDED_NAMES

    n = len(EMBEDDED_NAMES)
    rw, rh = Image.open(tmp_path / "reconstructions.png").size
    assert rw > n * 98 + 2 + 40 and rh > 2 * 98 + 2 + 8
