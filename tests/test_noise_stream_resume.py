"""Training checkpoints record the in-kernel noise stream (``rectok_fast.ops.noise_stream_info()``);
resuming one written under another stream, or with no record, warns once."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from pipeline_helpers import state_of, synthetic_latent_cache, tiny_dit_cfg

from rectok_fast.ops import noise_stream_info
from rectok_fast.train.dit import DiTTrainer
from rectok_fast.utils.checkpoint import NOISE_STREAM_KEY, NoiseStreamWarning, check_noise_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def test_check_noise_stream_unit():
    cur = noise_stream_info()
    other = {**cur, "version": cur["version"] + 1}
    assert check_noise_stream({NOISE_STREAM_KEY: dict(cur)}, cur, mode="kernel")
    with pytest.warns(NoiseStreamWarning, match="not bit-exact") as rec:
        assert not check_noise_stream(
            {NOISE_STREAM_KEY: other, "noise_mode": "kernel"}, cur, mode="kernel", path="x.pt"
        )
    assert len(rec) == 1 and "x.pt" in str(rec[0].message) and str(other) in str(rec[0].message)
    with pytest.warns(NoiseStreamWarning, match="records no noise stream"):
        assert not check_noise_stream({}, cur, mode="materialized")
    with pytest.warns(NoiseStreamWarning):  # other Philox rounds: another stream
        check_noise_stream({NOISE_STREAM_KEY: noise_stream_info(7)}, cur, mode="kernel")
    # materialised noise on both sides: the in-kernel stream never reached the loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_noise_stream({NOISE_STREAM_KEY: other, "noise_mode": "materialized"}, cur, mode="materialized")


def _noise_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NoiseStreamWarning)]


def test_trainer_records_the_stream_and_warns_once_on_a_mismatch(tmp_path):
    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    out = str(tmp_path / "run")
    DiTTrainer(tiny_dit_cfg(out, lat, max_steps=2)).fit()
    latest = os.path.join(out, "checkpoints", "latest.pt")
    state = state_of(latest)
    assert state[NOISE_STREAM_KEY] == noise_stream_info() and state["noise_mode"] == "materialized"

    with warnings.catch_warnings(record=True) as rec:  # same stream: silent
        warnings.simplefilter("always")
        DiTTrainer(tiny_dit_cfg(out, lat, max_steps=3, resume=True)).fit()
    assert _noise_warnings(rec) == []

    state = state_of(latest)
    state[NOISE_STREAM_KEY] = {**noise_stream_info(), "version": 1}
    state["noise_mode"] = "kernel"  # written with in-kernel noise of stream version 1
    torch.save(state, latest)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        DiTTrainer(tiny_dit_cfg(out, lat, max_steps=4, resume=True)).fit()
    msgs = _noise_warnings(rec)
    assert len(msgs) == 1 and "'version': 1" in msgs[0] and "not bit-exact" in msgs[0]

    state = state_of(latest)  # the checkpoint just written records this build's stream again
    assert state[NOISE_STREAM_KEY] == noise_stream_info()
    del state[NOISE_STREAM_KEY], state["noise_mode"]  # a checkpoint from before the record
    torch.save(state, latest)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        DiTTrainer(tiny_dit_cfg(out, lat, max_steps=5, resume=True)).fit()
    msgs = _noise_warnings(rec)
    assert len(msgs) == 1 and "records no noise stream" in msgs[0]
