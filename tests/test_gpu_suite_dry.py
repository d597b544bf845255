"""benchmarks/gpu_suite.sh and its helper benchmarks/suite.py, without a GPU.

Fast checks always run: merging the per-case JSON, the readable report (every number, every failed
step, nothing invented), the attention table made from a measurement, and that the suite's step
wrapper stops a pytest run with SIGINT so that its junit file survives.  The whole dry run
(``bash benchmarks/gpu_suite.sh dry``, about 2-3 minutes on 2 cores) is a CI stage of its own
(``.ci/run``); here it runs only with ``RECTOK_TEST_GPU_SUITE_DRY=1``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmarks import each other as top-level modules
suite = importlib.import_module("suite")
bench_attention = importlib.import_module("bench_attention")


def _bench(cases, **meta):
    return {"benchmarks": [{"name": f"c{i}", "extra_info": c} for i, c in enumerate(cases)], "rectok_fast": meta}


def test_merge_concatenates_one_run_and_refuses_two(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_bench([{"case": "x"}], commit="abc", copy_gbps=None)))
    b.write_text(json.dumps(_bench([{"case": "y"}], commit="abc", copy_gbps=4000.0)))
    c.write_text(json.dumps(_bench([{"case": "z"}], commit="def")))
    out = tmp_path / "m.json"
    assert suite.main(["merge", str(out), str(a), str(tmp_path / "missing.json"), str(b)]) == 0
    m = json.loads(out.read_text())
    assert [x["extra_info"]["case"] for x in m["benchmarks"]] == ["x", "y"]
    assert m["rectok_fast"]["copy_gbps"] == 4000.0 and m["rectok_fast"]["merged_from"] == ["a.json", "b.json"]
    assert suite.main(["merge", str(out), str(a), str(c)]) == 1  # different commits: not one run
    assert suite.main(["merge", str(tmp_path / "n.json"), str(tmp_path / "missing.json")]) == 1


def test_report_prints_every_number_and_every_failure(tmp_path):
    env = {
        "device": "NVIDIA H200",
        "commit": "abc",
        "torch": "2.11.0",
        "ceilings": {"copy_gbps": 4312.5, "gemm_tflops": 791.0, "gemm_n": 8192, "gemm_dtype": "bfloat16"},
    }
    env["ceilings"]["gemm_frac_datasheet"] = 791.0 / 989.0
    (tmp_path / "env.json").write_text(json.dumps(env))
    op = {"op": "gather_tokens", "mode": "fwd+bwd", "dtype": "bf16", "B": 256, "fused_ms": 0.1234, "eager_ms": 0.5}
    op.update(compiled_ms=None, compiled_error="BackendCompilerFailed: boom", speedup_vs_eager=4.05, frac_copy_bw=0.8)
    (tmp_path / "bench_ops.json").write_text(json.dumps(_bench([op])))
    dit = {"case": "ditdh_xl_train_step", "img_s": 321.0, "step_ms": 199.0, "tflops": 400.0, "mfu": 0.404}
    dit.update(mfu_gemm=0.506, B=64, steps=10, steps_planned=10)
    (tmp_path / "bench_e2e.json").write_text(json.dumps(_bench([dit])))
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    steps = tmp_path / "steps.tsv"
    steps.write_text(
        "build\tok\t0\t61\t150\t\nops\ttimeout\t124\t120\t120\t\nsample\tskipped\t-\t0\t30\tno time left\n"
    )
    text = "\n".join(suite.report_lines(str(tmp_path), str(steps)))
    for want in (
        "4312.5 GB/s",
        "791 TFLOP/s",
        "80 % of the 989",
        "0.1234",
        "4.05x",
        "compile error: BackendCompilerFailed",
        "321 img/s",
        "40.4 % of 989",
        "50.6 % of the measured GEMM",
        "3 run: 1 passed, 1 failed",
        "FAILURE tests.test_x::test_b: assert 1 == 2",
        "tokenizer_train_step: missing",
        "attention: attention.json missing",
        "FAILED STEPS: ops (timeout, rc=124); sample (skipped, rc=-, no time left)",
    ):
        assert want in text, (want, text)
    assert not re.search(r"(?<![\d.])0(\.0+)? ?(ms|GB/s|TFLOP/s|img/s|%|x)\b", text), text  # no zero stands in


def test_attention_table_from_a_measurement(tmp_path):
    def row(shape, backend, ms, cls="bf16-hd64-short"):
        r = {"shape": shape, "backend": backend, "shape_class": cls}
        return r | ({"fwd_bwd_ms": ms} if ms else {"error": "RuntimeError: no kernel"})

    data = {
        "rectok_fast": {"capability": "9.0", "device": "NVIDIA H200", "commit": "abc", "torch": "2.11.0", "dry": False},
        "results": [
            row("vit_b_n192", "sdpa_cudnn", 1.0),
            row("vit_b_n256", "sdpa_cudnn", 1.5),
            row("vit_b_n192", "sdpa_flash", 1.2),
            row("vit_b_n256", "sdpa_flash", 1.4),
            row("vit_b_n192", "sdpa_efficient", 0.5),  # fastest at one shape, failed at the other: left out
            row("vit_b_n256", "sdpa_efficient", None),
            row("vit_b_n256", "auto", 0.1),  # auto and plain sdpa never enter the table
            row("dit", "sdpa_flash", 2.0, "bf16-hd72-short"),
        ],
    }
    entries, source = bench_attention.make_table(data)
    assert entries == {"bf16-hd64-short": ["sdpa_cudnn", "sdpa_flash"], "bf16-hd72-short": ["sdpa_flash"]}
    assert source["device"] == "NVIDIA H200"
    src = tmp_path / "m.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "attention_table.py"
    bench_attention.write_table(str(src), str(out))
    ns: dict = {}
    exec(out.read_text(), ns)
    assert ns["TABLE"] == {"9.0": entries} and ns["SOURCE"]["9.0"]["commit"] == "abc"
    data["rectok_fast"]["dry"] = True
    src.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="GPU measurement"):
        bench_attention.write_table(str(src), str(out))


def test_step_stops_pytest_with_sigint_and_junit_survives(tmp_path):
    """The suite's ``step ... --int``: pytest interrupted at the deadline still writes its junit file."""
    (tmp_path / "test_slow.py").write_text(
        textwrap.dedent(
            """
            import time
            def test_fast():
                pass
            def test_slow():
                time.sleep(60)
            """
        )
    )
    junit = tmp_path / "junit.xml"
    script = textwrap.dedent(
        f"""
        set -u
        T0=$(date +%s); SUITE_BUDGET=100; RESERVE=0; LOG={tmp_path}/log; STEPS={tmp_path}/steps.tsv
        log() {{ echo "$*" >>"$LOG"; }}
        eval "$(sed -n '/^step() {{/,/^}}/p' {SUITE})"
        step tests 6 --int {sys.executable} {ROOT}/benchmarks/suite.py pytest -q -p no:cacheprovider \\
            {tmp_path}/test_slow.py --junitxml={junit}
        """
    )
    t0 = time.time()
    # started with SIGINT ignored, as a background job of a shell without job control would be
    r = subprocess.run(
        ["bash", "-c", script], preexec_fn=lambda: __import__("signal").signal(2, __import__("signal").SIG_IGN)
    )
    assert r.returncode == 0 and time.time() - t0 < 40
    row = (tmp_path / "steps.tsv").read_text().split("\t")
    assert row[:3] == ["tests", "timeout", "124"], row
    text = junit.read_text()
    assert 'name="test_fast"' in text


@pytest.mark.skipif(
    os.environ.get("RECTOK_TEST_GPU_SUITE_DRY") != "1",
    reason="the whole dry run (~3 min) is its own CI stage: `OUT=dir bash benchmarks/gpu_suite.sh dry`; "
    "set RECTOK_TEST_GPU_SUITE_DRY=1 to run it here",
)
def test_whole_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    t0 = time.time()
    r = subprocess.run(["bash", SUITE, "dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    took = time.time() - t0
    files = sorted(os.listdir(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert took < 180, took
    assert len(files) <= 8, files
    assert set(files) == {
        "suite.log",
        "env.json",
        "bench_ops.json",
        "bench_e2e.json",
        "attention.json",
        "junit.xml",
    } | {"summary.json"}
    assert "FAILED STEPS: none" in r.stdout


def test_timed_loops_shorten_to_the_deadline_and_say_so(monkeypatch):
    e2e = importlib.import_module("test_bench_e2e")
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.05)

    monkeypatch.setattr(e2e, "DEADLINE", float("inf"))
    info = {}
    per = e2e._timed(step, 1, 4, info)
    assert len(calls) == 5 and info == {"steps_planned": 4, "steps": 4} and 0.04 < per < 0.5
    calls.clear()
    monkeypatch.setattr(e2e, "DEADLINE", time.time() + 5.0 + 0.2)  # room for ~3 more calls after the first
    info = {}
    e2e._timed(step, 0, 100, info)
    assert 2 <= info["steps"] < 10 and len(calls) == info["steps"]
    assert "of 100 timed steps" in info["steps_note"]
    calls.clear()
    monkeypatch.setattr(e2e, "DEADLINE", time.time() - 60)  # already past: still the minimum, stated
    info = {}
    e2e._timed(step, 0, 10, info, min_steps=2)
    assert info["steps"] == 2 and "deadline" in info["steps_note"]
