"""Global memory accesses of one Triton kernel, read from its TTIR (used by :mod:`benchmarks.kernel_report`).

For every ``tt.load`` / ``tt.store`` the pointer is traced back (through ``tt.addptr``, ``tt.splat``,
``tt.broadcast``, ``tt.expand_dims``, ``arith.select`` and loop-carried ``iter_args``) to the kernel
argument it indexes; the access moves ``tile elements × element size`` bytes each time it runs, and
it runs once per program times the trip counts of the ``scf.for`` loops around it (each loop mapped
to its Python ``for`` through the TTIR location and counted as in :mod:`benchmarks._sass`).  The
report takes ``min(requested, tensor size)`` per argument and direction: re-reads of a tensor that
fits in L2 (a shared table read by every program) are not DRAM traffic, a tile's masked tail is not
either.
"""

from __future__ import annotations

import re

from ._sass import eval_trip, for_loops

_ELT = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1, "u8": 1}
_PTR_OPS = ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "ttg.convert_layout")
_RE_DEF = re.compile(r"^\s*(%[\w]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_RE_LOCDEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")
_RE_PTRTYPE = re.compile(r"(?:tensor<([\dx]+)x)?!tt\.ptr<(\w+)>")


def _resolve_locs(lines: list[str]) -> dict[str, list[tuple[str, int]]]:
    raw = {}
    for ln in lines:
        if m := _RE_LOCDEF.match(ln.strip()):
            raw[m.group(1)] = m.group(2)
    memo: dict[str, list] = {}

    def res(key, depth=0):
        if key in memo or depth > 50:
            return memo.get(key, [])
        body = raw.get(key, "")
        frames = [(f, int(ln)) for f, ln in re.findall(r'"([^"]+)":(\d+)', body)]
        for ref in re.findall(r"#loc\d*", body):
            frames += res(ref, depth + 1)
        memo[key] = frames
        return frames

    return {k: res(k) for k in raw}


def _frames_of(line: str, locs: dict) -> list[tuple[str, int]]:
    m = re.search(r"loc\((#loc\d*|\"[^\"]+\":\d+:\d+)\)\s*$", line)
    if not m:
        return []
    ref = m.group(1)
    if ref.startswith("#"):
        return locs.get(ref, [])
    f, ln = re.match(r'"([^"]+)":(\d+)', ref).groups()
    return [(f, int(ln))]


def accesses(ttir: str, arg_names: list[str], values: dict, programs: int, hints: dict | None = None) -> dict:
    """{arg name: {"load": bytes requested, "store": bytes requested}} for one launch."""
    hints = hints or {}
    lines = ttir.splitlines()
    locs = _resolve_locs(lines)
    defs: dict[str, list[tuple[int, str, list[str]]]] = {}
    alias: dict[str, str] = {}  # loop-carried block arg -> init value
    func_args: dict[str, str] = {}  # SSA name of a kernel argument -> parameter name
    for ln in lines:
        if "tt.func" in ln:
            sig = ln.split("(", 1)[1]
            for i, a in enumerate(re.findall(r"(%[\w]+):\s*[!\w]", sig)):
                func_args[a] = arg_names[i] if re.match(r"%arg\d+$", a) and i < len(arg_names) else a[1:]
            break
    for i, ln in enumerate(lines):
        if m := _RE_DEF.match(ln):
            name, op, rest = m.groups()
            operands = re.findall(r"%[\w]+", rest.split(" : ")[0].split(" loc(")[0])
            defs.setdefault(name, []).append((i, op, operands))  # MLIR reuses names in sibling regions
            if op == "scf.for":
                for a, b in re.findall(
                    r"(%[\w]+)\s*=\s*(%[\w]+)", rest.split("iter_args", 1)[-1] if "iter_args" in rest else ""
                ):
                    alias[a] = b

    def base_arg(v: str, at: int, depth=0) -> str | None:
        """The kernel argument the pointer value ``v`` (used at line ``at``) is derived from."""
        if depth > 200:
            return None
        if v in alias:
            return base_arg(alias[v], at, depth + 1)
        if v in func_args:
            return func_args[v]
        cands = [d for d in defs.get(v, ()) if d[0] <= at]
        if not cands:
            return None
        line, op, ops = max(cands)  # the nearest definition before the use
        if op == "arith.select" and len(ops) >= 3:
            return base_arg(ops[1], line, depth + 1) or base_arg(ops[2], line, depth + 1)
        if op in _PTR_OPS and ops:
            return base_arg(ops[0], line, depth + 1)
        return None

    out: dict[str, dict[str, float]] = {}
    # first pass: find each scf.for's location (on its closing "} loc(...)" line) by brace matching
    for_trips: dict[int, float] = {}
    opens: list[tuple[int, bool]] = []
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith("}") and opens:
            j, is_for = opens.pop()
            if is_for:
                trip = 1.0
                for f, line in _frames_of(ln, locs):
                    for pf in for_loops(f):
                        if pf.line == line:
                            t, _ = eval_trip(pf, "", values, hints)
                            trip = t if t is not None else 1.0
                            break
                for_trips[j] = trip
        if s.endswith("{"):
            opens.append((i, "scf.for" in s))
    mult = 1.0
    opens2: list[float] = []
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith("}") and opens2:
            mult /= opens2.pop()
        if ("tt.load" in s or "tt.store" in s) and ("= tt.load" in s or s.startswith("tt.store")):
            m = re.search(r"(tt\.load|tt\.store)\s+(%[\w]+)", s)
            ty = _RE_PTRTYPE.search(s.split(" : ")[-1])
            if m and ty:
                arg = base_arg(m.group(2), i)
                if arg is not None:
                    shape, elt = ty.groups()
                    n = 1
                    if shape:
                        for d in shape.split("x"):
                            n *= int(d)
                    kind = "load" if m.group(1) == "tt.load" else "store"
                    d = out.setdefault(arg, {"load": 0.0, "store": 0.0})
                    d[kind] += n * _ELT.get(elt, 4) * mult * programs
        if s.endswith("{"):
            t = for_trips.get(i, 1.0)
            opens2.append(t)
            mult *= t
    return out
