#!/usr/bin/env bash
# The GPU checks and benchmarks in one go: under 6 minutes on one H100/H200.
#
#   bash benchmarks/gpu_run.sh prepare        # once, with network: pyzmq and msgpack-numpy wheels (pinned, sha256-checked)
#   bash benchmarks/gpu_run.sh                # on the GPU box (network not needed): everything below -> benchmarks/RESULTS.md
#   bash benchmarks/gpu_run.sh --quick        # a tiny run of the same steps (any machine; CPU if no GPU)
#
# Run it from a clone whose Python has PyTorch (CUDA), torchvision, numpy, OpenCV, msgpack, typer, rich
# and pytest, e.g. after `pip install -e ".[worker,test]"`. A box that has those but must stay offline
# can take pyzmq and msgpack-numpy from benchmarks/wheels/ (git-ignored), which `prepare` fills with
# `pip download` on any machine with network; they are installed into $ZDEPTH_SITE (default
# ${TMPDIR:-/tmp}/zdepth-site) when `import zmq, msgpack_numpy` fails. The wheels are pinned by version
# and sha256 (CPython 3.10, 3.11, and 3.12+ via pyzmq's abi3 wheel, manylinux x86_64); for the box's
# Python, run prepare with TARGET_PYTHON=3.X (default: the Python running prepare).
#
# Weights: ZDEPTH_WEIGHTS_DIR=DIR (or --weights-dir DIR) points at official checkpoints
# (depth_anything_v2_vits.pth, ..._vitb.pth, ..._vitl.pth); each found there is used, read-only. Any
# missing one is generated in a temporary folder in the official format: vits from the test suite's
# seeded recipe, vitb and vitl with random weights (the speed does not depend on the values).
#
# Steps, each under a hard time limit so the whole stays under BUDGET_S (default 345 s):
#   1. environment (GPU, versions)
#   2. accuracy guard: fast path vs fp32 reference <= 1e-2 rel L2, fp16 vs fp32 <= 2e-3 (vits, vitb, vitl)
#   3. pytest -m "gpu and not slow"
#   4. serving through the broker (the targets, so before what is less urgent): 1 and 8 streams,
#      vits/vitb/vitl, without and with CUDA graphs; raw vs JPEG wire format (vits)
#   5. in process: forward pass and end to end (also from JPEG, also with CUDA graphs), vits/vitb/vitl
#      at 518, batch 1 and 8, vs the reference
#   6. time to ready with torch.compile, cold and warm kernel cache (vits)
#   7. pytest -m "gpu and slow" (torch.compile) with whatever time is left
# Results: benchmarks/RESULTS.md (its gpu section), and the JSON files and logs in benchmarks/results/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels
SITE=${ZDEPTH_SITE:-${TMPDIR:-/tmp}/zdepth-site}
BUDGET_S=${BUDGET_S:-345}

# The wheels `prepare` fetches and the run installs: exact versions, and the sha256 of every file pip
# may pick (pip refuses anything else).
requirements() {
    cat <<'REQ'
pyzmq==27.3.0 \
    --hash=sha256:858fe25231e0fd8612da142efde019faa5ef63fa150a821a27870e791b38c798 \
    --hash=sha256:477b8ad30d66fc905c5388351e83b9ac25824b00e82c0d052b72ea6392636dfd \
    --hash=sha256:e84d88c42ac2ea32314aaa9ef879da16c372ebfb8ad6f2ce1953d88538b44831
msgpack-numpy==0.4.8 \
    --hash=sha256:773c19d4dfbae1b3c7b791083e2caf66983bb19b40901646f61d8731554ae3da
REQ
}

prepare() {
    local target_python
    target_python=${TARGET_PYTHON:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    requirements >"$WHEELS/requirements.txt"
    "$PY" -m pip download --no-deps --only-binary=:all: --require-hashes -r "$WHEELS/requirements.txt" \
        --python-version "$target_python" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" || exit 1
    ls -l "$WHEELS"
    echo "ready for CPython $target_python on x86_64: copy this clone (with $WHEELS/) to the GPU box and run bash benchmarks/gpu_run.sh"
}

if [ "${1:-}" = "prepare" ]; then
    prepare
    exit 0
fi
QUICK=""
USER_WEIGHTS=${ZDEPTH_WEIGHTS_DIR:-}
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK="--quick" ;;
        --weights-dir) USER_WEIGHTS=${2:?--weights-dir needs a folder}; shift ;;
        --weights-dir=*) USER_WEIGHTS=${1#*=} ;;
        *) echo "usage: bash benchmarks/gpu_run.sh [prepare | --quick] [--weights-dir DIR]" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$USER_WEIGHTS" ] && [ ! -d "$USER_WEIGHTS" ]; then
    echo "weights folder not found: $USER_WEIGHTS" >&2
    exit 2
fi

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

# pyzmq and msgpack-numpy from benchmarks/wheels/ (see `prepare`), when this Python lacks them.
if ! "$PY" -c 'import zmq, msgpack_numpy' 2>/dev/null; then
    [ -f "$WHEELS/requirements.txt" ] || { echo "pyzmq or msgpack-numpy missing, and no wheels in $WHEELS: install them (pip install -e .), or run 'bash benchmarks/gpu_run.sh prepare' where pip can download"; exit 1; }
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --require-hashes -r "$WHEELS/requirements.txt" \
        --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" || exit 1
    export PYTHONPATH=$SITE
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

DEVICE=cuda
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || DEVICE=cpu
if [ "$DEVICE" = cpu ] && [ -z "$QUICK" ]; then
    echo "no CUDA device: nothing to measure here (use --quick to check the script)"
    exit 1
fi
ENCODERS=vits,vitb,vitl
[ -n "$QUICK" ] && ENCODERS=vits
# The benchmarks generate missing checkpoints in the folder they are given: give them a temporary one,
# with links to the official files found, so nothing is ever written beside those.
WEIGHTS=$(mktemp -d "${TMPDIR:-/tmp}/zdepth-bench-weights-XXXX")
for encoder in ${ENCODERS//,/ }; do
    official=${USER_WEIGHTS:+$USER_WEIGHTS/depth_anything_v2_$encoder.pth}
    if [ -n "$official" ] && [ -f "$official" ]; then
        ln -s "$(cd "$(dirname "$official")" && pwd)/$(basename "$official")" "$WEIGHTS/"
        echo "$encoder: $official"
    else
        echo "$encoder: generated"
    fi
done

step environment 30 "torch" bash -c "nvidia-smi -L 2>/dev/null; \"$PY\" -c 'import torch, zmq, cv2, numpy; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\", \"pyzmq\", zmq.__version__, \"cv2\", cv2.__version__, \"numpy\", numpy.__version__)'"
step accuracy 60 "passed" "$PY" benchmarks/accuracy.py $QUICK --device "$DEVICE" --encoders "$ENCODERS" --weights-dir "$WEIGHTS" --json "$OUTDIR/accuracy.json"
step tests-gpu 90 "passed|failed|error|no tests ran|skipped" env -u ZDEPTH_WEIGHTS_DIR "$PY" -m pytest -m "gpu and not slow" -q -p no:cacheprovider --timeout 80 tests
step serving 170 "wrote" "$PY" benchmarks/serving.py $QUICK --device "$DEVICE" --encoders "$ENCODERS" --streams 1,8 --duration 3 --warmup 3 --compare-cuda-graphs --weights-dir "$WEIGHTS" --json "$OUTDIR/serving.json"
step inprocess 100 "wrote" "$PY" benchmarks/inprocess.py $QUICK --device "$DEVICE" --encoders "$ENCODERS" --forward --jpeg --cuda-graphs --batches 1,8 --seconds 0.5 --min-iterations 5 --weights-dir "$WEIGHTS" --json "$OUTDIR/inprocess.json"
step compile-ready 150 "wrote" "$PY" benchmarks/compile_ready.py $QUICK --device "$DEVICE" --encoder vits --weights-dir "$WEIGHTS" --json "$OUTDIR/compile_ready.json"
step tests-gpu-slow 120 "passed|failed|error|no tests ran|skipped" env -u ZDEPTH_WEIGHTS_DIR "$PY" -m pytest -m "gpu and slow" -q -p no:cacheprovider --timeout 110 tests

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
    --steps "$OUTDIR/steps.json" --output "$RESULTS" "$OUTDIR"/{accuracy,inprocess,serving,compile_ready}.json
echo "== done in $(elapsed) s"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
echo "results: $RESULTS, $OUTDIR/"
rm -rf "$WEIGHTS"
grep -q -v $'\tok\t' "$STEPS" && exit 1
exit 0
