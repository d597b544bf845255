"""The compile-only kernel report (``python -m benchmarks.kernel_report``) on a small subset of ops.

Runs in a subprocess: the report compiles the kernels for sm_90 (``TRITON_INTERPRET`` unset), which
cannot share a process with the interpreter-mode kernels of the rest of the suite.  No GPU needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tools_missing() -> str | None:
    try:
        import triton
    except Exception as e:  # pragma: no cover - triton ships with torch
        return f"triton not importable: {e}"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "nvdisasm", "cuobjdump"):
        if not os.path.exists(os.path.join(bin_dir, tool)):
            return f"{tool} is not in the triton wheel ({bin_dir})"
    return None


pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "benchmarks.kernel_report",
        "--ops", "gaussian_kl", "restore_tokens", "distmat_align_loss", "posterior_flow_zt_only",
        "--dtypes", "bf16", "--modes", "fwd+bwd", "--check", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "kernel_report.json") as f:
        data = json.load(f)
    md = (out / "kernel_report.md").read_text()
    return data, md


def test_report_fields(report):
    data, md = report
    import triton

    assert data["triton"] == triton.__version__
    assert not data["errors"]
    op = data["ops"]["gaussian_kl"]["bf16"]["fwd+bwd"]
    bnc = 256 * 256 * 128
    assert op["bytes_min"] == (2 * bnc * 2 + 4 * 256) + (4 * bnc * 2 + 4 * 256)  # read mean, logvar; + write grads
    assert op["bytes_actual"] >= op["bytes_min"] * 0.99
    for m in ("H200", "H100"):
        assert 0 < op["predicted_frac_copy_bw"][m] <= 1.0
    assert len([k for k in data["kernels"] if k["op"] == "gaussian_kl"]) >= 2  # a forward and a backward kernel
    for k in data["kernels"]:
        assert k["regs"] > 0, k["name"]
        assert k["spills"] == 0, k["name"]
        assert k["sass_per_element"] > 0, k["name"]
        assert k["resident_warps_per_sm"] > 0, k["name"]
        assert k["global_load_widths"] and all(w.startswith("LDG") for w in k["global_load_widths"]), k["name"]
        assert k["variants_across_K"] is not None and k["variants_across_K"] >= 1, k["name"]
        assert ": " in k["signature"] and k["num_warps"] in (1, 2, 4, 8, 16, 32)
    assert "predicted from compiled code" in md.lower()


def test_restore_backward_costs_are_counted(report):
    """Everything the launcher issues besides the kernels is in bytes_actual (e.g. zero-fills, partial sums)."""
    data, _ = report
    op = data["ops"]["restore_tokens"]["bf16"]["fwd+bwd"]
    kinds = [s["kind"] for s in op["steps"]]
    assert kinds.count("triton") >= 2
    assert op["launches"] == len([s for s in op["steps"] for _ in range(s["launches"])])
    assert op["bytes_actual"] == pytest.approx(sum(s["bytes"] for s in op["steps"]))
    # variants across the recipe's mask ratios were counted for the K-dependent kernels
    ks = [k for k in data["kernels"] if k["op"] == "restore_tokens"]
    assert ks and all(k.get("K_range") == [154, 256] for k in ks)


def test_distmat_is_judged_against_the_matrix_rate(report, monkeypatch):
    """The compute-bound op: bytes as stated, FLOPs from the op's helper, a matrix-rate term in the
    time model and its share of the matrix rate in the JSON and both tables."""
    sys.path.insert(0, ROOT)
    from benchmarks import kernel_report as kr
    from rectok_fast.ops.distmat import distmat_align_flops

    data, md = report
    op = data["ops"]["distmat_align_loss"]["bf16"]["fwd+bwd"]
    B = N = 256
    D = 1024
    assert op["bytes_min"] == 2 * (B * N * 2 * D * 2 + 8 * B * N) + B * N * D * 2
    assert op["bytes_actual"] >= op["bytes_min"]  # + the backward's weight scratch and the norms' zero grads
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU tiles the report compiled
    fl = distmat_align_flops(B, N, D, D, backward=True)
    assert op["flops"] == pytest.approx(fl["flops"]) and op["flops_min"] == pytest.approx(fl["minimum"])
    for m in ("H200", "H100"):
        rate = op["matrix_rate_flop_s"][m]
        assert rate == kr.MACHINES[m]["matrix_bf16"]
        frac = op["predicted_frac_matrix_rate"][m]
        assert 0 < frac <= 1.0
        assert frac == pytest.approx(op["flops_min"] / (op["predicted_time_s"][m] * rate))
    ks = {k["name"]: k for k in data["kernels"] if k["op"] == "distmat_align_loss"}
    assert set(ks) == {"distmat_fwd_kernel", "distmat_bwd_kernel"}
    for k in ks.values():
        assert k["flops"] > 0 and k["predicted"]["H200"]["t_matrix"] > 0 and not k["unknown_loops"]
        assert k["predicted"]["H200"]["t"] >= k["predicted"]["H200"]["t_matrix"]
        # the dot operands arrive by cp.async (LDGSTS): loads in flight, and its wait barrier is no load
        assert k["inflight_load_bytes_per_warp"] > 0 and "LDGDEPBAR" not in k["global_load_widths"]
    assert "matrix rate" in md
    row = next(ln for ln in kr.readme_table(data).splitlines() if ln.startswith("| `distmat_align_loss`"))
    assert row.rstrip().endswith(f"| {100 * op['predicted_frac_matrix_rate']['H200']:.0f}% |")
    assert "distmat_align_loss" not in data["errors"]


def test_posterior_flow_zt_only_compiles_the_z_less_kernel(report):
    """return_z=False: the forward writes no z, the backward reads no z gradient, nothing extra is allocated."""
    data, _ = report
    op = data["ops"]["posterior_flow_zt_only"]["bf16"]["fwd+bwd"]
    ks = {k["name"]: k for k in data["kernels"] if k["op"] == "posterior_flow_zt_only"}
    assert ks["posterior_flow_fwd_kernel"]["constexprs"]["WRITE_Z"] is False
    assert ks["posterior_flow_bwd_kernel"]["constexprs"]["HAS_GZ"] is False
    assert op["bytes_min"] <= op["bytes_actual"] <= 1.01 * op["bytes_min"]


def test_tables_put_measured_beside_predicted(report):
    """With GPU measurements in a summary, the README table shows them next to the prediction."""
    sys.path.insert(0, ROOT)
    from benchmarks import kernel_report as kr

    data, _ = report
    summary = {
        "device": "NVIDIA H200",
        "ops": {"restore_tokens": {"frac_copy_bw": 0.5}, "patchify": {"frac_copy_bw": None}},
    }
    table = kr.readme_table(data, summary)
    row = next(ln for ln in table.splitlines() if ln.startswith("| `restore_tokens`"))
    assert row.rstrip().endswith("| 50% |")
    assert "measured" in table.splitlines()[2]
    assert "measured" not in kr.readme_table(data, None).splitlines()[2]
    md = kr.markdown(data, summary)
    assert "measured (GPU)" in md and "Predicted from compiled code" in md


def test_sass_loop_counting(tmp_path):
    """Loop bodies count trips times (bound from the launch arguments and earlier assignments), a
    library loop behind a forward branch is cold, NOPs after EXIT are padding."""
    sys.path.insert(0, ROOT)
    from benchmarks._sass import Instr, SassInfo, analyze_sass

    src = tmp_path / "k.py"
    src.write_text("def k(X, D, BLOCK: 'constexpr'):\n    n = D // 2\n    for d in range(0, n, BLOCK):\n        pass\n")
    f = str(src)

    def ins(addr, op, line, pred=None, target=None, file=f):
        return Instr(addr, pred, op, op, ((file, line),), target)

    code = [
        ins(0x00, "S2R", 1),
        ins(0x10, "LDG.E.128", 2),  # loop header (label L0)
        ins(0x20, "FADD", 3),
        ins(0x30, "ISETP.LT.AND", 3),
        ins(0x40, "BRA", 3, "@P0", "L0"),  # back edge -> the for at line 3
        ins(0x50, "BRA", 2, "@!P1", "L2"),  # skips the library slow path
        ins(0x60, "LDG.E.CONSTANT", 1, file="/x/site-packages/triton/language/math.py"),  # label L1
        ins(0x70, "BRA", 1, "@P2", "L1", file="/x/site-packages/triton/language/math.py"),  # library loop
        ins(0x80, "STG.E.64", 2),  # label L2
        ins(0x90, "EXIT", 1),
        ins(0xA0, "BRA", 1, None, "L3"),  # trap self-loop (label L3)
        ins(0xB0, "NOP", 1),
    ]
    sass = SassInfo(code, {"L0": 0x10, "L1": 0x60, "L2": 0x80, "L3": 0xA0})
    r = analyze_sass(sass, "k", {"D": 1024, "BLOCK": 128})
    trips = 1024 // 2 // 128
    assert r["executed_per_thread"] == 1 + 4 * trips + 1 + 2  # entry, loop body, branch, STG + EXIT
    assert r["static_cold"] == 2 and r["has_cold_slow_path"]
    assert r["load_bytes_per_thread"] == 16 * trips and r["store_bytes_per_thread"] == 8
    assert r["global_load_widths"] == ["LDG.E.128"] and r["global_store_widths"] == ["STG.E.64"]
    (loop,) = [lp for lp in r["loops"] if lp["python"]]
    assert loop["trip"] == trips and loop["trip_from"] == "args"


def test_ttir_accesses_follow_the_nearest_definition(tmp_path):
    """Bytes per pointer argument from TTIR: loop trips multiply, and an SSA name MLIR reuses in a
    sibling region resolves to its nearest preceding definition."""
    sys.path.insert(0, ROOT)
    from benchmarks._ttir import accesses

    src = tmp_path / "k.py"
    src.write_text("def k(A, B, n):\n    for i in range(0, n):\n        pass\n")
    ttir = f"""#loc = loc("{src}":1:0)
#loc2 = loc("{src}":2:4)
module {{
  tt.func public @k(%A: !tt.ptr<f32> loc(#loc), %B: !tt.ptr<bf16> loc(#loc), %n: i32 loc(#loc)) {{
    scf.if %c {{
      %5 = tt.splat %A : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc)
      %6 = tt.load %5 : tensor<128x!tt.ptr<f32>> loc(#loc)
    }} loc(#loc)
    scf.for %i = %c0 to %n step %c1 : i32 {{
      %5 = tt.splat %B : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>> loc(#loc)
      tt.store %5, %x : tensor<64x!tt.ptr<bf16>> loc(#loc)
    }} loc(#loc2)
    tt.return loc(#loc)
  }} loc(#loc)
}} loc(#loc)
"""
    got = accesses(ttir, ["A", "B", "n"], {"n": 10}, programs=3)
    assert got["A"] == {"load": 128 * 4 * 3, "store": 0.0}
    assert got["B"] == {"load": 0.0, "store": 64 * 2 * 10 * 3}


def test_sass_loops_named_by_their_back_edge_and_call_site(tmp_path):
    """A helper's loop inlined at two call sites is two loops (each runs its trips, not a share);
    an instruction of the enclosing loop scheduled inside the inner loop does not rename it: the
    back edge's own line names the loop."""
    sys.path.insert(0, ROOT)
    from benchmarks._sass import Instr, SassInfo, analyze_sass

    src = tmp_path / "k2.py"
    src.write_text(
        "def helper(X, K, BLOCK: 'constexpr'):\n"
        "    for k in range(0, K, BLOCK):\n"
        "        pass\n"
        "def k(X, D, BLOCK: 'constexpr'):\n"
        "    for i in range(0, D, BLOCK):\n"
        "        helper(X, D, BLOCK)\n"
        "        helper(X, D, BLOCK)\n"
    )
    f = str(src)

    def ins(addr, op, frames, pred=None, target=None):
        return Instr(addr, pred, op, op, tuple((f, ln) for ln in frames), target)

    code = [
        ins(0x00, "S2R", [4]),
        ins(0x10, "IADD3", [5]),  # L0: outer loop
        ins(0x20, "FADD", [3, 6]),  # L1: first inlined copy of the helper's loop
        ins(0x30, "IADD3", [5]),  # the outer loop's address math, scheduled into the inner loop
        ins(0x40, "BRA", [2, 6], "@P0", "L1"),
        ins(0x50, "FADD", [3, 7]),  # L2: second copy
        ins(0x60, "BRA", [2, 7], "@P1", "L2"),
        ins(0x70, "BRA", [5], "@P2", "L0"),
        ins(0x80, "EXIT", [4]),
    ]
    sass = SassInfo(code, {"L0": 0x10, "L1": 0x20, "L2": 0x50})
    r = analyze_sass(sass, "k", {"D": 256, "BLOCK": 64}, {"K": 3})
    outer, inner = 256 // 64, 3
    assert r["executed_per_thread"] == 1 + outer * (1 + inner * 3 + inner * 2 + 1) + 1
    trips = sorted((lp["python"].split(":")[-1], lp["trip"]) for lp in r["loops"] if lp["python"])
    assert trips == [("2", inner), ("2", inner), ("5", outer)]
