#!/usr/bin/env bash
# Encrypted inference with LeNet-5 (first convolution under FE: 4,704 placed-kernel keys):
# trains the model by simulation on full MNIST (2 epochs, the README's recipe), then serves
# it and measures throughput (8 queries in flight, all 10,000 test images unless LIMIT=N)
# and idle latency, with the accuracy against plain quantized inference. Usage: CRYPTONN_MNIST_DIR=DIR scripts/lenet5_inference_bench.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-lenet5-bench}"
limit="${LIMIT:-10000}"
# Bits of the served kernels (the keys): 6 scores as 8 on this model and decrypts faster.
bits="${BITS:-6}"
# shellcheck source=bench_common.sh
source scripts/bench_common.sh

echo "== model: LeNet-5, 2 epochs on full MNIST (simulated, 8-bit first convolution)"
"$bin/trainer" simulate --data "$CRYPTONN_MNIST_DIR" --spec lenet5 --activation relu \
  --lr 0.003 --lr-schedule step:1:0.1 --epochs 2 --seed 1 --bits 8 --quiet \
  --out "$work/model.bin"
"$bin/trainer" evaluate --model "$work/model.bin" --data "$CRYPTONN_MNIST_DIR" --bits "$bits"

start "$work/serve.out" "$bin/trainer" serve --model "$work/model.bin" "${tok[@]}" \
  --listen 127.0.0.1:0 --bits "$bits" --client-token-file "$work/serve.token" \
  --dlog-table "$work/dlog.bin"
svc=$addr
head -1 "$work/serve.out.err"
predict() {
  "$bin/client" predict --quiet --server "$svc" --server-token-file "$work/serve.token" \
    "${tok[@]}" --data "$CRYPTONN_MNIST_DIR" "$@"
}
echo "== all cores ($(nproc)): $limit test images, 8 queries in flight"
predict --parallel 8 --limit "$limit" --out "$work/predictions.csv"
echo "== idle service, one query at a time (200 images)"
predict --parallel 1 --limit 200 --out "$work/idle.csv"
