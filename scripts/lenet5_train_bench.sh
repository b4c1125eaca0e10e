#!/usr/bin/env bash
# Encrypted training of LeNet-5 (first convolution under FE) on the first $LIMIT MNIST
# training images (default 6,400: 100 steps of 64), with the trainer's time split and point
# additions per value; an epoch's time is these steps' times scaled to 937 steps.
# Usage: CRYPTONN_MNIST_DIR=DIR scripts/lenet5_train_bench.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-lenet5-train-bench}"
limit="${LIMIT:-6400}"
# shellcheck source=bench_common.sh
source scripts/bench_common.sh

echo "== client encryption of $limit training images"
/usr/bin/time -f "client encrypt: %e s wall, %M KiB peak" \
  "$bin/client" encrypt --quiet "${tok[@]}" --data "$CRYPTONN_MNIST_DIR" --limit "$limit" \
  --out "$work/train.enc"
ls -l "$work/train.enc"
echo "== encrypted training: LeNet-5, ReLU, batch 64, one pass over the $limit images"
/usr/bin/time -f "trainer train: %e s wall, %M KiB peak" \
  "$bin/trainer" train --quiet "${tok[@]}" --data "$work/train.enc" --spec lenet5 \
  --activation relu --epochs 1 --seed 1 --bits 8 --dlog-table "$work/dlog.bin" \
  --out "$work/secure.bin"
echo "== the same steps simulated"
"$bin/trainer" simulate --quiet --data "$CRYPTONN_MNIST_DIR" --limit "$limit" --spec lenet5 \
  --activation relu --epochs 1 --seed 1 --bits 8 --out "$work/sim.bin"
if cmp -s "$work/secure.bin" "$work/sim.bin"; then
  echo "encrypted and simulated models are bit-identical"
else
  echo "encrypted and simulated models DIFFER"; exit 1
fi
