"""Static analysis of one compiled CUDA kernel: ``ptxas -v`` log, resource usage and SASS.

Used by :mod:`benchmarks.kernel_report`.  Everything here reads files the compiler produced (the
cubin, the ptxas log); nothing runs on a GPU.  The SASS is disassembled with the ``nvdisasm`` /
``cuobjdump`` shipped inside the triton wheel (``triton/backends/nvidia/bin``), with line info,
so every instruction knows the Python source lines (and the inlining chain) it came from.

Instructions executed per thread (:func:`analyze_sass`) are counted on the control-flow graph:

* a *loop* is a backward branch (target address <= branch address); its body is the address range
  [target, branch].  A loop whose instructions carry the line of a Python ``for`` statement of the
  kernel source is that ``for``: its body is counted ``trip`` times (``trip`` from the launch's
  arguments, see :func:`for_loops`), nested loops multiply;
* a loop that maps to no Python ``for`` is library code (e.g. the Payne-Hanek argument reduction of
  libdevice ``cos``/``sin`` for huge arguments, ~never taken).  The region skipped by the nearest
  preceding forward conditional branch that jumps past it is *cold*: compiled in (it costs
  registers, a stack frame and code size) but counted as not executed;
* every other instruction, both sides of an ``if`` included, counts once: predicated-off
  instructions still issue.  This over-counts divergent ``if``/``else`` code (documented in the
  report).
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field


def tool(name: str) -> str:
    """Path of ``nvdisasm`` / ``cuobjdump`` / ``ptxas`` inside the triton wheel (else on PATH)."""
    import triton

    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(p):
        return p
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in the triton wheel nor on PATH")
    return found


# ----------------------------------------------------------------------------- ptxas / resource usage

_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """``ptxas -v`` output -> {regs, stack, spill_stores, spill_loads, spills, smem_static} (None if absent)."""
    out = {"regs": None, "stack": None, "spill_stores": None, "spill_loads": None, "spills": None, "smem_static": 0}
    if m := _RE_REGS.search(log):
        out["regs"] = int(m.group(1))
    if m := _RE_SPILL.search(log):
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
        out["spills"] = out["spill_stores"] + out["spill_loads"]
    if m := _RE_SMEM.search(log):
        out["smem_static"] = int(m.group(1))
    return out


def resource_usage(cubin_path: str) -> dict:
    """``cuobjdump -res-usage``: {REG, STACK, SHARED, LOCAL} of the (single) function in the cubin."""
    txt = subprocess.run([tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True).stdout
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", txt)
        out[key] = int(m.group(1)) if m else None
    return out


# ----------------------------------------------------------------------------- SASS parsing

_RE_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_RE_FILE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_RE_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_RE_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Instr:
    addr: int
    pred: str | None
    op: str  # full opcode with modifiers, e.g. "LDG.E.128"
    text: str
    frames: tuple  # ((file, line), ...) innermost first
    target: str | None = None  # branch label


@dataclass
class SassInfo:
    instrs: list[Instr]
    labels: dict[str, int]  # label -> address


def disassemble_all(cubin_path: str) -> dict[str, SassInfo]:
    """Every function of a cubin: name -> its SASS (``nvdisasm -c -gi``: with line info)."""
    txt = subprocess.run([tool("nvdisasm"), "-c", "-gi", cubin_path], capture_output=True, text=True, check=True).stdout
    out: dict[str, SassInfo] = {}
    cur: SassInfo | None = None
    pending_labels: list[str] = []
    frames: list[tuple[str, int]] = []
    frames_done = True
    for line in txt.splitlines():
        if line.startswith("//----"):
            m = re.search(r"\.text\.(\S+)", line)
            cur = out.setdefault(m.group(1), SassInfo([], {})) if m else None
            pending_labels, frames, frames_done = [], [], True
            continue
        if cur is None:
            continue
        if m := _RE_FILE.search(line):
            if frames_done:
                frames = []
                frames_done = False
            for fr in ((m.group(1), int(m.group(2))), (m.group(3), int(m.group(4) or 0))):
                if fr[0] and (not frames or frames[-1] != fr):
                    frames.append(fr)
            continue
        if m := _RE_LABEL.match(line):
            pending_labels.append(m.group(1))
            continue
        if m := _RE_INSTR.match(line):
            addr = int(m.group(1), 16)
            body = m.group(2).rstrip(" ;")
            pred = None
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            op = body.split()[0] if body else ""
            t = _RE_TARGET.search(body)
            for lab in pending_labels:
                cur.labels[lab] = addr
            pending_labels = []
            frames_done = True
            cur.instrs.append(Instr(addr, pred, op, body, tuple(frames), t.group(1) if t else None))
    return out


def disassemble(cubin_path: str) -> SassInfo:
    """The SASS of a single-kernel cubin (a Triton kernel)."""
    funcs = disassemble_all(cubin_path)
    return max(funcs.values(), key=lambda f: len(f.instrs))


# ----------------------------------------------------------------------------- Python for-loops


@dataclass(frozen=True)
class PyFor:
    file: str
    line: int
    end_line: int
    func: str  # enclosing function name
    args: tuple  # source text of range() args, or () when not a range() (a while loop, an iterator)
    local_defs: tuple = ()  # (name, source) of the simple assignments before the loop in its function
    test: str = ""  # a while loop's condition (source text)


@functools.cache
def for_loops(path: str) -> tuple[PyFor, ...]:
    """Every ``for`` / ``while`` statement of a Python file with its enclosing function, range() args
    and the function's simple assignments that precede it (to evaluate bounds such as ``b0, b1``)."""
    try:
        src = open(path).read()
        tree = ast.parse(src)
    except (OSError, SyntaxError):
        return ()
    out = []

    def visit(node, func, assigns):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name, [])
                continue
            if isinstance(child, ast.Assign) and len(child.targets) == 1 and isinstance(child.targets[0], ast.Name):
                assigns.append((child.targets[0].id, ast.get_source_segment(src, child.value)))
            if isinstance(child, (ast.For, ast.While)):
                args = ()
                it = getattr(child, "iter", None)
                if isinstance(it, ast.Call) and getattr(it.func, "id", getattr(it.func, "attr", "")) in (
                    "range",
                    "static_range",
                ):
                    args = tuple(ast.get_source_segment(src, a) for a in it.args)
                end = child.end_lineno or child.lineno
                test = ast.get_source_segment(src, child.test) if isinstance(child, ast.While) else ""
                out.append(PyFor(path, child.lineno, end, func, args, tuple(assigns), test or ""))
            visit(child, func, assigns)

    visit(tree, "", [])
    return tuple(out)


class _Env(dict):
    """Names for evaluating a loop bound: launch arguments, then the kernel's earlier assignments
    (evaluated for program 0, ``tl.program_id`` = 0), ``tl.minimum``/``maximum``/``cdiv``."""

    def __init__(self, values: dict, local_defs: tuple):
        super().__init__(values)
        self.local_defs = dict(local_defs)
        self.busy: set = set()

    def __missing__(self, key):
        if key in self.local_defs and key not in self.busy:
            self.busy.add(key)
            try:
                v = _eval_expr(self.local_defs[key], self)
            finally:
                self.busy.discard(key)
            self[key] = v
            return v
        raise KeyError(key)


class _TL:
    int64 = int32 = int16 = int8 = uint32 = float32 = float64 = None

    def __init__(self, grid):
        self.grid = grid

    def program_id(self, axis=0):
        return 0

    def num_programs(self, axis=0):
        return self.grid[axis]

    minimum = staticmethod(min)
    maximum = staticmethod(max)

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)


def _eval_expr(src: str, env: dict):
    src = re.sub(r"\.to\([^()]*\)", "", src)
    return eval(src, {"__builtins__": {}, "min": min, "max": max}, env)  # noqa: S307 - kernel source text


def eval_trip(loop: PyFor, kernel_name: str, values: dict, hints: dict) -> tuple[float | None, str]:
    """Trip count of ``loop`` given the launch's argument values (names -> ints/constexprs).

    Returns (trip, how): ``how`` is "args" (computed from the arguments and the kernel's earlier
    assignments, for program 0), "hint" (a data-dependent bound estimated by the report's op
    description), or "unknown" (trip None: a while loop or a bound read from memory)."""
    if len(loop.args) in (1, 2, 3):
        vals = {k: v for k, v in values.items() if not k.startswith("__")}
        env = _Env(vals, loop.local_defs)
        env["tl"] = _TL(values.get("__grid__", (1, 1, 1)))
        try:
            bounds = [_eval_expr(a, env) for a in loop.args]
            bounds = [int(v.value if hasattr(v, "value") else v) for v in bounds]
            return float(len(range(*bounds))), "args"
        except Exception:
            pass
        for a in loop.args:
            if a in hints:
                return float(hints[a]), "hint"
    if loop.test and (loop.test in hints or "*while*" in hints):
        return float(hints.get(loop.test, hints.get("*while*"))), "hint"
    return None, "unknown"


# ----------------------------------------------------------------------------- CFG analysis

# global loads: to registers (LDG, LD) and asynchronous copies to shared memory (LDGSTS, cp.async:
# the tl.dot operand pipelines); LDGDEPBAR is the barrier that waits for them, not a load
_GLOBAL_LOADS = ("LDG", "LD", "LDGSTS")
_MEM_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def mem_width(op: str) -> int:
    """Bytes per thread of an LDG/STG/LDS/... opcode (LDG.E.128 -> 16, LDG.E -> 4)."""
    for part in op.split(".")[1:]:
        if part in _MEM_WIDTH:
            return _MEM_WIDTH[part]
    return 4


@dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    pyfor: PyFor | None = None
    trip: float | None = None
    how: str = ""
    parent: int | None = None
    children: list = field(default_factory=list)


def _is_repo_file(path: str) -> bool:
    return "site-packages" not in path and "dist-packages" not in path


def _call_site(ins: list, lp: Loop) -> tuple:
    """The frames outside the Python loop ``lp.pyfor`` (where its function was inlined), the most
    common chain among the loop's instructions; () for a loop in the kernel's own body."""
    pf = lp.pyfor
    counts: dict[tuple, int] = {}
    for i in range(lp.start, lp.end + 1):
        fr = ins[i].frames
        for k, (f, line) in enumerate(fr):
            if f == pf.file and pf.line <= line <= pf.end_line:
                key = tuple(fr[k + 1 :])
                counts[key] = counts.get(key, 0) + 1
                break
    return max(counts, key=counts.get) if counts else ()


def analyze_sass(
    sass: SassInfo, kernel_name: str, values: dict, hints: dict | None = None, unmapped_trip: float | None = None
) -> dict:
    """Executed instructions per thread, memory instructions, loops and cold code of one kernel."""
    hints = hints or {}
    ins = sass.instrs
    # drop the trailing self-branch trap and NOP padding after the last EXIT
    last_exit = max((i for i, x in enumerate(ins) if x.op == "EXIT"), default=len(ins) - 1)
    n = len(ins)
    live = [True] * n
    for i in range(last_exit + 1, n):
        x = ins[i]
        if x.op == "NOP" or (x.op == "BRA" and x.target and sass.labels.get(x.target) == x.addr):
            live[i] = False
    idx_of = {x.addr: i for i, x in enumerate(ins)}

    # loops: backward branches
    loops: list[Loop] = []
    for i, x in enumerate(ins):
        if x.op.startswith("BRA") and x.target in sass.labels:
            t = idx_of.get(sass.labels[x.target])
            if t is not None and t < i and live[i]:
                loops.append(Loop(t, i))
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for j, lp in enumerate(loops):  # innermost enclosing loop = parent
        best = None
        for k, other in enumerate(loops):
            if (
                k != j
                and other.start <= lp.start
                and lp.end <= other.end
                and (other.end - other.start) > (lp.end - lp.start)
            ):
                if best is None or (other.end - other.start) < (loops[best].end - loops[best].start):
                    best = k
        lp.parent = best
        if best is not None:
            loops[best].children.append(j)

    # map loops to Python for statements: the for line must appear among the loop's own instructions
    fors_by_file: dict[str, tuple[PyFor, ...]] = {}
    for x in ins:
        for f, _ in x.frames:
            if f not in fors_by_file and _is_repo_file(f):
                fors_by_file[f] = for_loops(f)
    # a SASS loop is the Python loop whose line appears among its instructions closest to the
    # outermost frame (a helper's while inlined into a for body sits one frame deeper than the for)
    for lp in loops:
        # the back edge carries its loop's line (the induction step and the branch): the innermost
        # frame of the branch that is a for/while line names the loop; instructions scheduled into
        # a loop from outside it (hoisted address math of an enclosing loop) cannot mislead that
        edge = next((pf for f, line in ins[lp.end].frames for pf in fors_by_file.get(f, ()) if pf.line == line), None)
        if edge is not None:
            lp.pyfor = edge
            lp.trip, lp.how = eval_trip(lp.pyfor, kernel_name, values, hints)
            continue
        best: dict[PyFor, tuple] = {}
        for i in range(lp.start, lp.end + 1):
            fr = ins[i].frames
            for depth_from_inner, (f, line) in enumerate(fr):
                depth = len(fr) - 1 - depth_from_inner
                for pf in fors_by_file.get(f, ()):
                    if pf.line == line:
                        d, c = best.get(pf, (depth, 0))
                        best[pf] = (min(d, depth), c + 1)
        if best:
            lp.pyfor = min(best, key=lambda p: (best[p][0], -(p.end_line - p.line), -best[p][1]))
            lp.trip, lp.how = eval_trip(lp.pyfor, kernel_name, values, hints)
    # several back edges of one Python loop: overlapping ones are one loop (a loop with several
    # latches), disjoint ones are copies (an unrolled main loop + its remainder) that share the trips
    # in proportion to their body sizes (total ~ trips x the smallest body).  Copies of a loop in a
    # @triton.jit helper inlined at different call sites are different loops: each runs its trips.
    groups: dict[tuple, list[Loop]] = {}
    for lp in loops:
        if lp.pyfor is not None:
            groups.setdefault((lp.pyfor, _call_site(ins, lp)), []).append(lp)
    merged: list[Loop] = [lp for lp in loops if lp.pyfor is None]
    for (pf, _site), lps in groups.items():
        lps.sort(key=lambda lp: lp.start)
        runs: list[Loop] = []
        for lp in lps:
            if runs and lp.start <= runs[-1].end:
                runs[-1].end = max(runs[-1].end, lp.end)
            else:
                runs.append(Loop(lp.start, lp.end, pf, lp.trip, lp.how))
        if len(runs) > 1 and runs[0].trip is not None:
            smallest = min(r.end - r.start + 1 for r in runs)
            for r in runs:
                r.trip = runs[0].trip * smallest / (r.end - r.start + 1) / len(runs)
                r.how += f" (shared by {len(runs)} copies of the loop)"
        merged += runs
    loops = sorted(merged, key=lambda lp: (lp.start, -lp.end))

    # cold regions: library loops (no Python for) skipped by a forward conditional branch
    cold = [False] * n
    for lp in loops:
        if lp.pyfor is not None or unmapped_trip is not None:
            continue
        for i in range(lp.start - 1, -1, -1):
            x = ins[i]
            if x.op.startswith("BRA") and x.pred and x.target in sass.labels:
                tgt = idx_of.get(sass.labels[x.target])
                if tgt is not None and tgt > lp.end:
                    for k in range(i + 1, tgt):
                        cold[k] = True
                    break
    # multiplier per instruction
    mult = [1.0] * n
    unknown_loops = []
    for lp in loops:
        if lp.pyfor is None and unmapped_trip is not None:
            lp.trip, lp.how = unmapped_trip, "grid-stride loop: one pass per thread (the grid covers the work)"
            for i in range(lp.start, lp.end + 1):
                mult[i] *= unmapped_trip
            continue
        if lp.pyfor is None:
            if not cold[lp.start]:
                unknown_loops.append({"sass_range": [hex(ins[lp.start].addr), hex(ins[lp.end].addr)], "python": None})
            continue
        trip = lp.trip
        if trip is None:
            unknown_loops.append(
                {"sass_range": [hex(ins[lp.start].addr), hex(ins[lp.end].addr)], "python": f"line {lp.pyfor.line}"}
            )
            trip = 1.0
        for i in range(lp.start, lp.end + 1):
            mult[i] *= trip

    executed = 0.0
    static_hot = 0
    static_cold = 0
    mem: dict[str, dict] = {}
    ld_bytes = st_bytes = 0.0
    barriers = 0.0  # BAR.SYNC executed per thread: cross-warp reductions / layout conversions
    inflight_loads = 0.0  # bytes per thread of global loads in one pass of the innermost hot region
    for i, x in enumerate(ins):
        if not live[i]:
            continue
        if cold[i]:
            static_cold += 1
            continue
        static_hot += 1
        executed += mult[i]
        base = x.op.split(".")[0]
        if base == "BAR":
            barriers += mult[i]
        if base in ("LDG", "LDGSTS", "STG", "LD", "ST", "RED", "ATOM", "ATOMG", "LDL", "STL", "LDS", "STS"):
            d = mem.setdefault(x.op, {"static": 0, "executed": 0.0})
            d["static"] += 1
            d["executed"] += mult[i]
            if base in _GLOBAL_LOADS:
                ld_bytes += mult[i] * mem_width(x.op)
            elif base in ("STG", "ST", "RED", "ATOMG"):
                st_bytes += mult[i] * mem_width(x.op)
    # bytes in flight per thread: global loads of the hot region with the largest trip product
    # (the loop body a thread spends its time in, or the whole kernel without loops)
    if loops and any(lp.pyfor is not None for lp in loops):
        top = max((lp for lp in loops if lp.pyfor is not None), key=lambda lp: lp.trip or 1.0)
        rng = range(top.start, top.end + 1)
    else:
        rng = range(n)
    for i in rng:
        x = ins[i]
        if live[i] and not cold[i] and x.op.split(".")[0] in _GLOBAL_LOADS:
            inflight_loads += mem_width(x.op)

    return {
        "executed_per_thread": executed,
        "static_hot": static_hot,
        "static_cold": static_cold,
        "mem_instructions": mem,
        "global_load_widths": sorted(
            {x.op for i, x in enumerate(ins) if live[i] and not cold[i] and x.op.split(".")[0] in _GLOBAL_LOADS}
        ),
        "global_store_widths": sorted(
            {x.op for i, x in enumerate(ins) if live[i] and not cold[i] and x.op.startswith("STG")}
        ),
        "barriers_per_thread": barriers,
        "load_bytes_per_thread": ld_bytes,
        "store_bytes_per_thread": st_bytes,
        "inflight_load_bytes_per_thread": inflight_loads,
        "loops": [
            {
                "sass_range": [hex(ins[lp.start].addr), hex(ins[lp.end].addr)],
                "python": None if lp.pyfor is None else f"{os.path.basename(lp.pyfor.file)}:{lp.pyfor.line}",
                "trip": lp.trip,
                "trip_from": lp.how or ("cold library loop" if cold[lp.start] else "unmapped"),
                "body": lp.end - lp.start + 1,
            }
            for lp in loops
        ],
        "unknown_loops": unknown_loops,
        "has_cold_slow_path": static_cold > 0,
    }


def write_temp(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def one_pass_estimate(sass: SassInfo) -> dict:
    """Executed instructions of a grid-stride CUDA kernel whose grid covers the work (one pass per
    thread).  nvcc peels the first iteration of such a loop and exits right after it when the thread
    has no second element: count the code from the entry to the first ``EXIT`` after the first
    global store (both sides of any branch in it; subroutines it calls are not counted).  Without that
    shape: the code before the first loop + the smallest loop body.  An approximation, documented."""
    full = analyze_sass(sass, "", {}, unmapped_trip=1.0)
    ins = sass.instrs
    first_st = next((i for i, x in enumerate(ins) if x.op.startswith("STG")), None)
    end = None
    if first_st is not None:
        end = next((i for i in range(first_st, len(ins)) if ins[i].op == "EXIT"), None)
    if end is not None:
        rng = list(range(0, end + 1))
        full["estimate"] = "entry to the first EXIT after the first global store (peeled first grid-stride pass)"
    else:
        loops = full["loops"]
        if not loops:
            return full
        idx = {x.addr: i for i, x in enumerate(ins)}
        first = min(idx[int(lp["sass_range"][0], 16)] for lp in loops)
        small = min(loops, key=lambda lp: lp["body"])
        lo, hi = idx[int(small["sass_range"][0], 16)], idx[int(small["sass_range"][1], 16)]
        rng = list(range(0, first)) + list(range(lo, hi + 1))
        full["estimate"] = "entry code + the smallest grid-stride loop body (one pass per thread)"
    full["executed_per_thread"] = float(len(rng))
    full["load_bytes_per_thread"] = float(sum(mem_width(ins[i].op) for i in rng if ins[i].op.startswith("LDG")))
    full["store_bytes_per_thread"] = float(sum(mem_width(ins[i].op) for i in rng if ins[i].op.startswith("STG")))
    full["inflight_load_bytes_per_thread"] = full["load_bytes_per_thread"]
    full["global_load_widths"] = sorted({ins[i].op for i in rng if ins[i].op.startswith("LDG")})
    full["global_store_widths"] = sorted({ins[i].op for i in rng if ins[i].op.startswith("STG")})
    return full
