"""Every ```python block of the README runs as written, on tiny stand-ins.

Skipped by marker because another test executes them: the ops example (``<!-- ops:* -->``,
tests/test_readme.py), the drop-in snippets for other tokenizers (``<!-- dropin:* -->``,
tests/test_dropin.py) and the released-models section (``<!-- released:* -->``, tests/test_hub.py).

The released names (``rectok-decft``, ``ditdh-xl-600e``, ``ditdh-s-30e``) resolve offline to tiny
random checkpoints in the official layout in a Hugging Face cache laid out by tests/test_hub.py's
``released`` fixture, ``tok_stats/`` is written by ``rectok-fast stats`` on embedded images, and
``.cuda()`` returns the module / tensor on the CPU.  Beyond that, a block runs with the few textual
substitutions of :data:`SUBSTITUTIONS` (each says why); a substitution that no longer matches fails
the test, so the table cannot go stale.
"""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
from test_hub import hub_env, no_network, released  # noqa: F401  (fixtures: the offline hub cache)

from rectok_fast import cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SKIP = ("ops", "dropin", "released")

# (block heading, text in the block, replacement, why)
SUBSTITUTIONS = [
    (
        "Drop-in modules",
        "B, N, C, D = 8, 256, 128, 768",
        "B, N, C, D = 2, 16, 8, 64",
        "a DiT-S over 256 tokens takes ~10 s per forward on a loaded 2-core CPU; 4×4 tokens of 8 channels",
    ),
    (
        "The RecTok tokenizer",
        '{"dinov3": load_teacher("dinov3", "/models/dinov3-vitl16", device=device)}',
        '{"t": __import__("rectok_fast.models.teachers", fromlist=["x"]).TinyTeacher(width=8, depth=1, heads=2)}',
        "no DINOv3 weights in CI; the tiny tokenizer's semantic decoder 't' predicts 8-dim features",
    ),
    (
        "The RecTok tokenizer",
        "torch.compile(tok, fullgraph=True)(images, mask=mask)",
        "tok(images, mask=mask)",
        "fullgraph compilation of RecTok is tests/test_compile_rectok.py's job (minutes on a CPU)",
    ),
]


def python_blocks() -> list[tuple[str, str]]:
    """(nearest heading, code) of every python block outside the skipped marker pairs."""
    text = README.read_text()
    for name in SKIP:
        a, b = text.index(f"<!-- {name}:start -->"), text.index(f"<!-- {name}:end -->")
        text = text[:a] + text[b:]
    out = []
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        heads = re.findall(r"^#+ (.+)$", text[: m.start()], flags=re.M)
        out.append((heads[-1].split("(")[0].strip() if heads else "README", m.group(1)))
    return out


BLOCKS = python_blocks()


def test_blocks_found():
    assert [h for h, _ in BLOCKS] == ["Drop-in modules", "The RecTok tokenizer", "Generating with DiT^DH"]


@pytest.fixture
def readme_env(released, one_thread, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    assert cli.main(["download", "rectok-decft"]) == 0
    tok_path = capsys.readouterr().out.split()[0]
    stats = ["stats", "--tokenizer", tok_path, "--max-images", "4", "--batch-size", "4", "--device", "cpu"]
    assert cli.main([*stats, "--out", "tok_stats", "--no-progress"]) == 0
    return tmp_path


@pytest.mark.parametrize("heading,code", BLOCKS, ids=[h for h, _ in BLOCKS])
def test_readme_python_block_runs(heading, code, readme_env):
    for head, old, new, _why in SUBSTITUTIONS:
        if head == heading:
            assert old in code, f"README[{heading}]: the substitution {old!r} no longer matches; update the table"
            code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, f"README.md[{heading}]", "exec"), scope)
    if heading == "Drop-in modules":
        B, N, C, D = scope["B"], scope["N"], scope["C"], scope["D"]
        assert scope["out"].z_t.shape == (B, N, C) and scope["x"].shape == (B, N, D)
        assert math.isfinite(scope["loss"].item()) and scope["loss"].item() > 0
    elif heading == "The RecTok tokenizer":
        s = scope["s"]
        assert scope["recon"].shape == (4, 3, s, s) and scope["out"].reconstruction.shape[0] == 4
        assert not torch.equal(scope["tok"].latent_std, torch.ones_like(scope["tok"].latent_std))
    else:
        img = scope["images"]
        assert img.shape[:2] == (4, 3) and torch.isfinite(img).all()
        assert not torch.equal(scope["tok"].latent_std, torch.ones_like(scope["tok"].latent_std))
