#!/usr/bin/env bash
# The GPU checks and benchmarks in one go: under 6 minutes on one H100/H200 with no network.
#
#   bash benchmarks/gpu_run.sh prepare   # on a machine with network, once: wheels and test data into place
#   bash benchmarks/gpu_run.sh           # on the GPU machine: everything below -> benchmarks/RESULTS.md
#   bash benchmarks/gpu_run.sh --quick   # a tiny run of the same steps (any machine; CPU if no GPU)
#
# The GPU machine has PyTorch, torchvision, numpy, OpenCV, msgpack, typer and pytest, but
# not pyzmq or msgpack-numpy: they come from benchmarks/wheels/ (pyzmq's abi3 wheel for
# CPython >= 3.12 on manylinux x86_64, and msgpack-numpy's pure-Python wheel; ~0.9 MB
# together), installed into /tmp/zdepth-site. `prepare` (re)downloads them with pip.
#
# The tests and the accuracy guard read ../shared/{data,golden} (beside the checkout). That
# folder does not travel to the device, so `prepare` copies it into benchmarks/.carry/
# (git-ignored, ~58 MB), and this script links it back as ../shared when that is missing.
# With the device tool: run(command="bash benchmarks/gpu_run.sh", carry=["benchmarks/.carry"],
# timeout_s=420). The results come back under $OUT: RESULTS.md, the JSON files, logs.tgz.
#
# Steps, each under a hard time limit so the whole stays under the budget:
#   1. environment (GPU, versions)
#   2. accuracy guard: fast path vs fp32 reference <= 1e-2 rel L2, fp16 vs fp32 <= 2e-3 (vits, vitb, vitl)
#   3. pytest -m "gpu and not slow"
#   4. serving through the broker (the targets, so before what is less urgent): 1 and 8 streams,
#      vits/vitb/vitl, without and with CUDA graphs; raw vs JPEG wire format (vits)
#   5. in process: forward pass and end to end (also from JPEG, also with CUDA graphs), vits/vitb/vitl
#      at 518, batch 1 and 8, vs the reference
#   6. pytest -m "gpu and slow" (torch.compile) with whatever time is left
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels
CARRY=benchmarks/.carry
PYZMQ_VERSION=${PYZMQ_VERSION:-27.3.0}
MSGPACK_NUMPY_VERSION=${MSGPACK_NUMPY_VERSION:-0.4.8}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
BUDGET_S=${BUDGET_S:-345}

prepare() {
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" \
        "pyzmq==$PYZMQ_VERSION" "msgpack-numpy==$MSGPACK_NUMPY_VERSION" || exit 1
    if [ -d ../shared/golden ]; then
        rm -rf "$CARRY/shared" && mkdir -p "$CARRY/shared"
        cp -rL ../shared/data ../shared/golden "$CARRY/shared/"
    else
        echo "warning: ../shared/golden not found; the GPU tests that need it will fail on the device" >&2
    fi
    du -sh "$WHEELS" "$CARRY" 2>/dev/null
    echo 'ready: run(command="bash benchmarks/gpu_run.sh", carry=["benchmarks/.carry"], timeout_s=420)'
}

if [ "${1:-}" = "prepare" ]; then
    prepare
    exit 0
fi
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"

START=$(date +%s)
OUTDIR=benchmarks/results/gpu
[ -n "$QUICK" ] && OUTDIR=benchmarks/results/gpu-quick
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
STEPS=$OUTDIR/steps.tsv
: >"$STEPS"
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT_S SUMMARY_REGEX CMD...: run CMD under a time limit, log it, record how it went.
step() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    local left=$((BUDGET_S - $(elapsed)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped (budget)\t0\t\n' "$name" >>"$STEPS"
        echo "== $name: skipped, $left s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s, $(elapsed) s elapsed)"
    local t0 rc status summary
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    summary=$(grep -E "$pattern" "$OUTDIR/$name.log" | tail -n 1 | tr '\t|' '  ' | cut -c1-160)
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(($(date +%s) - t0)) "$summary" >>"$STEPS"
    echo "   $status in $(($(date +%s) - t0)) s: $summary"
    [ "$status" = ok ] || tail -n 25 "$OUTDIR/$name.log"
}

# pyzmq and msgpack-numpy from the wheels beside this script, when missing.
if ! "$PY" -c 'import zmq, msgpack_numpy' 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'bash benchmarks/gpu_run.sh prepare' where pip works"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zdepth-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/zdepth-site
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The tests read ../shared (golden checkpoint and references, test photos).
if [ ! -e ../shared ] && [ -d "$CARRY/shared" ]; then
    ln -s "$ROOT/$CARRY/shared" ../shared
fi
export ZDEPTH_DATA=${ZDEPTH_DATA:-$(cd ../shared/data 2>/dev/null && pwd)}

DEVICE=cuda
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || DEVICE=cpu
if [ "$DEVICE" = cpu ] && [ -z "$QUICK" ]; then
    echo "no CUDA device: nothing to measure here (use --quick to check the script)"
    exit 1
fi
WEIGHTS=$(mktemp -d /tmp/zdepth-bench-weights-XXXX)
ENCODERS=vits,vitb,vitl
[ -n "$QUICK" ] && ENCODERS=vits

step environment 30 "torch" bash -c "nvidia-smi -L 2>/dev/null; \"$PY\" -c 'import torch, zmq, cv2, numpy; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\", \"pyzmq\", zmq.__version__, \"cv2\", cv2.__version__, \"numpy\", numpy.__version__)'"
step accuracy 60 "passed" "$PY" benchmarks/accuracy.py $QUICK --device "$DEVICE" --encoders "$ENCODERS" --weights-dir "$WEIGHTS" --json "$OUTDIR/accuracy.json"
step tests-gpu 90 "passed|failed|error|no tests ran|skipped" "$PY" -m pytest -m "gpu and not slow" -q -p no:cacheprovider --timeout 80 tests
step serving 170 "wrote" "$PY" benchmarks/serving.py $QUICK --device "$DEVICE" --encoders "$ENCODERS" --streams 1,8 --duration 3 --warmup 3 --compare-cuda-graphs --weights-dir "$WEIGHTS" --json "$OUTDIR/serving.json"
step inprocess 100 "wrote" "$PY" benchmarks/inprocess.py $QUICK --device "$DEVICE" --encoders "$ENCODERS" --forward --jpeg --cuda-graphs --batches 1,8 --seconds 0.5 --min-iterations 5 --weights-dir "$WEIGHTS" --json "$OUTDIR/inprocess.json"
step tests-gpu-slow 120 "passed|failed|error|no tests ran|skipped" "$PY" -m pytest -m "gpu and slow" -q -p no:cacheprovider --timeout 110 tests

# Steps table and RESULTS.md.
"$PY" - "$STEPS" "$OUTDIR/steps.json" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    name, status, seconds, summary = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    rows.append({"step": name, "status": status, "seconds": int(seconds or 0), "summary": summary})
json.dump(rows, open(sys.argv[2], "w"), indent=1)
EOF
RESULTS=benchmarks/RESULTS.md
[ -n "$QUICK" ] && RESULTS=$OUTDIR/RESULTS.md
"$PY" benchmarks/report.py --section gpu --title "GPU results (benchmarks/gpu_run.sh, $(elapsed) s in all)" \
    --steps "$OUTDIR/steps.json" --output "$RESULTS" "$OUTDIR"/{accuracy,inprocess,serving}.json
echo "== done in $(elapsed) s"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$RESULTS" "$OUT/RESULTS.md"
    cp "$OUTDIR"/accuracy.json "$OUTDIR"/inprocess.json "$OUTDIR"/serving.json "$OUT/" 2>/dev/null
    tar czf "$OUT/logs.tgz" -C "$OUTDIR" . 2>/dev/null
fi
rm -rf "$WEIGHTS"
grep -q -v $'\tok\t' "$STEPS" && exit 1
exit 0
