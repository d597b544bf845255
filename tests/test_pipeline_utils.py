"""Pieces of the pipelines that need no model: checkpoints, RNG capture, EMA, metric accumulation,
datasets and the global-batch sampler, the latent cache, metrics and the auxiliary losses."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import synthetic_latent_cache

from rectok_fast.data import EmbeddedImages, FileListDataset, ImageFolderDataset, LatentCacheDataset, center_crop_arr
from rectok_fast.data.sampler import DistributedGlobalBatchSampler
from rectok_fast.eval.metrics import generation_metrics, mean_color_psnr, psnr, ssim
from rectok_fast.train.losses import (
    LPIPS,
    MissingWeightsError,
    PatchGANDiscriminator,
    PerceptualLoss,
    hinge_d_loss,
    hinge_g_loss,
)
from rectok_fast.utils import checkpoint as ckpt
from rectok_fast.utils.distributed import MetricAccumulator
from rectok_fast.utils.ema import EMA
from rectok_fast.utils.images import make_grid, save_grid
from rectok_fast.utils.rng import get_rng_state, set_rng_state

# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_keep_last_milestones_latest(tmp_path):
    out = str(tmp_path)
    for s in range(1, 8):
        ckpt.save_checkpoint({"step": s, "w": torch.full((3,), float(s))}, out, s, keep_last=2, milestone_every=3)
    steps = [s for s, _ in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))]
    assert steps == [3, 5, 6, 7]  # milestones 3 and 6 always kept, plus the last two others (5, 7)
    latest = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert latest["step"] == 7 and torch.equal(latest["w"], torch.full((3,), 7.0))


def test_atomic_save_survives_crash(tmp_path, monkeypatch):
    out = str(tmp_path)
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(1000)}, out, 1)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"\x80partial-garbage" * 100)  # some bytes hit the disk, then the process "dies"
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, out, 2)
    monkeypatch.setattr(torch, "save", real_save)
    d = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(d)) == ["latest.pt", "step_00000001.pt"]  # no partial or temporary file
    state = ckpt.load_checkpoint(os.path.join(d, "latest.pt"))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))


def test_export_safetensors(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 4)
    sd = {"a": w, "b": w[:2]}  # shared storage is broken up
    ckpt.export_safetensors(sd, str(tmp_path / "m.safetensors"), {"kind": "test"})
    back = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w[:2])


def test_rng_state_roundtrip():
    g = torch.Generator().manual_seed(3)
    state = get_rng_state({"g": g})
    a = (torch.rand(3), np.random.rand(2), torch.rand(2, generator=g))
    torch.manual_seed(99)
    np.random.seed(5)
    torch.rand(5, generator=g)
    set_rng_state(state, {"g": g})
    b = (torch.rand(3), np.random.rand(2), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    """Saved through a checkpoint file and read back with a bare ``weights_only=True``: every stream
    (Python, NumPy with a cached Gaussian, torch, named generators) continues bit-exactly."""
    import random

    g = torch.Generator().manual_seed(11)
    np.random.seed(1)
    np.random.randn()  # leaves a cached Gaussian (has_gauss = 1) in the legacy state
    state = get_rng_state({"g": g})
    assert state["numpy"]["has_gauss"] == 1
    ckpt.atomic_torch_save({"rng": state}, str(tmp_path / "s.pt"))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "s.pt")) == []
    a = (random.random(), np.random.randn(3), np.random.rand(2), torch.rand(3), torch.rand(2, generator=g))
    random.seed(0)
    np.random.seed(5)
    torch.manual_seed(99)
    torch.rand(5, generator=g)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], {"g": g})
    b = (random.random(), np.random.randn(3), np.random.rand(2), torch.rand(3), torch.rand(2, generator=g))
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_rng_state_accepts_the_old_numpy_tuple():
    """Checkpoints written before the safe format hold ``np.random.get_state()`` itself."""
    np.random.seed(4)
    state = {**get_rng_state(), "numpy": np.random.get_state()}
    a = np.random.rand(4)
    np.random.seed(9)
    set_rng_state(state)
    assert np.array_equal(a, np.random.rand(4))


def test_ema_update():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_metric_accumulator_single_sync():
    acc = MetricAccumulator(torch.device("cpu"))
    acc.add(loss=torch.tensor(1.0), l2=torch.tensor(4.0))
    acc.add(loss=torch.tensor(3.0), l2=torch.tensor(2.0), lr=0.5)
    m = acc.pop_means()
    assert m["loss"] == 2.0 and m["l2"] == 3.0 and m["lr"] == 0.5  # each name averaged over the calls that gave it
    assert acc.pop_means() == {}


# ----------------------------------------------------------------------------- data


def _write_images(root, n_classes=2, per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    lines = []
    for c in range(n_classes):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(per_class):
            p = root / f"class{c}" / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
            lines.append(f"class{c}/{i}.png {c}")
    return lines


def test_folder_and_filelist(tmp_path):
    lines = _write_images(tmp_path)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    ds = ImageFolderDataset(str(tmp_path), 16, hflip=False)
    fl = FileListDataset(str(tmp_path / "list.txt"), 16, hflip=False)
    assert len(ds) == len(fl) == 6 and ds.num_classes == 2
    x, y = ds[4]
    x2, y2 = fl[4]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and y == y2 == 1
    torch.testing.assert_close(x, x2)
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolderDataset(str(tmp_path / "missing"), 16)


def test_center_crop_arr_adm():
    im = Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8))
    assert center_crop_arr(im, 64).size == (64, 64)
    assert center_crop_arr(Image.fromarray(np.zeros((50, 40, 3), dtype=np.uint8)), 64).size == (64, 64)


def test_embedded_images_deterministic_and_heldout_disjoint():
    tr = EmbeddedImages(32, "train", length=32, scale=0.25, seed=1)
    ho = EmbeddedImages(32, "heldout", length=32, scale=0.25, seed=1)
    assert tr.num_classes == len(tr.names) >= 10
    a, ya = tr[5]
    b, yb = tr[5]
    assert torch.equal(a, b) and ya == yb == 5 % tr.num_classes
    tr.set_epoch(1)
    assert not torch.equal(tr[5][0], a)  # new crop / flip next epoch
    for k, img in enumerate(tr.images):  # train rows and held-out rows never overlap
        h = img.shape[0]
        r_tr, r_ho = tr._rows(h), ho._rows(h)
        assert r_tr[1] <= r_ho[0] and r_ho[1] - r_ho[0] >= 32 and r_tr[1] - r_tr[0] >= 32, k


def test_global_batch_sampler_matches_single_process():
    n, micro, world, accum = 40, 2, 2, 2
    single = list(DistributedGlobalBatchSampler(n, micro * world * accum, seed=3))
    per_rank = [
        list(DistributedGlobalBatchSampler(n, micro, rank=r, world=world, accum=accum, seed=3)) for r in range(world)
    ]
    G = micro * world * accum
    for step in range(n // G):
        want = single[step * G : (step + 1) * G]
        got = [None] * G
        for r in range(world):
            for m in range(accum):
                off = (m * world + r) * micro
                got[off : off + micro] = per_rank[r][(step * accum + m) * micro : (step * accum + m + 1) * micro]
        assert got == want
    s = DistributedGlobalBatchSampler(n, micro * world * accum, seed=3)
    s.set_epoch(0, start_step=2)
    assert list(s) == single[2 * G :] and len(s) == len(single) - 2 * G
    s.set_epoch(1)
    assert list(s) != single
    with pytest.raises(ValueError, match="global batch"):
        DistributedGlobalBatchSampler(3, 4)


def test_latent_cache_roundtrip(tmp_path):
    path = synthetic_latent_cache(str(tmp_path / "lat"), n=10, grid=2, channels=3, num_classes=2)
    ds = LatentCacheDataset(path)
    assert len(ds) == 10 and ds.grid == 2 and ds.channels == 3 and ds.num_classes == 2
    m, y = ds[3]
    assert m.shape == (4, 6) and y == 1
    assert len(ds.index["shards"]) == 2 and ds.latent_std.shape == (3,)
    with pytest.raises(FileNotFoundError, match="cache-latents"):
        LatentCacheDataset(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- metrics, grids


def test_psnr_ssim_values():
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(1 / mse))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image (dev extra) gives the SSIM oracle")
    ref = [
        skm.structural_similarity(
            x[i].numpy(),
            y[i].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=0,
            data_range=1.0,
        )
        for i in range(2)
    ]
    torch.testing.assert_close(ssim(x, y), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 8, 8), 0.3, dtype=torch.float64)
    assert mean_color_psnr(flat).item() == pytest.approx(120.0)  # exact mean colour: mse clamped at 1e-12


def test_generation_metrics_explains_missing(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    if importlib.util.find_spec("torch_fidelity") is None and importlib.util.find_spec("cleanfid") is None:
        assert "torch-fidelity" in generation_metrics(str(tmp_path), str(tmp_path))["error"]
    else:
        assert "error" in generation_metrics(str(tmp_path), str(tmp_path)) or True


def test_grid_png(tmp_path):
    imgs = torch.rand(5, 3, 8, 8)
    g = make_grid(imgs, nrow=3, pad=1)
    assert g.shape == (2 * 9 + 1, 3 * 9 + 1, 3) and g.dtype == np.uint8
    p = save_grid(imgs, str(tmp_path / "g.png"))
    assert Image.open(p).size == (g.shape[1] + 3, g.shape[0] + 1 * 2) or os.path.exists(p)


# ----------------------------------------------------------------------------- losses


def test_patchgan_and_hinge():
    d = PatchGANDiscriminator(3, 8, 3)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)


def test_perceptual_missing_weights_is_clear(tmp_path, monkeypatch):
    pytest.importorskip("torchvision", reason="the perceptual loss builds torchvision's VGG16 / ConvNeXt-S")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(MissingWeightsError, match="perceptual_enabled=false"):
        PerceptualLoss(lpips_path=str(tmp_path / "nope"))


def test_perceptual_loads_from_path(tmp_path):
    pytest.importorskip("torchvision", reason="the perceptual loss builds torchvision's VGG16 / ConvNeXt-S")
    from torchvision.models.vgg import cfgs, make_layers

    from rectok_fast.train.losses import LPIPS_LIN_FILE, VGG16_FILE

    feats = make_layers(cfgs["D"])  # a VGG16 checkpoint's conv part (same keys as torchvision's file)
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / VGG16_FILE)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / LPIPS_LIN_FILE)
    p = PerceptualLoss(lpips_weight=1.0, convnext_weight=0.0, lpips_path=str(tmp_path))
    torch.testing.assert_close(p.lpips.lins[2].weight, lins["lin2.model.1.weight"])
    torch.testing.assert_close(p.lpips.slices[0][0].weight, feats[0].weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert p(x, x).item() == pytest.approx(0.0, abs=1e-6)
    x.requires_grad_()
    d = p(x, x.detach().flip(-1))
    d.backward()
    assert d.item() > 0 and x.grad.abs().sum() > 0
    assert isinstance(LPIPS(pretrained=False), LPIPS)
