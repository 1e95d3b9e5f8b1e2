#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see docs/results.md for what it produced):
#   1. the CUDA checks CI cannot run (benchmarks/cuda_check.py),
#   2. step overhead on CUDA and, on the machine's idle CPU, single-threaded,
#   3. a harness trial's wall time, BPGrad against Adam (issue 11: within 1.1x),
#   4. the published comparisons on CUDA, several trials side by side on the one GPU (--jobs).
# Expects the MNIST / Fashion-MNIST caches in .devdata/ and the peers' wheels in .whl/ (both
# git-ignored and carried along). Everything it produces lands in $OUT (runs as one tarball).
# SMOKE=1 runs the same commands on the CPU at a tiny budget, to check the script itself.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BPGRAD_DATA_DIR=$PWD/.devdata
if [ -n "${SMOKE:-}" ]; then
  PY=.venv/bin/python DEV=cpu BUDGET="--seeds 1 --epochs 1 --limit-train-batches 2"
  SWEEP_BUDGET=$BUDGET LIMIT=120
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD/src:/tmp/site
  PY=python3 DEV=cuda BUDGET="" SWEEP_BUDGET="--seeds 2" LIMIT=${LIMIT:-330}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  $PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
  $PY benchmarks/cuda_check.py 2>&1 | tee "$OUT/cuda_check.txt"
  $PY benchmarks/step_overhead.py --device cuda --steps 40 --rounds 3 2>&1 | tee "$OUT/step_overhead.txt"
  $PY benchmarks/step_overhead.py --device cuda --steps 40 --rounds 3 --weight-decay 0 2>&1 | tee -a "$OUT/step_overhead.txt"
  $PY benchmarks/step_overhead.py --device cpu --steps 40 --rounds 3 2>&1 | tee -a "$OUT/step_overhead.txt"
  $PY benchmarks/step_overhead.py --device cpu --steps 40 --rounds 3 --weight-decay 0 2>&1 | tee -a "$OUT/step_overhead.txt"
fi
# A BPGrad trial against an Adam trial on mnist_lenet, one seed, one epoch, one process each:
# the ratio of their wall times (the fused scalar rule's effect on a real training loop).
$PY -m bpgrad compare --device $DEV --quiet --no-report --out runs/device/trial_time \
  --problem mnist_lenet --optimizers bpgrad,adam,bpgrad_auto --seeds 1 --epochs 1 $BUDGET \
  > runs/device/trial_time.log 2>&1
$PY - <<'PY' | tee "$OUT/trial_time.txt"
import json, pathlib
root = pathlib.Path("runs/device/trial_time")
for f in sorted(root.rglob("seed_*.jsonl")):
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    wall = [r.get("wall_time") or r.get("elapsed") for r in rows if r.get("kind") == "summary"]
    print(f.parent.name, wall[-1] if wall else "no summary")
PY
PAPER=bpgrad,sgd,adam,adagrad,adadelta,rmsprop
PEERS=bpgrad,prodigy,dadapt_sgd,dadapt_adam,schedulefree_sgd,schedulefree_adamw,dog,alig
run() {  # run NAME ARGS...: one comparison, resumable, bounded by LIMIT seconds
  local name=$1; shift
  timeout "$LIMIT" $PY -m bpgrad compare --device $DEV --quiet --no-report --out "runs/device/$name" "$@" \
    > "runs/device/$name.log" 2>&1
  echo "$name: exit $?" >> runs/device/status.txt
}
mkdir -p runs/device
run paper_mnist --problem mnist_lenet --optimizers $PAPER --seeds 3 --epochs 5 $BUDGET &
run paper_fmnist --problem fmnist_2c2d --optimizers $PAPER --seeds 3 --epochs 3 $BUDGET &
run peers_mnist --problem mnist_lenet --optimizers $PEERS --seeds 3 --epochs 5 $BUDGET &
run peers_fmnist --problem fmnist_2c2d --optimizers $PEERS --seeds 3 --epochs 3 $BUDGET &
run lr_mnist --problem mnist_lenet --optimizers adam,sgd --lr-grid 1e-4,1e-3,1e-2,1e-1 --epochs 5 $SWEEP_BUDGET &
run lr_fmnist --problem fmnist_2c2d --optimizers adam,sgd --lr-grid 1e-4,1e-3,1e-2,1e-1 --epochs 3 $SWEEP_BUDGET &
run l_mnist --problem mnist_lenet --optimizers bpgrad --sweep lipschitz=5,10,20,50,100,200 --epochs 5 $SWEEP_BUDGET &
wait
tar czf "$OUT/runs_device.tgz" runs/device
cat runs/device/status.txt
