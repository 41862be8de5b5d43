#!/usr/bin/env bash
# One-shot GPU run (~8 minutes on one H200): install moela without the network, the whole test
# suite on the GPU, the full benchmark (every moela row checked against its op's truth) and its
# report, everything written into OUTDIR.
#
#   profiling/gpu_run.sh OUTDIR [BENCH_SECONDS]
#
# Installs nothing from the network: the machine must already have torch, triton, pytest,
# pytest-benchmark, hypothesis, einops, nvidia-ml-py, matplotlib and tqdm (the H200 image does;
# pytest-xdist and pytest-timeout are used when present).
# OUTDIR ends up with at most 8 files (the device tool brings back 8):
#   summary.txt      step by step: exit code and seconds, then the tests', check's and benchmark's tails
#   bench.json/.csv  the benchmark results (environment, ceilings, every row)
#   report.md        the markdown report;  roofline.png  the roofline chart
#   plots.tar.gz     every PNG of the report
#   logs.tar.gz      nvidia-smi, pip list, install, pytest (log + junit xml), warm-up, check, bench, report,
#                    tune and sanitize logs
#   configs.json     with MOELA_TUNE_SECONDS: the tuned config table
# Copy bench.json/report.md into profiling/results/ (see its README) to keep them.
#
# Time: the tests (correctness only, one config per kernel) run while seven background processes
# compile every kernel config at the benchmark's shapes (Triton's on-disk cache keeps the
# binaries; the benchmark still tunes, on a quiet GPU, but compiles nothing). The benchmark interleaves the ops:
# when the budget cuts it short, every op keeps its most important problems.
# Step limits add up to under 10 minutes (one device-tool command). A dry run of the plumbing on a
# CPU: MOELA_SKIP_INSTALL=1 MOELA_BENCH_SETS=tiny MOELA_SKIP_TESTS=1 profiling/gpu_run.sh /tmp/x 20
#
# Knobs for a shorter run (defaults: the whole suite, every op, the `full` sets):
#   MOELA_TESTS="tests/kernels ..."  pytest targets     MOELA_TEST_LIMIT=220  MOELA_TEST_WORKERS=8
#   MOELA_BENCH_OPS="op ..."         ops to benchmark   MOELA_BENCH_SETS="set ..." (full)
#   MOELA_WARM_LIMIT=165  MOELA_CHECK=1 (also `check`, 60 s)  MOELA_SKIP_TESTS=1  MOELA_SKIP_WARMUP=1
#   MOELA_SKIP_INSTALL=1
# Optional steps after the benchmark, each within its own limit:
#   MOELA_TUNE_SECONDS=N  `python -m moela.profiling tune --budget-s N`: the GPU's config table as
#                         OUTDIR/configs.json (commit it as kernels/configs/<gpu>.json)
#   MOELA_SANITIZE=1      compute-sanitizer --tool memcheck over tests/test_bad_input_*.py (150 s;
#                         its log in logs.tar.gz, its verdict in summary.txt)
#   MOELA_GIT_REF=<sha>   the ref to record, where the copy's .git is not the tree's (the device tool's)
set -uo pipefail

OUT=${1:?usage: profiling/gpu_run.sh OUTDIR [BENCH_SECONDS]}
BENCH_SECONDS=${2:-190}
PY=${PYTHON:-python3}
SETS=${MOELA_BENCH_SETS:-full}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d)
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: run with a timeout, log to LOGS/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    printf '%-10s rc=%-4s %4ss (at %4ss)  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$(( $(date +%s) - T0 ))" \
        "$*" | tee -a "$SUMMARY"
    return 0
}

{
    echo "moela GPU run: $(date -u +%FT%TZ), git ${MOELA_GIT_REF:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
        --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
    echo "cpus: $(nproc)"
} | tee -a "$SUMMARY"
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
$PY -m pip list > "$LOGS/pip-list.txt" 2>&1

if [ -z "${MOELA_SKIP_INSTALL:-}" ]; then
    step install 30 $PY -m pip install --no-deps --no-build-isolation -e .
fi
if ! (cd /tmp && $PY -c "import moela.kernels") > /dev/null 2>&1; then  # no install: import the checkout as moela
    mkdir -p "$WORK/path" && ln -sfn "$(pwd)" "$WORK/path/moela"
    export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
    echo "moela not importable after the install: using PYTHONPATH=$PYTHONPATH" | tee -a "$SUMMARY"
fi

# The op list and the compile warm-up groups come from the registry (moela.profiling.registry).
OPS=${MOELA_BENCH_OPS:-$($PY -m moela.profiling list --names)}
# Background warm-up: the moela kernels alone at the benchmark's problems, timed for a millisecond,
# split so that each process compiles different kernels (one op per process when there are few).
read -r -a OP_LIST <<< "$(echo $OPS)"
if [ -n "${MOELA_BENCH_OPS:-}" ] && [ "${#OP_LIST[@]}" -le 8 ]; then
    WARM_GROUPS=("${OP_LIST[@]}")
else
    mapfile -t WARM_GROUPS < <($PY -m moela.profiling list --warm-groups)
fi
WARM_PIDS=()
trap 'kill "${WARM_PIDS[@]}" 2> /dev/null' EXIT  # the warm-ups' timeouts run in their own process groups
if [ -z "${MOELA_SKIP_WARMUP:-}" ]; then
    # one line per group: the words of $SETS its ops know (the CLI refuses the others), one Python start
    mapfile -t WARM_SETS < <($PY -c 'import sys
from moela.profiling.registry import all_ops
ops = all_ops()
for group in sys.argv[2:]:
    known = {s for n in group.split() for s in ops[n].shape_sets} | {"full", "all"}
    print(" ".join(w for w in sys.argv[1].split() if w in known))' "$SETS" "${WARM_GROUPS[@]}")
    for i in "${!WARM_GROUPS[@]}"; do
        [ -z "${WARM_SETS[$i]:-}" ] && continue
        # shellcheck disable=SC2086
        timeout --kill-after=5 "${MOELA_WARM_LIMIT:-165}" $PY -m moela.profiling bench --no-progress \
            --sets ${WARM_SETS[$i]} --ops ${WARM_GROUPS[$i]} \
            --impls moela --no-verify --no-ceilings --no-telemetry --no-save --rep-ms 1 --warmup-ms 1 \
            > "$LOGS/warm-$i.log" 2>&1 &
        WARM_PIDS+=($!)
    done
fi

if [ -z "${MOELA_SKIP_TESTS:-}" ]; then
    # correctness needs no autotuning: one (default) config per kernel keeps compile time down
    PYTEST_ARGS=(-rfE -p no:cacheprovider --junitxml="$LOGS/pytest.xml" --durations=15)
    if $PY -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n "${MOELA_TEST_WORKERS:-8}" -v); else PYTEST_ARGS+=(-q); fi
    $PY -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 90)
    # shellcheck disable=SC2086
    # default: the whole suite but the pytest-benchmark module (xdist disables its timing, and the
    # benchmark step below runs the same problems)
    step pytest "${MOELA_TEST_LIMIT:-220}" env MOELA_AUTOTUNE=0 MOELA_FAILURE_LOG="$LOGS/pytest-failures.log" \
        $PY -m pytest "${PYTEST_ARGS[@]}" ${MOELA_TESTS:---ignore=tests/profiling/test_benchmarks.py}
fi
if [ "${#WARM_PIDS[@]}" -gt 0 ]; then
    WARM_RCS=""
    for pid in "${WARM_PIDS[@]}"; do wait "$pid"; WARM_RCS+="$? "; done
    printf '%-10s rc=[%s] done at %ss: %s\n' warm-up "${WARM_RCS% }" "$(( $(date +%s) - T0 ))" \
        "$(cat "$LOGS"/warm-*.log | grep -c ' moela ') timed rows" | tee -a "$SUMMARY"
fi

# `check` repeats what the tests and the benchmark's own checks cover: only on request
[ -n "${MOELA_CHECK:-}" ] && step check 60 $PY -m moela.profiling check --no-progress
# shellcheck disable=SC2086
step bench $(( BENCH_SECONDS + 25 )) $PY -m moela.profiling bench --no-progress --sets $SETS --ops $OPS --interleave --graphs \
    --time-budget "$BENCH_SECONDS" --rep-ms 25 --warmup-ms 5 --out "$WORK" --name bench
if [ -f "$WORK/bench.json" ]; then
    step report 25 $PY -m moela.profiling report "$WORK/bench.json" --out "$WORK/report"
    cp "$WORK/bench.json" "$WORK/bench.csv" "$OUT/"
    [ -f "$WORK/report/report.md" ] && cp "$WORK/report/report.md" "$OUT/"
    [ -f "$WORK/report/roofline.png" ] && cp "$WORK/report/roofline.png" "$OUT/"
    ls "$WORK"/report/*.png > /dev/null 2>&1 && tar czf "$OUT/plots.tar.gz" -C "$WORK/report" $(cd "$WORK/report" && ls *.png)
    [ -n "${MOELA_KEEP:-}" ] && mkdir -p "$MOELA_KEEP" && cp "$WORK/bench.json" "$MOELA_KEEP/"
else
    echo "no bench.json: see logs.tar.gz (bench.log)" | tee -a "$SUMMARY"
fi

if [ -n "${MOELA_TUNE_SECONDS:-}" ]; then
    step tune $(( MOELA_TUNE_SECONDS + 60 )) $PY -m moela.profiling tune --budget-s "$MOELA_TUNE_SECONDS" \
        --table "$OUT/configs.json"
fi
if [ -n "${MOELA_SANITIZE:-}" ]; then
    if command -v compute-sanitizer > /dev/null 2>&1; then
        step sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
            $PY -m pytest -q -p no:cacheprovider tests/test_bad_input_ops.py tests/test_bad_input_modules.py
    else
        echo "sanitize   skipped: compute-sanitizer not on PATH" | tee -a "$SUMMARY"
    fi
fi

{
    echo; echo "== pytest (tail)"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/pytest.log" 2>/dev/null | grep -v PASSED | tail -n 40
    [ -f "$LOGS/sanitize.log" ] && { echo; echo "== compute-sanitizer (tail)"; grep -E "ERROR SUMMARY|Invalid|passed|failed" "$LOGS/sanitize.log" | tail -n 20; }
    [ -f "$LOGS/tune.log" ] && { echo; echo "== tune (tail)"; tail -n 15 "$LOGS/tune.log"; }
    [ -f "$LOGS/pytest-failures.log" ] && { echo; echo "== pytest failures (first lines)"; grep -E "^====|^E " "$LOGS/pytest-failures.log" | head -n 60; }
    [ -f "$LOGS/check.log" ] && { echo; echo "== check (tail)"; tail -n 40 "$LOGS/check.log"; }
    echo; echo "== bench (tail)"; tail -n 60 "$LOGS/bench.log"
} >> "$SUMMARY" 2>&1
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
rm -rf "$LOGS" "$WORK"
echo "wrote $(ls "$OUT" | wc -l) files into $OUT in $(( $(date +%s) - T0 )) s"
