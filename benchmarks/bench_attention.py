"""Attention backends side by side, forward + backward, and the ``auto`` table made from the result.

    python benchmarks/bench_attention.py --out attention.json             # measure (GPU; --dry: CPU toy)
    python benchmarks/bench_attention.py --table attention.json           # write rectok_fast/nn/attention_table.py

Shapes (bf16): ViT-B, B = 64, N = 192 and 256, 12 heads × 64; DiT^DH-XL, B = 64, N = 256, 16 × 72.
Every backend that :func:`rectok_fast.nn.attention.available_backends` lists (and ``auto``) is run
on each shape: first checked against the fp32 math reference (the output must be finite and within
the flash-attention rule's reach: relative error < 2e-2), then timed (CUDA events, median, fwd +
bwd through ``attention(..., backend=name)``, head-dim padding included as users get it).  A backend
that raises or is wrong is recorded with its error and no time; no time is ever 0 or made up.

``--table`` turns the measurement into the committed table ``auto`` consults: per GPU capability and
:func:`~rectok_fast.nn.attention.shape_class`, the backends that ran correctly, fastest first (the
sum of their medians over the class's shapes; a backend missing from one of the class's shapes is
left out).  It refuses dry runs and files without a GPU capability.
"""

from __future__ import annotations

import argparse
import json
import os
import pprint
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_PATH = os.path.join(ROOT, "rectok_fast", "nn", "attention_table.py")
# (name, B, heads, N, head_dim)
SHAPES = [
    ("vit_b_n192", 64, 12, 192, 64),
    ("vit_b_n256", 64, 12, 256, 64),
    ("ditdh_xl_n256", 64, 16, 256, 72),
]
DRY_SHAPES = [("toy_hd64", 2, 2, 16, 64), ("toy_hd72", 2, 2, 16, 72)]
MAX_REL_ERR = 2e-2


def _attn():
    import rectok_fast.nn.attention  # noqa: F401  (the package re-exports the function under this name)

    return sys.modules["rectok_fast.nn.attention"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def measure(shapes, device: str, deadline: float = float("inf")) -> dict:
    A = _attn()
    dtype = torch.bfloat16
    names = [n for n in A.available_backends() if n != "math"] + ["auto", "math"]
    rows = []
    for label, B, H, N, D in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=device, generator=g, dtype=dtype) for _ in range(3))
        dout = torch.randn(B, H, N, D, device=device, generator=g, dtype=dtype)
        ref = A.attention_math(q.float(), k.float(), v.float())
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        for name in names:
            row = {"shape": label, "B": B, "heads": H, "N": N, "head_dim": D, "dtype": "bf16", "backend": name}
            row["shape_class"] = A.shape_class(dtype, D, N)
            rows.append(row)
            if time.time() > deadline:
                row["error"] = "skipped: the suite's deadline passed"
                continue
            try:
                out = A.attention(q, k, v, backend=name)
                row["ran"] = common_last_backend()
                row["padded_head_dim"] = A.supported_head_dim(row["ran"], D)
                row["rel_err"] = _rel(out, ref)
                if not torch.isfinite(out.float()).all() or row["rel_err"] > MAX_REL_ERR:
                    row["error"] = f"wrong result: relative error {row['rel_err']:.3g} against the fp32 math reference"
                    continue

                def fwd_bwd(name=name, qg=qg, kg=kg, vg=vg, dout=dout):
                    o = A.attention(qg, kg, vg, backend=name)
                    torch.autograd.grad(o, (qg, kg, vg), dout)

                def fwd(name=name, q=q, k=k, v=v):
                    with torch.no_grad():
                        A.attention(q, k, v, backend=name)

                fwd_bwd()
                t = common.time_ms(fwd_bwd)
                row.update(fwd_bwd_ms=t["ms"], fwd_bwd_ms_p20=t["ms_p20"], fwd_bwd_ms_p80=t["ms_p80"])
                row["fwd_ms"] = common.time_ms(fwd)["ms"]
                # fwd 4·B·H·N²·D matmul FLOPs, bwd 2.5× that (5 matmuls of the same size)
                flops = 4 * B * H * N * N * D * 3.5
                row["tflops"] = flops / (t["ms"] * 1e-3) / 1e12
            except Exception as e:  # a backend without a kernel for this GPU / dtype / head dim
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    cap = None
    if device == "cuda":
        cap = "{}.{}".format(*torch.cuda.get_device_capability())
    return {
        "rectok_fast": {
            "device": common.device_name(),
            "capability": cap,
            "commit": common.commit(),
            "dry": common.DRY or device != "cuda",
            **common.versions(),
        },
        "results": rows,
    }


def common_last_backend() -> str:
    import rectok_fast

    return rectok_fast.last_backend("attention")


def make_table(data: dict) -> tuple[dict, dict]:
    """``(TABLE entries for this capability, SOURCE entry)`` from a measurement."""
    meta = data.get("rectok_fast", {})
    cap = meta.get("capability")
    if meta.get("dry") or not cap:
        raise SystemExit("bench_attention --table: a GPU measurement is needed (this file is a dry/CPU run)")
    by_class: dict[str, dict[str, list[float]]] = {}
    shapes_of: dict[str, set] = {}
    for r in data["results"]:
        cls = r.get("shape_class")
        if cls is None or r["backend"] in ("auto", "math", "sdpa"):
            continue  # the table lists concrete backends; plain sdpa is the fallback anyway
        shapes_of.setdefault(cls, set()).add(r["shape"])
        if r.get("fwd_bwd_ms"):
            by_class.setdefault(cls, {}).setdefault(r["backend"], []).append(r["fwd_bwd_ms"])
    entries = {}
    for cls, per in by_class.items():
        full = {b: sum(ts) for b, ts in per.items() if len(ts) == len(shapes_of[cls])}
        if full:
            entries[cls] = sorted(full, key=full.get)
    source = {k: meta.get(k) for k in ("device", "commit", "torch", "triton", "cuda")}
    return entries, source


def write_table(path_json: str, out: str = TABLE_PATH) -> str:
    with open(path_json) as f:
        data = json.load(f)
    entries, source = make_table(data)
    cap = data["rectok_fast"]["capability"]
    mod = {}
    if os.path.exists(out):
        ns: dict = {}
        exec(compile(open(out).read(), out, "exec"), ns)  # our own generated file
        mod = {"TABLE": ns.get("TABLE", {}), "SOURCE": ns.get("SOURCE", {})}
    table, sources = dict(mod.get("TABLE", {})), dict(mod.get("SOURCE", {}))
    table[cap], sources[cap] = entries, source
    text = (
        '"""Measured preference order of attention backends for ``attention(..., backend="auto")``.\n\n'
        "``TABLE[capability][shape_class]`` is a list of backend names, fastest first (forward + backward),\n"
        'for CUDA compute capability ``"major.minor"`` and :func:`rectok_fast.nn.attention.shape_class`\n'
        '(``"bf16-hd64-short"``: dtype, head dim, N <= 512 or longer).  ``auto`` takes the first backend of\n'
        "the entry that is runnable here and falls back to its built-in order where the table has no entry.\n\n"
        "Generated by ``python benchmarks/bench_attention.py --table RESULT.json`` from a GPU run's\n"
        "``attention.json``; do not edit by hand.  ``SOURCE`` names the measurement each entry came from.\n"
        '"""\n\nfrom __future__ import annotations\n\n'
        f"SOURCE: dict[str, dict] = {pprint.pformat(sources, width=110, sort_dicts=True)}\n\n"
        f"TABLE: dict[str, dict[str, list[str]]] = {pprint.pformat(table, width=110, sort_dicts=True)}\n"
    )
    with open(out, "w") as f:
        f.write(text)
    return out


def report_lines(data: dict) -> list[str]:
    """Short readable lines of a measurement (the suite's log summary)."""
    lines = []
    for r in data.get("results", []):
        head = f"attention {r['shape']} {r['backend']:>14}"
        if r.get("fwd_bwd_ms"):
            lines.append(
                f"{head}: fwd+bwd {r['fwd_bwd_ms']:.4g} ms, fwd {r['fwd_ms']:.4g} ms, {r['tflops']:.4g} TFLOP/s"
                f" (ran {r['ran']}, head dim {r['padded_head_dim']}, rel err {r['rel_err']:.1e})"
            )
        else:
            lines.append(f"{head}: FAILED {r.get('error', 'no time recorded')}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the measurement JSON here")
    ap.add_argument("--dry", action="store_true", help="toy shapes on the CPU (the same logic; not data)")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="epoch seconds: later cases are skipped")
    ap.add_argument("--table", metavar="JSON", help="write rectok_fast/nn/attention_table.py from a measurement")
    ap.add_argument("--table-out", default=TABLE_PATH, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        print(f"wrote {write_table(args.table, args.table_out)}")
        return 0
    dry = args.dry or common.DRY
    device = "cuda" if (common.HAS_CUDA and not dry) else "cpu"
    if device == "cpu" and not dry:
        ap.error("no GPU here: pass --dry for the toy CPU run")
    data = measure(DRY_SHAPES if dry else SHAPES, device, args.deadline)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
    print("\n".join(report_lines(data)))
    timed = [r for r in data["results"] if r.get("fwd_bwd_ms")]
    return 0 if timed else 1


if __name__ == "__main__":
    sys.exit(main())
