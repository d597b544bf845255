"""The ``rectok-fast`` console script: every subcommand answers ``--help`` (in process and as a module)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rectok_fast.cli import COMMANDS, main


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"rectok-fast {cmd}" in out and "usage" in out


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in COMMANDS)
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_and_modules_run():
    r = subprocess.run([sys.executable, "-m", "rectok_fast.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train-tokenizer" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "rectok_fast.train.dit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--resume" in r.stdout and "key=value" in r.stdout


def test_training_args_become_config(tmp_path):
    import argparse

    from rectok_fast.train.cli_common import add_run_args, config_from_args

    p = argparse.ArgumentParser()
    add_run_args(p, "tokenizer/tiny")
    args = p.parse_args(
        [
            "--out",
            str(tmp_path),
            "--max-steps",
            "3",
            "--seed",
            "7",
            "--resume",
            "--data",
            "embedded",
            "optim.blr=1e-3",
            "data.global_batch_size=8",
        ]
    )
    cfg = config_from_args(args, "tokenizer")
    assert (
        cfg.out,
        cfg.max_steps,
        cfg.seed,
        cfg.resume,
        cfg.data.source,
        cfg.optim.blr,
        cfg.data.global_batch_size,
    ) == (str(tmp_path), 3, 7, True, "embedded", 1e-3, 8)
    args = p.parse_args(["--data", str(tmp_path)])
    assert config_from_args(args, "tokenizer").data.source == "folder"
    with pytest.raises(ValueError, match="not 'dit'"):
        config_from_args(p.parse_args([]), "dit")
