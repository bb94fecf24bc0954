#!/usr/bin/env bash
# One-shot device check on a lent CUDA GPU (an H200), in one call of under 8 minutes, from the repository root:
#
#   bash benchmarks/device_check.sh
#
# Steps (each bounded by `timeout` and by what is left of DEVICE_CHECK_BUDGET_S; a failed step is recorded and
# the next one runs; the exit status is 1 when any failed):
#   env       GPU, driver, python/torch/triton versions, commit
#   install   python3 -m pip install --no-deps --no-build-isolation -e .  (the device machine has no network;
#             if it fails, a folder of links stands in for the installed package)
#   roofline  python -m fastgradstats.kernels.roofline --arch 90 --json  (CPU only: runs in the background)
#   gpu-tests pytest -q tests/test_gpu.py  (Triton vs torch on CUDA, cuda:1 while cuda:0 is current, every
#             public call under torch.cuda.set_sync_debug_mode("error"), the custom ops' opcheck, every
#             public call compiled, a clip step in torch.cuda.graph and under mode="reduce-overhead")
#   launches  python -m fastgradstats.launches: launches of one tensor_stats (log2, two dtype groups, every
#             field read), pair_stats and clip_grad_norm_ call, counted and as torch.profiler's CUDA kernels
#   bench-compiled  python -m fastgradstats.bench.compiled: a compiled train step with and without
#             statistics, and both eager (compiled.jsonl; skipped in a dry run)
#   bench-*   fastgradstats.bench.suite on gpt2-small, 1b, 7b and many-small in bfloat16 and float32 (CUDA events)
#   compare   our measured fraction of the read floor beside the roofline's prediction
#
# Six files go under $OUT (a temporary folder when unset): steps.tsv (step, status, seconds), device_check.log
# (every step's output), launches.json, compiled.jsonl (not in a dry run), roofline.json and results.jsonl
# (bench rows: append them to benchmarks/results/results.jsonl of the repository; a run with OUT unset appends
# them itself).
#
# Environment: DEVICE_CHECK_BUDGET_S (default 420), PYTHON (default python3), ROOFLINE_GPU (default H200),
# ROOFLINE_ARCH (default 90), ROOFLINE_JSON (an earlier roofline.json to use instead of compiling),
# DEVICE_CHECK_BENCH (the bench runs, "workload:dtypes:families ..."; families "all" or comma-separated),
# DEVICE_CHECK_DRY_RUN=1 (check the plumbing on a CPU: no install, Triton interpreted, device cpu, workload
# tiny, one repeat).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-420}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
DRY_RUN=${DEVICE_CHECK_DRY_RUN:-0}
ROOFLINE_GPU=${ROOFLINE_GPU:-H200}
ROOFLINE_ARCH=${ROOFLINE_ARCH:-90}
OUT_GIVEN=${OUT:+1}
OUT=${OUT:-$(mktemp -d -t device-check.XXXXXX)}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
STEPS="$OUT/steps.tsv"
LOG="$OUT/device_check.log"
WORK=$(mktemp -d -t device-check-work.XXXXXX)  # step logs before they join $LOG
trap 'rm -rf "$WORK"' EXIT
printf 'step\tstatus\tseconds\n' > "$STEPS"
: > "$LOG"
FAILED=()
export PYTHONUNBUFFERED=1

if [[ "$DRY_RUN" == 1 ]]; then
    export TRITON_INTERPRET=1
    DEVICE=cpu BACKEND=triton REPEATS=1 WARMUP=0
    BENCH_PLAN=("tiny:float32,bfloat16:all")
else
    DEVICE=cuda BACKEND=auto REPEATS=20 WARMUP=3
    # workload:dtypes:families. 7b needs 14 GB per bf16 list: no trajectory (4 lists, flattened copies too);
    # in float32 (28 GB per list) only the single-list families fit.
    BENCH_PLAN=("gpt2-small:float32,bfloat16:all" "1b:bfloat16,float32:all"
                "7b:bfloat16:stats+log2,stats,linear-hist,pair" "many-small:float32,bfloat16:all"
                "7b:float32:stats+log2,stats,linear-hist")
fi

# step NAME CAP_S COMMAND...: run COMMAND under `timeout` into $WORK/NAME.log, then record its status and time
# and append the log to $LOG.
step() {
    local name=$1 cap=$2 left limit began status=0 seconds
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        printf '%s\tno time left\t0\n' "$name" >> "$STEPS"
        FAILED+=("$name (no time left)")
        echo "== $name: skipped, no time left"
        return 0
    fi
    began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1 || status=$?
    seconds=$(( $(date +%s) - began ))
    record "$name" "$status" "$seconds" "$limit"
}

record() {  # record NAME STATUS SECONDS LIMIT: a line in $STEPS, the step's log into $LOG
    local verdict=ok
    if [[ "$2" == 124 || "$2" == 137 ]]; then
        verdict="timed out after $4 s"
    elif [[ "$2" != 0 ]]; then
        verdict="failed ($2)"
    fi
    printf '%s\t%s\t%s\n' "$1" "$verdict" "$3" >> "$STEPS"
    echo "== $1: $verdict, $3 s"
    touch "$WORK/$1.log"
    { echo "===== $1: $verdict, $3 s"; cat "$WORK/$1.log"; echo; } >> "$LOG"
    if [[ "$verdict" != ok ]]; then
        FAILED+=("$1: $verdict")
        tail -n 15 "$WORK/$1.log" | sed 's/^/   | /' || true
    fi
}

environment() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm,driver_version --format=csv
    fi
    git rev-parse --short HEAD || true
    "$PYTHON" - <<'PY'
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
PY
}

install_package() {
    if "$PYTHON" -m pip install --no-deps --no-build-isolation -e .; then
        return 0
    fi
    # A package folder of links: fastgradstats/* and kernels/ as fastgradstats/kernels.
    local links="$WORK/links"
    mkdir -p "$links/fastgradstats"
    ln -s "$PWD"/fastgradstats/* "$links/fastgradstats/"
    ln -s "$PWD/kernels" "$links/fastgradstats/kernels"
    export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed: using $links on PYTHONPATH"
    return 1
}

BENCH_PY='
import sys
import torch
from fastgradstats.bench import suite as bench
results, device, backend, repeats, warmup, workload, dtypes, families = sys.argv[1:]
bench.run([workload], None if families == "all" else families.split(","), repeats=int(repeats),
          warmup=int(warmup), device=device, backend=None if backend == "auto" else backend, results=results,
          dtypes=[getattr(torch, name) for name in dtypes.split(",")])
'

COMPARE_PY='
import json
import sys
from fastgradstats.bench import suite as bench
results, roofline, gpu = sys.argv[1:]
records = [json.loads(line) for line in open(results, encoding="utf-8")]
print(bench.roofline_table(records, json.load(open(roofline, encoding="utf-8")), gpu))
'

echo "device check: $OUT, budget ${BUDGET_S} s$([[ "$DRY_RUN" == 1 ]] && echo ', dry run on the CPU')"
export PYTHON
export -f environment
step env 30 bash -c environment

if [[ "$DRY_RUN" == 1 ]]; then
    printf 'install\tskipped (dry run)\t0\n' >> "$STEPS"
else
    began=$(date +%s) status=0
    install_package > "$WORK/install.log" 2>&1 || status=$?
    record install "$status" $(( $(date +%s) - began )) -
fi

# The roofline compiles every kernel for the GPU on the CPU: it runs while the GPU steps run.
roofline_began=$(date +%s) roofline_job=
if [[ -n "${ROOFLINE_JSON:-}" ]]; then
    cp "$ROOFLINE_JSON" "$OUT/roofline.json"
    echo "copied $ROOFLINE_JSON" > "$WORK/roofline.log"
    echo 0 > "$WORK/roofline.status"
else
    roofline_limit=$(( DEADLINE - $(date +%s) - 20 ))
    ( status=0
      timeout --kill-after=10 $(( roofline_limit > 5 ? roofline_limit : 5 )) "$PYTHON" \
          -m fastgradstats.kernels.roofline --arch "$ROOFLINE_ARCH" --json \
          > "$OUT/roofline.json" 2> "$WORK/roofline.log" || status=$?
      echo "$status" > "$WORK/roofline.status" ) &
    roofline_job=$!
fi

step gpu-tests 240 "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests/test_gpu.py
launch_options=(--device "$DEVICE" --json "$OUT/launches.json")
if [[ "$BACKEND" != auto ]]; then
    launch_options+=(--backend "$BACKEND")
fi
step launches 60 "$PYTHON" -m fastgradstats.launches "${launch_options[@]}"
if [[ "$DRY_RUN" != 1 ]]; then  # a compiled train step with and without statistics (compiling: tens of s)
    step bench-compiled 120 "$PYTHON" -m fastgradstats.bench.compiled --device "$DEVICE" --repeats 50 \
        --json "$OUT/compiled.jsonl"
fi
if [[ -n "${DEVICE_CHECK_BENCH:-}" ]]; then
    read -r -a BENCH_PLAN <<< "$DEVICE_CHECK_BENCH"
fi
for plan in "${BENCH_PLAN[@]}"; do
    IFS=: read -r workload dtypes families <<< "$plan"
    step "bench-$workload-${dtypes//,/-}" 90 "$PYTHON" -c "$BENCH_PY" "$RESULTS" "$DEVICE" "$BACKEND" \
        "$REPEATS" "$WARMUP" "$workload" "$dtypes" "$families"
done

if [[ -n "$roofline_job" ]]; then
    wait "$roofline_job" || true
fi
record roofline "$(cat "$WORK/roofline.status" 2> /dev/null || echo 1)" $(( $(date +%s) - roofline_began )) \
    "$BUDGET_S"
if [[ -s "$RESULTS" && -s "$OUT/roofline.json" ]]; then
    step compare 30 "$PYTHON" -c "$COMPARE_PY" "$RESULTS" "$OUT/roofline.json" "$ROOFLINE_GPU"
else
    record compare 1 0 -
fi
if [[ "$DRY_RUN" != 1 && -z "$OUT_GIVEN" && -s "$RESULTS" ]]; then
    cat "$RESULTS" >> benchmarks/results/results.jsonl
fi

echo
echo "== launches of one call (counted: torch ops + Triton kernels; profiled: CUDA kernels)"
grep -E 'launches \(|profiled' "$WORK/launches.log" || true
echo
if [[ -s "$WORK/compare.log" ]]; then
    cat "$WORK/compare.log"
    echo
fi
column -t -s $'\t' "$STEPS" 2> /dev/null || cat "$STEPS"
if (( ${#FAILED[@]} )); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed; files in $OUT"
