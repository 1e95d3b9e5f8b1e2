#!/usr/bin/env bash
# Issue 7's sensitivity study and headline table (docs/results.md §3a), resumable: a rerun skips
# finished trials. One thread per process; run the parts in parallel on a machine with spare cores:
#   benchmarks/lipschitz_study.sh baselines   # Adam / SGD LR grids, fixed-L BPGrad
#   benchmarks/lipschitz_study.sh peers       # learning-rate-free peers at their defaults
#   benchmarks/lipschitz_study.sh auto        # BPGrad auto at c = 1/4, 1, 4, 16
#   benchmarks/lipschitz_study.sh headline    # auto at its defaults + the Adam/SGD grids + peers
# then: python benchmarks/lipschitz_sensitivity.py runs/lip_mnist_lenet runs/lip_fmnist_2c2d
# BUDGET (default "--epochs 1 --limit-train-batches 200") and SEEDS (default 3) override the budget,
# OUT (default runs/lip) the folder prefix: e.g. the one-epoch headline is
#   BUDGET="--epochs 1" OUT=runs/lip1ep benchmarks/lipschitz_study.sh headline
set -euo pipefail
part=${1:?usage: lipschitz_study.sh baselines|peers|auto|headline}
BPGRAD=${BPGRAD:-bpgrad}
BUDGET=${BUDGET:---epochs 1 --limit-train-batches 200}
SEEDS=${SEEDS:-3}
OUT=${OUT:-runs/lip}
PROBLEMS=${PROBLEMS:-mnist_lenet fmnist_2c2d}  # one problem per process to run them side by side
# shellcheck disable=SC2086
C="$BUDGET --seeds $SEEDS --threads 1 --quiet --no-report"
for P in $PROBLEMS; do
  out=${OUT}_$P
  case $part in
    baselines)
      $BPGRAD compare --problem $P --optimizers adam --sweep lr=1e-4,1e-3,1e-2,1e-1 $C --out $out
      $BPGRAD compare --problem $P --optimizers sgd --sweep lr=1e-3,1e-2,1e-1,1 $C --out $out
      $BPGRAD compare --problem $P --optimizers bpgrad --sweep lipschitz=1,4,16,64 $C --out $out
      ;;
    peers)
      $BPGRAD compare --problem $P --optimizers prodigy,dadapt_adam,dog,schedulefree_adamw,dadapt_sgd,schedulefree_sgd,alig $C --out $out
      ;;
    auto)
      $BPGRAD compare --problem $P --optimizers bpgrad_auto --sweep lr=4,1,0.25,0.0625 $C --out $out
      ;;
    headline)
      $BPGRAD compare --problem $P --optimizers bpgrad_auto $C --out $out
      $BPGRAD compare --problem $P --optimizers adam --sweep lr=1e-4,1e-3,1e-2,1e-1 $C --out $out
      $BPGRAD compare --problem $P --optimizers sgd --sweep lr=1e-3,1e-2,1e-1,1 $C --out $out
      $BPGRAD compare --problem $P --optimizers prodigy,dadapt_adam,dog,schedulefree_adamw,dadapt_sgd,schedulefree_sgd,alig $C --out $out
      ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
