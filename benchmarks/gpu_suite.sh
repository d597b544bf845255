#!/usr/bin/env bash
# GPU verification + benchmark suite: one call on a bare GPU machine (torch >= 2.11, triton >= 3.6,
# 16 cores, no network), run from the repository root, everything written under $OUT.
#
#   bash benchmarks/gpu_suite.sh [all|dry]
#
#   all  (default) finishes its work in SUITE_BUDGET = 480 s (give the call a 540 s limit), measuring
#        what matters most first; each step has its own time budget, cut to what is left:
#          build      150 s  the C++/CUDA extension (MAX_JOBS=16, no dependency resolution)
#          env         45 s  env.json: build info, versions, copy bandwidth and bf16 GEMM ceiling (same run)
#          ops        120 s  the six summary ops fwd+bwd, B = 256, bf16, with the eager reference and
#                            torch.compile(reference) baselines (CUDA events, medians)
#          dit         80 s  DiT^DH-XL train step (MFU vs the measured GEMM ceiling and 989 TFLOP/s)
#          tokenizer   90 s  tokenizer train step (fused vs eager)
#          attention   35 s  every attention backend fwd+bwd at ViT-B and DiT^DH-XL shapes
#          tests       60 s  the cuda_only tests plus one gpu_smoke case per op; stopped with SIGINT
#                            at its deadline so junit.xml is still written
#          sample    rest    DiT^DH-XL sampling with what is left (fewer Euler steps, stated, if need be)
#          summarize  15 s   summary.json and the readable summary that ends the log
#   dry  the same steps' logic at toy sizes on the CPU (Triton under the interpreter, torch.compile
#        with the eager backend, no build) in under 3 minutes; CI runs it.  Not data: every JSON says
#        dry and the summariser ignores it.
#
# $OUT gets 7 files (the device tool returns at most 8): suite.log, env.json, bench_ops.json,
# bench_e2e.json (the three e2e cases merged), attention.json, junit.xml, summary.json; the step
# table (name, status, rc, seconds, limit) is printed at the end of suite.log.  A failed step is logged as
# FAILED with its exit code and the suite goes on; no step writes a zero in place of a number.  The
# log ends with a readable summary of every number and every failed step.
# SUITE_SKIP_BUILD=1 uses the installed build.  RECTOK_FAST_COMMIT names the measured commit when
# the tree has no .git.
set -u
MODE="${1:-all}"
case "$MODE" in all | dry) ;; *) echo "usage: $0 [all|dry]" >&2; exit 2 ;; esac
OUT="${OUT:-$(pwd)/gpu_suite_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/suite.log"
: >"$LOG"
PY="${PYTHON:-python3}"
T0=$(date +%s)
WORK="$(mktemp -d)"  # per-case JSON before merging and the step table (not in $OUT: at most 8 files come back)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: >"$STEPS"

log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

if [ "$MODE" = dry ]; then
    SUITE_BUDGET="${SUITE_BUDGET:-170}"
    export RECTOK_BENCH_DRY=1 TRITON_INTERPRET=1
else
    SUITE_BUDGET="${SUITE_BUDGET:-480}"
    unset RECTOK_FAST_TEST_INTERPRET RECTOK_BENCH_DRY
    # compiled kernels everywhere: tests/conftest.py only sets TRITON_INTERPRET when it is unset and
    # sees no /dev/nvidia* node, which a VM may name differently
    export TRITON_INTERPRET=0
fi
RESERVE=15  # kept for summarize + the report at the end

# step NAME SECONDS [--int] CMD...: run CMD with a limit of SECONDS cut to what the budget has left,
# append its output to the log and a row to $STEPS, never abort the suite.  --int stops it with
# SIGINT (pytest then still writes its junit/JSON files) instead of TERM.
step() {
    local name="$1" secs="$2" sig=TERM
    shift 2
    [ "$1" = --int ] && { sig=INT; shift; }
    local now left t0 rc status note=""
    now=$(date +%s)
    left=$((SUITE_BUDGET - (now - T0)))
    [ "$name" != summarize ] && left=$((left - RESERVE))
    if [ "$left" -lt 8 ]; then
        log "--- $name SKIPPED: ${left}s left of the ${SUITE_BUDGET}s budget"
        printf '%s\tskipped\t-\t0\t%s\tno time left in the %ss budget\n' "$name" "$secs" "$SUITE_BUDGET" >>"$STEPS"
        return 0
    fi
    [ "$secs" -gt "$left" ] && { note="limit cut from ${secs}s"; secs=$left; }
    log "=== $name (limit ${secs}s${note:+, $note}): $*"
    t0=$(date +%s)
    timeout --signal=$sig --kill-after=15 "$secs" "$@" >>"$LOG" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        status=ok
    elif [ $rc -eq 124 ] || { [ $sig = INT ] && [ $rc -eq 130 ]; }; then
        status=timeout
    else
        status=FAILED
    fi
    log "--- $name $status rc=$rc in ${dt}s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$secs" "$note" >>"$STEPS"
    return 0
}
# deadline for a step's own internal time checks: its limit minus a margin for writing files
deadline_in() { echo $(($(date +%s) + $1)); }
budget_of() {  # the limit step() will give a step of nominal $1 seconds right now
    local left=$((SUITE_BUDGET - ($(date +%s) - T0) - RESERVE))
    [ "$1" -gt "$left" ] && echo "$left" || echo "$1"
}

export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/rectok_inductor_cache}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/rectok_triton_cache}"
export RECTOK_SUITE_ENV="$OUT/env.json"
if [ -z "${RECTOK_FAST_COMMIT:-}" ]; then
    RECTOK_FAST_COMMIT="$(git rev-parse HEAD 2>/dev/null || true)"
    [ -n "$RECTOK_FAST_COMMIT" ] && ! git diff --quiet HEAD -- 2>/dev/null && RECTOK_FAST_COMMIT="$RECTOK_FAST_COMMIT-dirty"
fi
export RECTOK_FAST_COMMIT
log "mode=$MODE budget=${SUITE_BUDGET}s commit=${RECTOK_FAST_COMMIT:-unknown} python=$($PY -c 'import sys; print(sys.version.split()[0])')"
[ "$MODE" = all ] && { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1 || true; }
PYTEST=("$PY" benchmarks/suite.py pytest -q -p no:cacheprovider -rs -o addopts="")

# 1. build (editable, no dependency resolution: the machine has no network)
if [ "$MODE" = dry ] || [ "${SUITE_SKIP_BUILD:-0}" = 1 ]; then
    step build 30 "$PY" -c "import rectok_fast, json; print(json.dumps(rectok_fast.build_info(), default=str))"
else
    step build 150 env RECTOK_FAST_FORCE_CUDA=1 MAX_JOBS=16 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi

# 2. env + ceilings (copy bandwidth, bf16 GEMM) measured in this run; later steps read env.json
step env 45 "$PY" benchmarks/suite.py env "$OUT/env.json"

# 3. the six summary ops, fwd+bwd, with baselines; cases past the deadline skip so the JSON is written
S=$(budget_of 120)
step ops 120 env RECTOK_BENCH_SCOPE=summary RECTOK_BENCH_DEADLINE=$(deadline_in $((S - 25))) \
    "${PYTEST[@]}" benchmarks/test_bench_ops.py --benchmark-only -k test_fused \
    --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=min,median,rounds

# 4-5. end to end: one pytest run per case (a timeout loses only that case), merged afterwards
e2e() {  # e2e NAME SECONDS
    local S
    S=$(budget_of "$2")
    step "$1" "$2" env RECTOK_E2E_DEADLINE=$(deadline_in $((S - 15))) \
        "${PYTEST[@]}" "benchmarks/test_bench_e2e.py::test_$3" --benchmark-only \
        --benchmark-json="$WORK/e2e_$3.json" --benchmark-columns=min,median,rounds
}
e2e dit 80 ditdh_xl_train_step
e2e tokenizer 90 tokenizer_train_step

# 6. attention backends
S=$(budget_of 35)
step attention 35 "$PY" benchmarks/bench_attention.py $([ "$MODE" = dry ] && echo --dry) \
    --deadline "$(deadline_in $((S - 8)))" --out "$OUT/attention.json"

# 7. GPU test subset: cuda_only + one gpu_smoke case per op; SIGINT at the deadline keeps junit.xml
# per-test limit when pytest-timeout is there (auto-loaded by its entry point; `-p pytest_timeout`
# would register it a second time)
PYTEST_TIMEOUT=()
[ -z "${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-}" ] && "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=60)
# files in the order they run (pytest keeps it): the gpu_smoke op cases first, the cuda_only
# inductor-compile tests (the slowest) last, so the deadline cuts the least
mapfile -t SMOKE < <(grep -l "mark.gpu_smoke" tests/test_*.py)
mapfile -t CUDA < <(grep -L "mark.gpu_smoke" tests/test_*.py | xargs grep -l "cuda_only" | grep -v "test_compile_")
mapfile -t COMPILE < <(grep -l "cuda_only" tests/test_compile_*.py 2>/dev/null)
step tests 60 --int "${PYTEST[@]}" "${SMOKE[@]}" "${CUDA[@]}" "${COMPILE[@]}" -m "cuda_only or gpu_smoke" \
    --maxfail=25 "${PYTEST_TIMEOUT[@]}" --junitxml="$OUT/junit.xml"

# 8. sampling with whatever is left (the case shortens its Euler steps to fit and says so)
LEFT=$((SUITE_BUDGET - ($(date +%s) - T0) - RESERVE))
e2e sample "$LEFT" ditdh_xl_sample

# 9. merge the e2e JSON, summarise, and end the log with the readable summary
"$PY" benchmarks/suite.py merge "$OUT/bench_e2e.json" "$WORK"/e2e_*.json >>"$LOG" 2>&1 \
    || log "--- no end-to-end JSON to merge"
JSONS=()
for f in "$OUT/bench_ops.json" "$OUT/bench_e2e.json"; do [ -s "$f" ] && JSONS+=("$f"); done
ENVARG=()
[ -s "$OUT/env.json" ] && ENVARG=(--env "$OUT/env.json")
if [ ${#JSONS[@]} -gt 0 ]; then
    step summarize 15 "$PY" benchmarks/summarize.py "${JSONS[@]}" "${ENVARG[@]}" --out "$OUT/summary.json" \
        --readme /nonexistent
else
    printf 'summarize\tFAILED\t-\t0\t15\tno benchmark JSON was written\n' >>"$STEPS"
    log "--- summarize FAILED: no benchmark JSON was written"
fi
log "done in $(($(date +%s) - T0))s of the ${SUITE_BUDGET}s budget"
"$PY" benchmarks/suite.py report "$OUT" "$STEPS" 2>&1 | tee -a "$LOG"
! grep -qv $'\tok\t' "$STEPS"
