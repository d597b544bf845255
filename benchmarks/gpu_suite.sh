#!/usr/bin/env bash
# GPU verification + benchmark suite: one call on a bare GPU machine (torch >= 2.11, triton >= 3.6,
# no network), run from the repository root, everything written under $OUT (at most 8 files).
#
#   bash benchmarks/gpu_suite.sh [all|bench|long]
#
#   all   (default, <= 10 min) build the CUDA extension, env.json, the test suite on the GPU (no
#         interpreter), the six summary ops (B = 256, bf16, fwd and fwd+bwd), the end-to-end cases
#         (short), summary.json.
#   bench (<= 10 min) build, env.json, every op at bf16 and fp32, B = 256
#         (RECTOK_BENCH_SCOPE=default; BENCH_SCOPE=full adds B = 64), short end-to-end, summary.json; no tests.
#   long  (<= 10 min) build, env.json, summary ops, the end-to-end cases with more timed steps.
#
# Each step has its own `timeout`; a failing step is logged and the suite goes on.  Outputs (8):
# suite.log (everything, the README table included), env.json, junit.xml, bench_ops.json,
# # e2e_tokenizer_train_step.json, e2e_ditdh_xl_train_step.json, e2e_ditdh_xl_sample.json, summary.json.
# SUITE_SKIP_BUILD=1 uses the installed build.  Set RECTOK_FAST_COMMIT to the measured commit when
# the tree has no .git.
set -u
MODE="${1:-all}"
case "$MODE" in all | bench | long) ;; *) echo "usage: $0 [all|bench|long]" >&2; exit 2 ;; esac
OUT="${OUT:-$(pwd)/gpu_suite_out}"
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"
PY="${PYTHON:-python3}"
T0=$(date +%s)
FAILED=()

log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

# The whole suite stays inside SUITE_BUDGET seconds (the device tool allows 600 per call): each
# step's limit is cut to what is left, keeping RESERVE seconds for the summary.
SUITE_BUDGET="${SUITE_BUDGET:-570}"
RESERVE=25

# step NAME SECONDS CMD...: run with a time limit, log output, record failure, never abort
step() {
    local name="$1" secs="$2"
    shift 2
    local left=$((SUITE_BUDGET - ($(date +%s) - T0)))
    [ "$name" != summarize ] && left=$((left - RESERVE))
    if [ "$left" -lt 10 ]; then
        FAILED+=("$name(no time left)")
        log "--- $name SKIPPED: ${left}s left of the ${SUITE_BUDGET}s budget"
        return 0
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    log "=== $name (limit ${secs}s): $*"
    timeout --signal=TERM --kill-after=10 "$secs" "$@" >>"$LOG" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED+=("$name(rc=$rc)")
        log "--- $name FAILED rc=$rc$([ $rc -eq 124 ] && echo ' (timeout)')"
    else
        log "--- $name ok"
    fi
    return 0
}

unset TRITON_INTERPRET RECTOK_FAST_TEST_INTERPRET
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/rectok_inductor_cache}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/rectok_triton_cache}"
if [ -z "${RECTOK_FAST_COMMIT:-}" ]; then
    RECTOK_FAST_COMMIT="$(git rev-parse HEAD 2>/dev/null || true)"
    [ -n "$RECTOK_FAST_COMMIT" ] && ! git diff --quiet HEAD -- 2>/dev/null && RECTOK_FAST_COMMIT="$RECTOK_FAST_COMMIT-dirty"
fi
export RECTOK_FAST_COMMIT
log "mode=$MODE commit=${RECTOK_FAST_COMMIT:-unknown} python=$($PY -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1 || true

# 1. build the C++/CUDA extension (editable, no dependency resolution: the machine has no network)
if [ "${SUITE_SKIP_BUILD:-0}" = 1 ]; then log "build skipped (SUITE_SKIP_BUILD=1)"; else
step build 240 env RECTOK_FAST_FORCE_CUDA=1 MAX_JOBS=16 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
step env 60 bash -c "$PY -m rectok_fast.env > '$OUT/env.json'"

PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(-p pytest_timeout --timeout=180)

# 2. the test suite on the GPU (compiled Triton, CUDA extension)
if [ "$MODE" = all ]; then
    step tests 200 "$PY" -m pytest tests -q --maxfail=20 -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" \
        --junitxml="$OUT/junit.xml" -o addopts=""
fi

# 3. per-op benchmarks
# Cases past RECTOK_BENCH_DEADLINE skip (with that reason) so pytest still writes its JSON.
SCOPE=summary
[ "$MODE" = bench ] && SCOPE="${BENCH_SCOPE:-default}"
OPS_LIMIT=$([ "$MODE" = bench ] && echo 270 || echo 120)
step bench_ops $OPS_LIMIT env RECTOK_BENCH_SCOPE=$SCOPE RECTOK_BENCH_DEADLINE=$(($(date +%s) + OPS_LIMIT - 30)) \
    "$PY" -m pytest benchmarks/test_bench_ops.py --benchmark-only -q -p no:cacheprovider -rs \
    --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=min,median,rounds -k "test_fused"

# 4. end to end: one pytest run (and JSON) per case, so a timeout loses only that case
E2E_MODE=short
[ "$MODE" = long ] && E2E_MODE=long
for CASE in tokenizer_train_step ditdh_xl_train_step ditdh_xl_sample; do
    step "e2e_$CASE" $([ "$MODE" = long ] && echo 300 || echo 180) env RECTOK_E2E_MODE=$E2E_MODE \
        "$PY" -m pytest "benchmarks/test_bench_e2e.py::test_$CASE" --benchmark-only -q -p no:cacheprovider -rs \
        --benchmark-json="$OUT/e2e_$CASE.json" --benchmark-columns=min,median,rounds
done

# 5. summary (the README table is regenerated from it with `summarize.py --readme`; printed to the log)
JSONS=()
for f in "$OUT"/bench_ops.json "$OUT"/e2e_*.json; do [ -s "$f" ] && JSONS+=("$f"); done
if [ ${#JSONS[@]} -gt 0 ]; then
    step summarize 60 "$PY" benchmarks/summarize.py "${JSONS[@]}" --out "$OUT/summary.json" --readme /nonexistent
else
    FAILED+=("summarize(no benchmark JSON)")
    log "--- summarize skipped: no benchmark JSON was written"
fi

log "done in $(($(date +%s) - T0))s; failed steps: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
