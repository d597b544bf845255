"""Helpers of ``benchmarks/gpu_suite.sh``: the environment and ceilings, merging JSON, the final report.

    python benchmarks/suite.py env OUT.json              # build info, versions, copy bandwidth, GEMM ceiling
    python benchmarks/suite.py merge OUT.json A.json B.json ...   # pytest-benchmark files of one run -> one
    python benchmarks/suite.py report DIR STEPS.tsv      # the readable summary the log ends with
    python benchmarks/suite.py pytest ARGS...            # pytest that stops cleanly on SIGINT

Nothing here invents a number: a measurement that fails is written as an ``error`` string and the
command exits non-zero; the report prints ``FAILED``/``missing`` for anything absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cmd_env(out: str) -> int:
    import common
    import torch

    env: dict = {"device": common.device_name(), "dry": common.DRY, "commit": common.commit(), **common.versions()}
    ok = True
    try:
        import rectok_fast

        env["build"] = rectok_fast.build_info()
    except Exception as e:
        env["build_error"] = f"{type(e).__name__}: {e}"
        ok = False
    if common.HAS_CUDA:
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception as e:
            env["nvidia_smi"] = f"unavailable: {e}"
        env["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    ceilings: dict = {}
    for name, fn in (("copy", common.copy_bandwidth), ("gemm", common.gemm_ceiling)):
        try:
            r = fn()
            key = "copy_gbps" if name == "copy" else "gemm_tflops"
            if not r.get(key) or r[key] <= 0:
                raise RuntimeError(f"{key} measured as {r.get(key)!r}")
            ceilings.update(r)
        except Exception as e:
            ceilings[f"{name}_error"] = f"{type(e).__name__}: {e}"
            ok = False
    if ceilings.get("gemm_tflops"):
        ceilings["gemm_frac_datasheet"] = ceilings["gemm_tflops"] / common.PEAK_BF16_TFLOPS
    ceilings["datasheet_bf16_tflops"] = common.PEAK_BF16_TFLOPS
    env["ceilings"] = ceilings
    with open(out, "w") as f:
        json.dump(env, f, indent=2, default=str)
    c = ceilings
    print(
        f"env: {env['device']}; copy {c.get('copy_gbps', float('nan')):.1f} GB/s; "
        f"{c.get('gemm_dtype', '?')} GEMM {c.get('gemm_tflops', float('nan')):.1f} TFLOP/s"
    )
    return 0 if ok else 1


def cmd_merge(out: str, inputs: list[str]) -> int:
    """Concatenate the ``benchmarks`` of pytest-benchmark files of one run (missing/empty inputs skipped)."""
    merged: dict | None = None
    used = []
    for p in inputs:
        if not os.path.exists(p) or os.path.getsize(p) == 0:
            continue
        with open(p) as f:
            data = json.load(f)
        used.append(os.path.basename(p))
        if merged is None:
            merged = data
            continue
        a, b = merged.get("rectok_fast", {}), data.get("rectok_fast", {})
        for key in ("device", "commit", "torch", "triton"):
            if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
                print(f"merge: {p} disagrees on {key}: {a[key]!r} vs {b[key]!r}", file=sys.stderr)
                return 1
        for k, v in b.items():
            if a.get(k) is None and v is not None:
                a[k] = v
        merged["benchmarks"].extend(data.get("benchmarks", []))
    if merged is None:
        print("merge: no input file was written", file=sys.stderr)
        return 1
    merged.setdefault("rectok_fast", {})["merged_from"] = used
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------- report


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _f(v, fmt: str = ".3g", unit: str = "") -> str:
    return "missing" if v is None else f"{format(v, fmt)}{unit}"


def _steps(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 5:
                rows.append(
                    {"name": parts[0], "status": parts[1], "rc": parts[2], "secs": parts[3], "limit": parts[4]}
                    | {"note": parts[5] if len(parts) > 5 else ""}
                )
    return rows


def _junit(path: str) -> tuple[str, list[str]]:
    if not os.path.exists(path):
        return "junit.xml missing (the test step did not run or was killed before writing it)", []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return f"junit.xml unreadable: {e}", []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:120] if el.get("message") else ""
                bad.append(f"{tag.upper()} {case.get('classname')}::{case.get('name')}: {msg}")
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    line = f"{tot['tests']} run: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped"
    return line, bad


def report_lines(d: str, steps_path: str) -> list[str]:
    L = ["", "=" * 30 + " GPU SUITE SUMMARY " + "=" * 30]
    env = _load(os.path.join(d, "env.json")) or {}
    c = env.get("ceilings", {})
    L.append(
        f"device {env.get('device', 'missing')}, commit {env.get('commit')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, cuda {env.get('cuda')}{' (DRY RUN: toy sizes on the CPU, not data)' if env.get('dry') else ''}"
    )
    L.append(
        f"ceilings: copy {_f(c.get('copy_gbps'), '.5g', ' GB/s')} (read+write); {c.get('gemm_dtype', '')} GEMM "
        f"{c.get('gemm_n', '')}^3 {_f(c.get('gemm_tflops'), '.4g', ' TFLOP/s')}"
        + (
            f" = {100 * c['gemm_frac_datasheet']:.3g} % of the 989 TFLOP/s datasheet"
            if c.get("gemm_frac_datasheet")
            else ""
        )
    )
    for k in ("copy_error", "gemm_error", "build_error"):
        if c.get(k) or env.get(k):
            L.append(f"  {k}: {c.get(k) or env.get(k)}")

    ops = _load(os.path.join(d, "bench_ops.json"))
    if ops is None:
        L.append("ops: bench_ops.json missing")
    else:
        L.append("ops (fused | eager | torch.compile(reference), ms median; GB/s; % of copy):")
        for b in ops.get("benchmarks", []):
            e = b.get("extra_info", {})
            if "op" not in e:
                continue
            sp = lambda k, e=e: f"{e[k]:.3g}x" if e.get(k) else "missing"  # noqa: E731
            L.append(
                f"  {e['op']:<19} {e.get('mode')} {e.get('dtype')} B={e.get('B')}: {_f(e.get('fused_ms'), '.4g')} | "
                f"{_f(e.get('eager_ms'), '.4g')} | {_f(e.get('compiled_ms'), '.4g')}; vs eager {sp('speedup_vs_eager')}, "
                f"vs compiled {sp('speedup_vs_compiled')}; {_f(e.get('fused_gbps'), '.4g', ' GB/s')}; "
                f"{_f(None if e.get('frac_copy_bw') is None else 100 * e['frac_copy_bw'], '.3g', ' %')}"
                + (f"; compile error: {e['compiled_error'][:100]}" if e.get("compiled_error") else "")
            )
        for b in ops.get("benchmarks", []):
            if b.get("extra_info", {}).get("op") is None and b.get("name"):
                L.append(f"  {b['name']}: no numbers recorded")

    e2e = _load(os.path.join(d, "bench_e2e.json"))
    cases = {b["extra_info"].get("case"): b["extra_info"] for b in (e2e or {}).get("benchmarks", [])}
    for name in ("ditdh_xl_train_step", "tokenizer_train_step", "ditdh_xl_sample"):
        e = cases.get(name)
        if e is None:
            L.append(f"{name}: missing (step failed, skipped or out of time)")
            continue
        note = f"; {e['steps_note']}" if e.get("steps_note") else ""
        err = "; " + "; ".join(
            f"{k}: {e[k][:120]}" for k in ("compile_error", "fused_compile_error", "compile_note") if e.get(k)
        )
        err = "" if err == "; " else err
        if name == "tokenizer_train_step":
            L.append(
                f"{name}: fused {_f(e.get('fused_img_s'), '.1f')} img/s vs eager {_f(e.get('eager_img_s'), '.1f')} img/s "
                f"({_f(e.get('speedup'), '.2f', 'x')}); step {_f(e.get('fused_step_ms'), '.1f')} / {_f(e.get('eager_step_ms'), '.1f')} ms; "
                f"peak {_f(e.get('fused_peak_mb'), '.0f')} / {_f(e.get('eager_peak_mb'), '.0f')} MiB; B={e.get('B')}, {e.get('steps')} steps{note}{err}"
            )
        else:
            what = f"step {_f(e.get('step_ms'), '.4g')} ms" if "step_ms" in e else f"run {_f(e.get('run_s'), '.2f')} s"
            L.append(
                f"{name}: {_f(e.get('img_s'), '.4g')} img/s, {what}, {_f(e.get('tflops'), '.4g')} TFLOP/s; MFU "
                f"{_f(None if e.get('mfu') is None else 100 * e['mfu'], '.3g', ' %')} of 989 datasheet, "
                f"{_f(None if e.get('mfu_gemm') is None else 100 * e['mfu_gemm'], '.3g', ' %')} of the measured GEMM ceiling; "
                f"B={e.get('B')}, {e.get('steps')} of {e.get('steps_planned')} steps; peak {_f(e.get('peak_mb'), '.0f', ' MiB')}{note}{err}"
            )

    attn = _load(os.path.join(d, "attention.json"))
    if attn is None:
        L.append("attention: attention.json missing")
    else:
        from bench_attention import report_lines as attn_lines

        L += attn_lines(attn)

    line, bad = _junit(os.path.join(d, "junit.xml"))
    L.append(f"GPU tests (cuda_only + gpu_smoke): {line}")
    L += [f"  {b}" for b in bad[:25]] + ([f"  ... and {len(bad) - 25} more"] if len(bad) > 25 else [])

    rows = _steps(steps_path)
    L.append("steps: " + "; ".join(f"{r['name']} {r['status']} {r['secs']}s/{r['limit']}s" for r in rows))
    failed = [r for r in rows if r["status"] != "ok"]
    L.append(
        "FAILED STEPS: "
        + (
            "; ".join(
                f"{r['name']} ({r['status']}, rc={r['rc']}{', ' + r['note'] if r['note'] else ''})" for r in failed
            )
            or "none"
        )
    )
    files = sorted(os.listdir(d)) if os.path.isdir(d) else []
    L.append(f"files in OUT ({len(files)}): {' '.join(files)}")
    return L


def cmd_pytest(args: list[str]) -> int:
    """pytest with SIGINT set to KeyboardInterrupt whatever it inherited: a shell without job control
    starts background jobs with SIGINT ignored and Python keeps an inherited SIG_IGN, so without this
    the suite's ``timeout --signal=INT`` could fail to stop pytest cleanly (junit.xml then lost)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, os.getcwd())  # as ``python -m pytest`` does
    import pytest

    return int(pytest.main(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "pytest":
        return cmd_pytest(argv[1:])
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env" and len(rest) == 1:
        return cmd_env(rest[0])
    if cmd == "merge" and len(rest) >= 2:
        return cmd_merge(rest[0], rest[1:])
    if cmd == "report" and len(rest) == 2:
        print("\n".join(report_lines(rest[0], rest[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
