#!/usr/bin/env bash
# One-shot GPU run (~8 minutes on one H200): install moela without the network, the GPU test
# tier, the kernel check, the full benchmark and its report, everything written into OUTDIR.
#
#   profiling/gpu_run.sh OUTDIR [BENCH_SECONDS]
#
# Installs nothing from the network: the machine must already have torch, triton, pytest,
# pytest-benchmark, hypothesis, einops, nvidia-ml-py, matplotlib and tqdm (the H200 image does).
# OUTDIR ends up with at most 7 files (the device tool brings back 8):
#   summary.txt      step by step: exit code and seconds, then the check and the benchmark's tails
#   bench.json/.csv  the benchmark results (environment, ceilings, every row)
#   report.md        the markdown report;  roofline.png  the roofline chart
#   plots.tar.gz     every PNG of the report
#   logs.tar.gz      nvidia-smi, pip list, install, pytest (log + junit xml), check, bench, report logs
# Copy bench.json/report.md into profiling/results/ (see its README) to keep them.
# Step limits add up to under 10 minutes (one device-tool command). A dry run of the plumbing on a CPU: MOELA_SKIP_INSTALL=1 MOELA_BENCH_SETS=tiny profiling/gpu_run.sh /tmp/x 20
set -uo pipefail

OUT=${1:?usage: profiling/gpu_run.sh OUTDIR [BENCH_SECONDS]}
BENCH_SECONDS=${2:-200}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d)
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: run with a timeout, log to LOGS/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    printf '%-10s rc=%-4s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" | tee -a "$SUMMARY"
    return 0
}

{
    echo "moela GPU run: $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
        --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
} | tee -a "$SUMMARY"
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
$PY -m pip list > "$LOGS/pip-list.txt" 2>&1

if [ -z "${MOELA_SKIP_INSTALL:-}" ]; then
    step install 60 $PY -m pip install --no-deps --no-build-isolation -e .
fi
# correctness needs no autotuning: one (default) config per kernel keeps compile time out of the budget
step pytest 150 env MOELA_AUTOTUNE=0 $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$LOGS/pytest-gpu.xml"
step check 60 $PY -m moela.profiling check --no-progress
step bench $(( BENCH_SECONDS + 60 )) $PY -m moela.profiling bench --no-progress --sets ${MOELA_BENCH_SETS:-full} \
    --ops grouped_gemm grouped_gemm_dx grouped_gemm_dw fp8_gemm fp8_grouped_gemm moe_dispatch_combine make_routing permute unpermute gate route \
          quant_act mla_decode mla_layer moe_layer moe_layer_fwd_bwd moe_layer_fp8 quant_weight dequant \
    --time-budget "$BENCH_SECONDS" --rep-ms 25 --warmup-ms 5 --out "$WORK" --name bench
if [ -f "$WORK/bench.json" ]; then
    step report 45 $PY -m moela.profiling report "$WORK/bench.json" --out "$WORK/report"
    cp "$WORK/bench.json" "$WORK/bench.csv" "$OUT/"
    [ -f "$WORK/report/report.md" ] && cp "$WORK/report/report.md" "$OUT/"
    [ -f "$WORK/report/roofline.png" ] && cp "$WORK/report/roofline.png" "$OUT/"
    ls "$WORK"/report/*.png > /dev/null 2>&1 && tar czf "$OUT/plots.tar.gz" -C "$WORK/report" $(cd "$WORK/report" && ls *.png)
else
    echo "no bench.json: see logs.tar.gz (bench.log)" | tee -a "$SUMMARY"
fi

{
    echo; echo "== pytest (tail)"; tail -n 15 "$LOGS/pytest.log"
    echo; echo "== check (tail)"; tail -n 40 "$LOGS/check.log"
    echo; echo "== bench (tail)"; tail -n 60 "$LOGS/bench.log"
} >> "$SUMMARY" 2>&1
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
rm -rf "$LOGS" "$WORK"
echo "wrote $(ls "$OUT" | wc -l) files into $OUT"
