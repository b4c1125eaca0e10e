#!/usr/bin/env bash
# Encrypted training of LeNet-5 (first convolution under FE) with the trainer's time split
# and point additions per value, checked bit for bit against `trainer simulate`.
# By default one pass over the first 6,400 MNIST training images (100 steps of 64; an
# epoch's time is these steps' times scaled to 937 steps); LIMIT=all EPOCHS=2 trains on the
# whole training set for 2 epochs and scores both models on the test set.
# Usage: CRYPTONN_MNIST_DIR=DIR [LIMIT=N|all] [EPOCHS=E] scripts/lenet5_train_bench.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-lenet5-train-bench}"
limit="${LIMIT:-6400}"
epochs="${EPOCHS:-1}"
# The recipe of the README's LeNet-5 figures.
recipe=(--spec lenet5 --activation relu --lr 0.003 --lr-schedule step:1:0.1 --epochs "$epochs"
  --seed 1 --bits 8)
limit_flag=()
[ "$limit" = all ] || limit_flag=(--limit "$limit")
# shellcheck source=bench_common.sh
source scripts/bench_common.sh

echo "== client encryption of ${limit} training images"
/usr/bin/time -f "client encrypt: %e s wall, %M KiB peak" \
  "$bin/client" encrypt --quiet "${tok[@]}" --data "$CRYPTONN_MNIST_DIR" "${limit_flag[@]}" \
  --out "$work/train.enc"
ls -l "$work/train.enc"
echo "== encrypted training: LeNet-5, ReLU, batch 64, $epochs epoch(s) over ${limit} images"
/usr/bin/time -f "trainer train: %e s wall, %M KiB peak" \
  "$bin/trainer" train --quiet "${tok[@]}" --data "$work/train.enc" "${recipe[@]}" \
  --dlog-table "$work/dlog.bin" --metrics "$work/secure.jsonl" --out "$work/secure.bin"
echo "== the same steps simulated"
"$bin/trainer" simulate --quiet --data "$CRYPTONN_MNIST_DIR" "${limit_flag[@]}" "${recipe[@]}" \
  --out "$work/sim.bin"
if cmp -s "$work/secure.bin" "$work/sim.bin"; then
  echo "encrypted and simulated models are bit-identical"
else
  echo "encrypted and simulated models DIFFER"; exit 1
fi
echo "== test accuracy of the encrypted run's model"
"$bin/trainer" evaluate --model "$work/secure.bin" --data "$CRYPTONN_MNIST_DIR" --bits 8
