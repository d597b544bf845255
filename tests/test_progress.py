"""Long commands show progress and pick their thread count: ``--threads`` everywhere, log records
written around a tqdm bar (not glued onto it), labelled tokenizer stages, bars on stats / cache-latents."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from pipeline_helpers import tiny_tokenizer_cfg

from rectok_fast.utils import threads
from rectok_fast.utils.log import progress_bar, setup_logging

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pick_threads_is_one_on_a_busy_machine(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.9, 0, 0))
    assert threads.pick_threads(None) == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0, 0))
    assert threads.pick_threads(None) == 4 and threads.pick_threads(3) == 3


def test_apply_threads(monkeypatch):
    n = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.apply_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's per-rank setting is kept without --threads
        torch.set_num_threads(1)
        assert threads.apply_threads(None) == 1
        from rectok_fast.errors import ArgumentError

        with pytest.raises(ArgumentError, match="--threads"):
            threads.apply_threads(0)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize(
    "module", ["train.tokenizer", "train.dit", "train.stats", "train.cache_latents", "train.demo", "eval.sample", "eval.evaluate"]
)  # fmt: skip
def test_every_command_takes_threads(module, capsys):
    import importlib

    m = importlib.import_module(f"rectok_fast.{module}")
    with pytest.raises(SystemExit):
        m.main(["--help"])
    assert "--threads" in capsys.readouterr().out


def test_log_lines_are_not_glued_onto_the_bar(monkeypatch):
    import sys

    from tqdm import tqdm

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(None)
    bar = tqdm(total=10, desc="work", file=sys.stderr, mininterval=0)
    bar.update(3)
    bar.refresh()
    logging.getLogger("rectok_fast.test_progress").warning("MESSAGE")
    bar.close()
    out = stream.getvalue()
    i = out.index("MESSAGE")
    seg = out[out.rfind("\r", 0, i) + 1 : i]
    # the bar is cleared, the record printed from the line's start, the bar redrawn below it (a plain
    # StreamHandler would append the record right after the bar's '| 3/10 [...]' on the same line)
    assert "|" not in seg and seg.split()[1] == "WARNING", repr(out)
    assert "work" in out[:i] and "work" in out[i:].split("\n", 1)[1]


def test_progress_bar_shows_rate_and_eta(capsys):
    bar = progress_bar(4, "sample", mininterval=0)
    bar.update(2)
    bar.refresh()
    bar.close()
    err = capsys.readouterr().err
    assert "sample" in err and "img/s" in err and "<" in err  # elapsed<remaining


def test_stage_label_and_command_bars(tmp_path, capsys):
    from rectok_fast.config import DataConfig
    from rectok_fast.train.cache_latents import cache_latents
    from rectok_fast.train.stats import run_stats
    from rectok_fast.train.tokenizer import train_tokenizer

    stream = io.StringIO()
    root = logging.getLogger("rectok_fast")
    h = logging.StreamHandler(stream)
    root.addHandler(h)
    try:
        m = train_tokenizer(tiny_tokenizer_cfg(str(tmp_path / "tok"), max_steps=1, log={"progress": True}))
        s1_err = capsys.readouterr().err
        s2 = tiny_tokenizer_cfg(
            str(tmp_path / "tok2"), max_steps=1, log={"progress": True}, model={"init": m["export"]}
        )
        s2.stage = 2
        train_tokenizer(s2)
    finally:
        root.removeHandler(h)
    assert "tokenizer stage 1: 1 steps" in stream.getvalue() and "tokenizer stage 2: 1 steps" in stream.getvalue()
    assert "tokenizer stage 1" in s1_err and "tokenizer stage 2" in capsys.readouterr().err  # the bars' labels
    data = DataConfig(source="embedded", image_size=32, embedded_len=4, embedded_scale=0.25)
    run_stats(m["export"], data, out=str(tmp_path / "st"), device="cpu", batch_size=2)
    assert "stats: 100%" in capsys.readouterr().err
    cache_latents(str(tmp_path / "st"), data, str(tmp_path / "lat"), device="cpu", batch_size=2)
    assert "cache-latents: 100%" in capsys.readouterr().err
