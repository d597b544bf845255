"""Turn pytest-benchmark JSON from ``benchmarks/`` into ``summary.json`` and the README's table.

Usage::

    python benchmarks/summarize.py BENCH.json [MORE.json ...] --out benchmarks/results/summary.json
    python benchmarks/summarize.py --readme [README.md]          # table from the committed summary
    python benchmarks/summarize.py BENCH.json --out S.json --readme README.md

``summary.json`` holds exactly: ``device``, ``commit``, ``torch``, ``triton``, ``copy_gbps``,
``gemm_tflops`` (the bf16 GEMM ceiling ``gpu_suite.sh`` measured in the same run, from ``--env
env.json``), ``ops`` (for each of the six ops: ``fused_ms``, ``eager_ms``, ``compiled_ms``, ``bytes``,
``frac_copy_bw``, forward+backward at B = 256, bf16, paper shapes), ``end_to_end``
(``tokenizer_train_step``, ``ditdh_xl_train_step``, ``ditdh_xl_sample``; MFU against the 989 TFLOP/s
datasheet figure, ``mfu``, and against the measured GEMM ceiling, ``mfu_gemm``) and ``notes``: for
every value that is null, or was taken from a forward-only case or a shortened run, the reason
(dotted path -> text).  Dry-run and CPU cases never enter it.  Every number is copied from the
benchmark JSON; nothing is typed here.  The README table is generated from the summary and inserted
between ``<!-- bench:start -->`` and ``<!-- bench:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

OPS = ["posterior_flow", "flow_matching_loss", "cosine_align_loss", "gather_tokens", "restore_tokens", "patchify"]
OP_KEYS = ["fused_ms", "eager_ms", "compiled_ms", "bytes", "frac_copy_bw"]
E2E_KEYS = {
    "tokenizer_train_step": ["fused_img_s", "eager_img_s", "fused_peak_mb", "eager_peak_mb"],
    "ditdh_xl_train_step": ["img_s", "mfu", "mfu_gemm"],
    "ditdh_xl_sample": ["img_s", "mfu", "mfu_gemm", "steps"],
}
SUMMARY_B, SUMMARY_DTYPE = 256, "bf16"
META_KEYS = ["device", "commit", "torch", "triton"]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SUMMARY = os.path.join(ROOT, "benchmarks", "results", "summary.json")


class SummaryError(ValueError):
    pass


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if "benchmarks" not in data:
            raise SummaryError(f"{p}: not a pytest-benchmark JSON (no 'benchmarks' list)")
        runs.append(data)
    return runs


def _meta(runs: list[dict], notes: dict) -> dict:
    """device / commit / torch / triton / copy_gbps: one value across the files, else an error."""
    out = {}
    for key in META_KEYS:
        values = {r.get("rectok_fast", {}).get(key) for r in runs} - {None}
        if len(values) > 1:
            raise SummaryError(f"the benchmark files disagree on {key}: {sorted(values)}; summarise one run at a time")
        out[key] = values.pop() if values else None
        if out[key] is None:
            notes[key] = "not recorded in the benchmark JSON (run through benchmarks/conftest.py)"
    copies = [r["rectok_fast"]["copy_gbps"] for r in runs if r.get("rectok_fast", {}).get("copy_gbps") is not None]
    out["copy_gbps"] = copies[0] if copies else None
    if len(set(copies)) > 1:
        notes["copy_gbps"] = (
            f"several sessions measured the copy; the first is reported ({', '.join(f'{c:.1f}' for c in copies)})"
        )
    if out["copy_gbps"] is None:
        notes["copy_gbps"] = "no per-op case ran, so no copy bandwidth was measured"
    return out


def _cases(runs: list[dict]) -> list[dict]:
    return [b.get("extra_info", {}) for r in runs for b in r["benchmarks"]]


def _op_entry(op: str, cases: list[dict], notes: dict) -> dict:
    entry = dict.fromkeys(OP_KEYS)
    matches = [
        c
        for c in cases
        if c.get("op") == op
        and c.get("B") == SUMMARY_B
        and c.get("dtype") == SUMMARY_DTYPE
        and c.get("scale") == "paper"
        and c.get("fused_ms") is not None
    ]
    full = [c for c in matches if c.get("mode") == "fwd+bwd"]
    chosen = (full or matches or [None])[-1]
    if chosen is None:
        notes[f"ops.{op}"] = (
            f"no GPU case of {op} at B={SUMMARY_B}, {SUMMARY_DTYPE}, paper shapes with a fused time in the benchmark JSON"
        )
        return entry
    if not full:
        notes[f"ops.{op}"] = "forward only: no fwd+bwd case in the benchmark JSON"
    for k in OP_KEYS:
        entry[k] = chosen.get(k)
        if entry[k] is None:
            why = chosen.get(k.replace("_ms", "_error")) or chosen.get(k.replace("_ms", "_skip")) or "not measured"
            notes[f"ops.{op}.{k}"] = why
    return entry


def _e2e_entry(name: str, cases: list[dict], notes: dict) -> dict:
    keys = E2E_KEYS[name]
    entry = dict.fromkeys(keys)
    matches = [c for c in cases if c.get("case") == name and c.get("scale", "paper") == "paper"]
    if not matches:
        notes[f"end_to_end.{name}"] = "not in the benchmark JSON (GPU-only case: skipped, failed or not run)"
        return entry
    chosen = matches[-1]
    for k in keys:
        entry[k] = chosen.get(k)
        if entry[k] is None:
            notes[f"end_to_end.{name}.{k}"] = "not recorded by the case"
    for err in ("compile_error", "fused_compile_error", "steps_note", "compile_note"):
        if chosen.get(err):
            notes[f"end_to_end.{name}.{err}"] = chosen[err]
    return entry


def summarize(runs: list[dict], env: dict | None = None) -> dict:
    notes: dict[str, str] = {}
    meta = _meta(runs, notes)
    cases = _cases(runs)
    summary = {k: meta[k] for k in META_KEYS}
    summary["copy_gbps"] = meta["copy_gbps"]
    summary["gemm_tflops"] = (env or {}).get("ceilings", {}).get("gemm_tflops")
    if summary["gemm_tflops"] is None:
        notes["gemm_tflops"] = "no GEMM ceiling measured in this run (pass gpu_suite.sh's env.json with --env)"
    summary["ops"] = {op: _op_entry(op, cases, notes) for op in OPS}
    summary["end_to_end"] = {name: _e2e_entry(name, cases, notes) for name in E2E_KEYS}
    summary["notes"] = notes
    return summary


# ------------------------------------------------------------------------------------ table


def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "—" if v is None else format(v * scale, fmt)


def _ratio(a, b) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def _mfu(e: dict) -> str:
    if e.get("mfu") is None:
        return "—"
    gemm = "" if e.get("mfu_gemm") is None else f" ({_f(e['mfu_gemm'], '.1f', 100.0)} %)"
    return f"{_f(e['mfu'], '.1f', 100.0)} %{gemm}"


def readme_table(summary: dict) -> str:
    """The README performance section (markdown), generated from ``summary``."""
    commit = summary.get("commit") or "unknown"
    lines = [
        f"Measured on **{summary.get('device') or 'unknown device'}**, commit `{commit[:12]}`, "
        f"torch {summary.get('torch') or '?'}, triton {summary.get('triton') or '?'}; "
        f"device-to-device copy {_f(summary.get('copy_gbps'), '.0f')} GB/s (read + write) and bf16 GEMM "
        f"{_f(summary.get('gemm_tflops'), '.0f')} TFLOP/s in the same run. "
        "Generated by `python benchmarks/summarize.py --readme` from `benchmarks/results/summary.json`; do not edit by hand.",
        "",
        f"| op (B = {SUMMARY_B}, {SUMMARY_DTYPE}, fwd+bwd) | fused ms | eager ms | compiled ms | vs eager | vs compiled | GB/s | % of copy BW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op, e in summary["ops"].items():
        bw = None if e.get("bytes") is None or not e.get("fused_ms") else e["bytes"] / (e["fused_ms"] * 1e-3) / 1e9
        lines.append(
            f"| `{op}` | {_f(e['fused_ms'], '.3f')} | {_f(e['eager_ms'], '.3f')} | {_f(e['compiled_ms'], '.3f')} | "
            f"{_ratio(e['eager_ms'], e['fused_ms'])} | {_ratio(e['compiled_ms'], e['fused_ms'])} | {_f(bw, '.0f')} | "
            f"{_f(e['frac_copy_bw'], '.0f', 100.0)} |"
        )
    e2e = summary["end_to_end"]
    tok, tr, sm = e2e["tokenizer_train_step"], e2e["ditdh_xl_train_step"], e2e["ditdh_xl_sample"]
    lines += [
        "",
        "| end to end | images/s | baseline images/s | speed-up | MFU of 989 TFLOP/s (of measured GEMM) | peak MiB (fused / eager) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| tokenizer train step (ViT-B, ViT-L teacher, B = 64) | {_f(tok['fused_img_s'], '.1f')} | {_f(tok['eager_img_s'], '.1f')} | "
        f"{_ratio(tok['fused_img_s'], tok['eager_img_s'])} | — | {_f(tok['fused_peak_mb'], '.0f')} / {_f(tok['eager_peak_mb'], '.0f')} |",
        f"| DiT^DH-XL train step | {_f(tr['img_s'], '.1f')} | — | — | {_mfu(tr)} | — |",
        f"| DiT^DH-XL sampling ({sm.get('steps') or 50} Euler steps, CFG, B = 256) | {_f(sm['img_s'], '.1f')} | — | — | {_mfu(sm)} | — |",
    ]
    if summary.get("notes"):
        lines += ["", "Notes:", ""] + [f"- `{k}`: {v}" for k, v in sorted(summary["notes"].items())]
    return "\n".join(lines)


def insert_readme(path: str, table: str) -> bool:
    """Replace the text between the markers of ``path`` with ``table``; False when there are no markers."""
    with open(path) as f:
        text = f.read()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return False
    new = text[: i + len(START)] + "\n" + table + "\n" + text[j:]
    with open(path, "w") as f:
        f.write(new)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench", nargs="*", help="pytest-benchmark JSON file(s) of one run")
    ap.add_argument("--out", help="write summary.json here (default with inputs: benchmarks/results/summary.json)")
    ap.add_argument("--env", help="the suite's env.json (the measured GEMM ceiling)")
    ap.add_argument("--summary", default=DEFAULT_SUMMARY, help="summary to build the table from when no JSON is given")
    ap.add_argument(
        "--readme",
        nargs="?",
        const=os.path.join(ROOT, "README.md"),
        help="print the table and insert it into this README",
    )
    args = ap.parse_args(argv)

    if args.bench:
        env = None
        if args.env:
            with open(args.env) as f:
                env = json.load(f)
        summary = summarize(load_runs(args.bench), env)
        out = args.out or DEFAULT_SUMMARY
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        if not os.path.exists(args.summary):
            ap.error(f"no benchmark JSON given and no summary at {args.summary}")
        with open(args.summary) as f:
            summary = json.load(f)
    if args.readme:
        table = readme_table(summary)
        print(table)
        if os.path.exists(args.readme) and insert_readme(args.readme, table):
            print(f"updated the table in {args.readme}", file=sys.stderr)
        else:
            print(f"{args.readme}: no {START} / {END} markers (or no file); table printed only", file=sys.stderr)
    elif not args.bench:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
