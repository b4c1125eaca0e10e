#!/usr/bin/env bash
# Benchmark of secure inference (issue 15) on full MNIST: 784-128-32-10 sigmoid trained for
# one epoch as the README's default does (batch 64, 8-bit products, seed 1; simulated, which
# equals the encrypted run bit for bit), served by `trainer serve` with keys from a running
# authority, queried by `client predict` with the 10,000 test images encrypted. Prints the
# float and quantized plaintext accuracy, the client's encryption time and query size, the
# throughput with all cores and with one, and the latency idle and under 8 concurrent queries,
# for 8-bit first-layer keys (the training's) and for 4-bit and 3-bit ones (`trainer serve
# --bits 4`); `BITS="8 4"` picks the key sizes.
#
#   CRYPTONN_MNIST_DIR=/path/to/mnist [BITS="8 4 3"] ./scripts/inference_bench.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-inference-bench}"
# shellcheck source=bench_common.sh
source scripts/bench_common.sh

echo "== model: one epoch on full MNIST (simulated; bit-identical to encrypted training)"
"$bin/trainer" simulate --data "$CRYPTONN_MNIST_DIR" --spec 784-128-32-10 --epochs 1 --seed 1 \
  --bits 8 --quiet --out "$work/model.bin"
"$bin/trainer" evaluate --model "$work/model.bin" --data "$CRYPTONN_MNIST_DIR" --bits 8
for bits in ${BITS:-8 4 3}; do
  [ "$bits" = 8 ] || "$bin/trainer" evaluate --model "$work/model.bin" --data "$CRYPTONN_MNIST_DIR" \
    --bits "$bits" | tail -1
done

# serve THREADS BITS: a service with THREADS decryption threads (empty: all cores) and
# BITS-bit keys; sets $svc_addr.
serve() {
  if [ -n "${svc:-}" ]; then kill "$svc"; wait "$svc" 2>/dev/null || true; fi
  # One thread: the whole service pinned to core 0 (decoding included), the client to core 1.
  start "$work/serve$1-$2.out" ${1:+taskset -c 0} env ${1:+RAYON_NUM_THREADS=$1} "$bin/trainer" serve \
    --model "$work/model.bin" "${tok[@]}" --listen 127.0.0.1:0 --bits "$2" \
    --client-token-file "$work/serve.token" --dlog-table "$work/dlog.bin"
  svc=$pid
  svc_addr=$addr
  head -1 "$work/serve$1-$2.out.err"
}
predict() {
  "$bin/client" predict --quiet --server "$svc_addr" --server-token-file "$work/serve.token" \
    "${tok[@]}" --data "$CRYPTONN_MNIST_DIR" "$@"
}

for bits in ${BITS:-8 4 3}; do
  serve "" $bits
  echo "== $bits-bit keys, all cores ($(nproc)): the 10,000 test images, 8 queries in flight"
  predict --parallel 8 --out "$work/predictions-$bits.csv"
  echo "== $bits-bit keys, all cores: idle service, one query at a time (1,000 images)"
  predict --parallel 1 --limit 1000 --out "$work/idle-$bits.csv"
  serve 1 $bits
  echo "== $bits-bit keys, the service on one core: 2,000 images, 8 queries in flight"
  taskset -c 1 "$bin/client" predict --quiet --server "$svc_addr" \
    --server-token-file "$work/serve.token" "${tok[@]}" --data "$CRYPTONN_MNIST_DIR" \
    --parallel 8 --limit 2000 --out "$work/one-core-$bits.csv"
done
