"""benchmarks/summarize.py on small synthetic benchmark JSON (tests the summariser, not performance),
and the analytic DiT^DH FLOP count that the MFU numbers rest on."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


summarize = _load("summarize")
common = _load("common")

META = {
    "device": "NVIDIA H100 80GB HBM3",
    "commit": "abc123def4567890",
    "torch": "2.11.0",
    "triton": "3.6.0",
    "copy_gbps": 3000.0,
    "has_cuda": True,
}


def _op_case(op, mode="fwd+bwd", B=256, dtype="bf16", fused=0.1, **kw):
    info = {
        "op": op,
        "mode": mode,
        "B": B,
        "dtype": dtype,
        "scale": "paper",
        "fused_ms": fused,
        "eager_ms": fused * 5,
        "compiled_ms": fused * 2,
        "bytes": 270_000_000,
        "frac_copy_bw": 0.9,
    }
    info.update(kw)
    return {"name": f"test_fused[{op}-{mode}-{dtype}-B{B}]", "extra_info": info, "stats": {"median": 1.0}}


def _bench_json(meta=META, ops=summarize.OPS, e2e=True, extra=()):
    benches = []
    for i, op in enumerate(ops):
        benches.append(_op_case(op, mode="fwd", fused=0.05 + i))  # must lose to the fwd+bwd case
        benches.append(_op_case(op, fused=0.1 + i))
        benches.append(_op_case(op, B=64, fused=99.0))  # other batch: ignored
        benches.append(_op_case(op, dtype="fp32", fused=98.0))  # other dtype: ignored
    if e2e:
        benches.append(
            {
                "name": "tok",
                "extra_info": {
                    "case": "tokenizer_train_step",
                    "fused_img_s": 900.0,
                    "eager_img_s": 300.0,
                    "fused_peak_mb": 10000.0,
                    "eager_peak_mb": 20000.0,
                },
            }
        )
        benches.append(
            {"name": "tr", "extra_info": {"case": "ditdh_xl_train_step", "img_s": 500.0, "mfu": 0.41, "mfu_gemm": 0.5}}
        )
        benches.append(
            {
                "name": "sm",
                "extra_info": {"case": "ditdh_xl_sample", "img_s": 30.0, "mfu": 0.52, "mfu_gemm": 0.6, "steps": 50},
            }
        )
    benches.extend(extra)
    return {"machine_info": {}, "commit_info": {}, "benchmarks": benches, "rectok_fast": dict(meta)}


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


ENV = {"ceilings": {"copy_gbps": 4300.0, "gemm_tflops": 790.0}}


def test_summary_has_exactly_the_issue_keys_and_copies_numbers():
    s = summarize.summarize([_bench_json()], ENV)
    assert list(s) == ["device", "commit", "torch", "triton", "copy_gbps", "gemm_tflops", "ops", "end_to_end", "notes"]
    assert s["gemm_tflops"] == 790.0
    assert s["device"] == META["device"] and s["commit"] == META["commit"] and s["copy_gbps"] == 3000.0
    assert list(s["ops"]) == [
        "posterior_flow",
        "flow_matching_loss",
        "cosine_align_loss",
        "gather_tokens",
        "restore_tokens",
        "patchify",
    ]
    for i, (op, e) in enumerate(s["ops"].items()):
        assert list(e) == ["fused_ms", "eager_ms", "compiled_ms", "bytes", "frac_copy_bw"], op
        assert e["fused_ms"] == pytest.approx(0.1 + i)  # the fwd+bwd case at B=256 bf16
        assert e["eager_ms"] == pytest.approx(5 * (0.1 + i))
        assert e["compiled_ms"] == pytest.approx(2 * (0.1 + i))
        assert e["bytes"] == 270_000_000 and e["frac_copy_bw"] == 0.9
    assert s["end_to_end"] == {
        "tokenizer_train_step": {
            "fused_img_s": 900.0,
            "eager_img_s": 300.0,
            "fused_peak_mb": 10000.0,
            "eager_peak_mb": 20000.0,
        },
        "ditdh_xl_train_step": {"img_s": 500.0, "mfu": 0.41, "mfu_gemm": 0.5},
        "ditdh_xl_sample": {"img_s": 30.0, "mfu": 0.52, "mfu_gemm": 0.6, "steps": 50},
    }
    assert s["notes"] == {}
    assert summarize.summarize([_bench_json()])["notes"]["gemm_tflops"].startswith("no GEMM ceiling")


def test_dry_e2e_cases_never_enter_the_summary_and_short_runs_are_noted():
    data = _bench_json(e2e=True)
    for b in data["benchmarks"]:
        if b["extra_info"].get("case") == "ditdh_xl_train_step":
            b["extra_info"]["scale"] = "dry"
        if b["extra_info"].get("case") == "ditdh_xl_sample":
            b["extra_info"].update(steps=12, steps_note="12 of 50 Euler updates: the deadline")
    s = summarize.summarize([data], ENV)
    assert s["end_to_end"]["ditdh_xl_train_step"] == dict.fromkeys(summarize.E2E_KEYS["ditdh_xl_train_step"])
    assert s["end_to_end"]["ditdh_xl_sample"]["steps"] == 12
    assert "12 of 50" in s["notes"]["end_to_end.ditdh_xl_sample.steps_note"]
    assert "12 Euler steps" in summarize.readme_table(s)


def test_missing_values_are_null_with_a_reason():
    data = _bench_json(ops=["posterior_flow", "cosine_align_loss"], e2e=False)
    for b in data["benchmarks"]:
        if b["extra_info"]["op"] == "cosine_align_loss":
            b["extra_info"]["compiled_ms"] = None
            b["extra_info"]["compiled_error"] = "BackendCompilerFailed: boom"
    s = summarize.summarize([data])
    assert s["ops"]["gather_tokens"] == dict.fromkeys(summarize.OP_KEYS)
    assert "no GPU case of gather_tokens" in s["notes"]["ops.gather_tokens"]
    assert s["ops"]["cosine_align_loss"]["compiled_ms"] is None
    assert s["ops"]["cosine_align_loss"]["fused_ms"] == pytest.approx(1.1)
    assert s["notes"]["ops.cosine_align_loss.compiled_ms"] == "BackendCompilerFailed: boom"
    for name, keys in summarize.E2E_KEYS.items():
        assert s["end_to_end"][name] == dict.fromkeys(keys)
        assert "not in the benchmark JSON" in s["notes"][f"end_to_end.{name}"]


def test_forward_only_case_is_used_and_noted():
    data = _bench_json(ops=["patchify"], e2e=False)
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["mode"] == "fwd"]
    s = summarize.summarize([data])
    assert s["ops"]["patchify"]["fused_ms"] == pytest.approx(0.05)
    assert s["notes"]["ops.patchify"].startswith("forward only")


def test_cpu_small_cases_never_enter_the_summary():
    data = _bench_json(e2e=False)
    for b in data["benchmarks"]:
        b["extra_info"]["scale"] = "cpu-small"
    s = summarize.summarize([data])
    assert all(v is None for e in s["ops"].values() for v in e.values())


def test_files_of_one_run_merge_and_files_of_different_runs_are_refused():
    ops_json = _bench_json(e2e=True)
    e2e_json = copy.deepcopy(ops_json)
    ops_json["benchmarks"] = [b for b in ops_json["benchmarks"] if "op" in b["extra_info"]]
    e2e_json["benchmarks"] = [b for b in e2e_json["benchmarks"] if "case" in b["extra_info"]]
    e2e_json["rectok_fast"]["copy_gbps"] = None  # the e2e session measures no copy
    s = summarize.summarize([ops_json, e2e_json])
    assert s["copy_gbps"] == 3000.0 and s["end_to_end"]["ditdh_xl_sample"]["mfu"] == 0.52
    assert s["ops"]["patchify"]["fused_ms"] is not None
    other = copy.deepcopy(e2e_json)
    other["rectok_fast"]["commit"] = "fffffff"
    with pytest.raises(summarize.SummaryError, match="commit"):
        summarize.summarize([ops_json, other])


def test_not_a_benchmark_json_is_refused(tmp_path):
    p = _write(tmp_path, "x.json", {"hello": 1})
    with pytest.raises(summarize.SummaryError, match="not a pytest-benchmark JSON"):
        summarize.load_runs([p])


def test_readme_table_is_generated_and_inserted_between_markers(tmp_path):
    s = summarize.summarize([_bench_json()])
    table = summarize.readme_table(s)
    assert "NVIDIA H100 80GB HBM3" in table and "abc123def456" in table
    row = next(line for line in table.splitlines() if line.startswith("| `posterior_flow`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # fused 0.1 ms, eager 0.5, compiled 0.2; 270 MB in 0.1 ms = 2700 GB/s; 90 % of the copy
    assert cells[1:] == ["0.100", "0.500", "0.200", "5.00×", "2.00×", "2700", "90"]
    assert "| 900.0 | 300.0 | 3.00× |" in table and "41.0 % (50.0 %)" in table and "52.0 % (60.0 %)" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{summarize.START}\nold table\n{summarize.END}\nafter\n")
    assert summarize.insert_readme(str(readme), table)
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{summarize.END}\nafter\n")
    assert summarize.insert_readme(str(readme), table) and readme.read_text() == text  # idempotent

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    assert not summarize.insert_readme(str(plain), table)
    assert plain.read_text() == "no markers here\n"


def test_cli_writes_summary_and_readme(tmp_path, capsys):
    bench = _write(tmp_path, "bench.json", _bench_json())
    out = tmp_path / "res" / "summary.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{summarize.START}\n{summarize.END}\n")
    assert summarize.main([bench, "--out", str(out), "--readme", str(readme)]) == 0
    s = json.loads(out.read_text())
    assert s == summarize.summarize([_bench_json()])
    assert "| `patchify` |" in readme.read_text() and "| `patchify` |" in capsys.readouterr().out
    # the table alone, regenerated from the committed summary
    readme.write_text(f"x\n{summarize.START}\n{summarize.END}\n")
    assert summarize.main(["--summary", str(out), "--readme", str(readme)]) == 0
    assert summarize.readme_table(s) in readme.read_text()


def test_ditdh_analytic_flops_match_torch_flop_counter():
    """The MFU numerator: our formula equals torch's FlopCounterMode on a small DiT^DH (attention
    through the math SDPA backend so that its matmuls are counted)."""
    pytest.importorskip("rectok_fast.models.ditdh")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rectok_fast.models import DiTDH

    hidden, depth, C, g, B = (96, 128), (2, 1), 16, 8, 3
    model = DiTDH(
        hidden_size=hidden,
        depth=depth,
        num_heads=(4, 4),
        in_channels=C,
        input_size=g,
        num_classes=10,
        attn_backend="math",
    )
    x, t, y = torch.randn(B, C, g, g), torch.rand(B), torch.randint(0, 10, (B,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, y)
    want = common.ditdh_forward_flops(B, tokens=g * g, channels=C, hidden=hidden, depth=depth)
    assert fc.get_total_flops() == pytest.approx(want, rel=1e-3)
    assert common.ditdh_train_flops(B, tokens=g * g, channels=C, hidden=hidden, depth=depth) == 3 * want
    assert common.ditdh_sample_flops(
        B, 50, tokens=g * g, channels=C, hidden=hidden, depth=depth
    ) == 50 * common.ditdh_forward_flops(2 * B, tokens=g * g, channels=C, hidden=hidden, depth=depth)


def test_mfu_and_bandwidth_helpers():
    assert common.mfu(989e12, 1.0) == pytest.approx(1.0)
    assert common.mfu(989e12 / 2, 2.0) == pytest.approx(0.25)
    assert common.gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)
    assert common.gbps(None, 1.0) is None and common.gbps(10, 0.0) is None
