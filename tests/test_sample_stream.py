"""``sample`` writes uint8 shards as it goes and resumes an interrupted run bit-exactly; several
guidance scales give one output each (tiny untrained models, a few solver steps)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

from rectok_fast.eval import sample as sample_mod

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rectok_fast.models.loading import build_ditdh, build_rectok

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = build_rectok(tiny_tokenizer_cfg(str(d / "unused")).model, 32)
    tok.set_latent_stats(torch.full((8,), 0.1), torch.full((8,), 1.5))
    tok.save_pretrained(str(d / "tok"))
    dit = build_ditdh(tiny_dit_cfg(str(d / "unused"), synthetic_latent_cache(str(d / "lat"))).model, 8, 2, 4)
    with torch.no_grad():  # the official init zeroes the output layer: make the velocity non-trivial
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    dit.save_pretrained(str(d / "dit"))
    return str(d / "tok"), str(d / "dit")


def _argv(models, out, *extra):
    tok, dit = models
    return ["--dit", dit, "--tokenizer", tok, "--out", str(out), "--num-images", "7", "--batch-size", "2",
            "--steps", "2", "--guidance", "cfg", "--npz", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_interrupted_run_resumes_bit_exact(models, tmp_path, monkeypatch):
    full = sample_mod.main(_argv(models, tmp_path / "full", "--scale", "1.5"))
    ref = np.load(full["npz"])
    assert ref["arr_0"].shape == (7, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
    assert sorted(os.listdir(tmp_path / "full" / "shards")) == [
        "0000000-0000002.npz", "0000002-0000004.npz", "0000004-0000006.npz", "0000006-0000007.npz", "manifest.json",
    ]  # fmt: skip

    calls = []
    real_write = sample_mod.write_shard

    def interrupt_after_two(path, images, labels):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, images, labels)

    monkeypatch.setattr(sample_mod, "write_shard", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample_mod.main(_argv(models, tmp_path / "cut", "--scale", "1.5"))
    shards = tmp_path / "cut" / "shards"
    assert len([n for n in os.listdir(shards) if n.endswith(".npz")]) == 2
    assert not (tmp_path / "cut" / "samples.npz").exists()
    assert not [n for n in os.listdir(shards) if ".tmp_" in n]  # no partial file left behind

    generated = []
    real_generate = sample_mod.generate
    monkeypatch.setattr(sample_mod, "write_shard", real_write)
    monkeypatch.setattr(sample_mod, "generate", lambda *a, **k: generated.append(a[2]) or real_generate(*a, **k))
    res = sample_mod.main(_argv(models, tmp_path / "cut", "--scale", "1.5"))
    assert generated == [[4, 5], [6]]  # only the missing chunks are sampled again
    got = np.load(res["npz"])
    np.testing.assert_array_equal(got["arr_0"], ref["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], ref["arr_1"])
    # a damaged shard (a bad copy) is sampled again, the others are kept
    (shards / "0000002-0000004.npz").write_bytes(b"not a zip")
    generated.clear()
    res = sample_mod.main(_argv(models, tmp_path / "cut", "--scale", "1.5"))
    assert generated == [[2, 3]]
    np.testing.assert_array_equal(np.load(res["npz"])["arr_0"], ref["arr_0"])


def test_other_config_in_out_is_refused(models, tmp_path):
    from rectok_fast.errors import RunDirError

    sample_mod.main(_argv(models, tmp_path, "--scale", "1.5", "--no-grid"))
    with pytest.raises(RunDirError, match="seed"):
        sample_mod.main(_argv(models, tmp_path, "--scale", "1.5", "--seed", "3", "--no-grid"))
    sample_mod.main(_argv(models, tmp_path, "--scale", "1.5", "--seed", "3", "--no-grid", "--overwrite"))


def fake_inception(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for the Inception network: 12 pooled colour features and 10 'logits' per image."""
    f = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255, 2).flatten(1)
    return f, (f[:, :10] * 5).float()


def test_several_scales_one_output_each(models, tmp_path, monkeypatch):
    from rectok_fast.eval import evaluate
    from rectok_fast.eval.evaluate import main as eval_main
    from rectok_fast.eval.metrics import FeatureStats, frechet_distance

    res = sample_mod.main(_argv(models, tmp_path, "--scale", "1.0,3.0", "--no-grid"))
    assert sorted(res["scales"]) == ["1", "3"]
    a1 = np.load(tmp_path / "scale-1" / "samples.npz")["arr_0"]
    a3 = np.load(tmp_path / "scale-3" / "samples.npz")["arr_0"]
    assert a1.shape == a3.shape == (7, 32, 32, 3) and (a1 != a3).any()
    # scale 1 is plain conditional sampling: the same bytes as a single-scale run of the same noise
    single = sample_mod.main(_argv(models, tmp_path / "single", "--scale", "1", "--no-grid"))
    np.testing.assert_array_equal(np.load(single["npz"])["arr_0"], a1)
    # eval reports each scale, here against FID statistics (mu/sigma .npz) of the scale-1 images
    monkeypatch.setattr(evaluate, "inception_weights_path", lambda path=None: "stand-in")
    monkeypatch.setattr(evaluate, "build_inception", lambda weights, device: fake_inception)
    st = FeatureStats()
    st.add(fake_inception(torch.from_numpy(a1).permute(0, 3, 1, 2))[0])
    mu, sigma = st.mu_sigma()
    np.savez(tmp_path / "ref_stats.npz", mu=mu, sigma=sigma)
    out = eval_main(["--samples", str(tmp_path), "--ref", str(tmp_path / "ref_stats.npz"), "--device", "cpu",
                     "--no-progress", "--batch-size", "3"])  # fmt: skip
    g = out["generation"]
    assert sorted(g) == ["scale-1", "scale-3"] and all(v["num_images"] == 7 for v in g.values())
    assert abs(g["scale-1"]["fid"]) < 1e-12 < g["scale-3"]["fid"]  # the same images: distance 0
    st3 = FeatureStats()
    st3.add(fake_inception(torch.from_numpy(a3).permute(0, 3, 1, 2))[0])
    assert g["scale-3"]["fid"] == pytest.approx(frechet_distance(*st3.mu_sigma(), mu, sigma), rel=1e-9)


# ----------------------------------------------------------------------------- FID pieces


def test_frechet_distance_matches_the_sqrtm_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(0)
    a, b = g.normal(size=(40, 6)), g.normal(size=(50, 6)) * 1.3 + 0.2
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    from rectok_fast.eval.metrics import FeatureStats, frechet_distance

    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    st = FeatureStats()
    for part in np.array_split(a, 3):  # streamed in batches = np.mean / np.cov of all rows
        st.add(torch.from_numpy(part))
    mu, sigma = st.mu_sigma()
    np.testing.assert_allclose(mu, mu1, rtol=1e-12)
    np.testing.assert_allclose(sigma, s1, rtol=1e-10, atol=1e-12)


def test_ref_npz_forms_and_chunked_reading(tmp_path):
    from rectok_fast.errors import DataError
    from rectok_fast.eval.metrics import count_images, image_batches, inception_score, load_fid_stats

    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))  # the adm_in256_stats.npz layout
    mu, sigma = load_fid_stats(str(tmp_path / "stats.npz"))
    assert mu.shape == (4,) and sigma.shape == (4, 4)
    imgs = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=imgs, arr_1=np.arange(5))
    assert load_fid_stats(str(tmp_path / "imgs.npz")) is None and count_images(str(tmp_path / "imgs.npz")) == 5
    got = list(image_batches(str(tmp_path / "imgs.npz"), batch=2))
    assert [len(b) for b in got] == [2, 2, 1]
    np.testing.assert_array_equal(torch.cat(got).permute(0, 2, 3, 1).numpy(), imgs)
    np.savez(tmp_path / "other.npz", foo=np.zeros(2))
    with pytest.raises(DataError, match="mu, sigma"):
        load_fid_stats(str(tmp_path / "other.npz"))
    # IS: uniform predictions score 1, confident distinct classes score the number of classes
    assert inception_score(torch.zeros(20, 10))[0] == pytest.approx(1.0)
    assert inception_score(torch.eye(10).repeat(2, 1) * 100, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_missing_inception_weights_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    from rectok_fast.errors import PathError
    from rectok_fast.eval.evaluate import main as eval_main
    from rectok_fast.eval.metrics import INCEPTION_FILE, inception_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("RECTOK_FAST_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(PathError, match=INCEPTION_FILE) as e:
        inception_weights_path()
    assert "--inception-weights" in str(e.value) and "nothing is downloaded" in str(e.value)
    with pytest.raises(PathError, match="no such file"):
        inception_weights_path(str(tmp_path / "nope.pth"))
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    monkeypatch.setenv("RECTOK_FAST_INCEPTION_WEIGHTS", str(w))
    assert inception_weights_path() == str(w)
    monkeypatch.delenv("RECTOK_FAST_INCEPTION_WEIGHTS")
    with pytest.raises(PathError, match=INCEPTION_FILE):  # raised before the tokenizer is even loaded
        eval_main(["--tokenizer", str(tmp_path / "no_tokenizer_needed"), "--rfid", "--device", "cpu"])


def test_rank_layout_does_not_change_the_images(models, tmp_path, monkeypatch):
    """Two ranks (simulated one after the other: rank 1 writes its chunks, then rank 0 writes its own and
    assembles) give the bytes of one process: chunk k goes to rank k % world and its noise is per index."""
    from rectok_fast.utils.distributed import DistInfo

    one = sample_mod.main(_argv(models, tmp_path / "one", "--scale", "1.5", "--no-grid"))
    monkeypatch.setattr(sample_mod, "barrier", lambda: None)
    done = []
    real_generate = sample_mod.generate
    monkeypatch.setattr(sample_mod, "generate", lambda *a, **k: done.append(a[2]) or real_generate(*a, **k))
    for rank in (1, 0):
        monkeypatch.setattr(sample_mod, "init_distributed", lambda device, r=rank: DistInfo(rank=r, world_size=2))
        res = sample_mod.main(_argv(models, tmp_path / "two", "--scale", "1.5", "--no-grid"))
    assert done == [[2, 3], [6], [0, 1], [4, 5]]
    np.testing.assert_array_equal(np.load(res["npz"])["arr_0"], np.load(one["npz"])["arr_0"])
