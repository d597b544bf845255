"""The README's ops example runs as written (it is the first thing a user copies)."""

from __future__ import annotations

import pathlib

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_ops_example_runs():
    text = README.read_text()
    section = text[text.index("<!-- ops:start -->") : text.index("<!-- ops:end -->")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md[ops example]", "exec"), scope)
    assert scope["full"].shape == (8, 256, 768)
    assert scope["z_t"].shape == (8, 256, 128) and scope["kl"].shape == (8,)
    assert scope["fm"].ndim == 0 and scope["fm"].item() > 0
