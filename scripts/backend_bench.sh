#!/usr/bin/env bash
# The point-addition backends of `fe` side by side, in one run, on the product's own jobs:
# the client's encryption of the embedded training set, one encrypted training epoch over
# it (the models must be bit-identical), and, with CRYPTONN_MNIST_DIR set, the prediction
# service on 2,000 full-MNIST test images with 8-bit and 4-bit keys. Each job runs on the
# fallback (`curv`) and on the fastest backend of this CPU, alternating, so that both see
# the machine at the same speed.
#
#   [CRYPTONN_MNIST_DIR=/path/to/mnist] ./scripts/backend_bench.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-backend-bench}"
bin=target/release
cargo build --release --bins -q
rm -rf "$work"
mkdir -p "$work"
# shellcheck source=start_server.sh
source scripts/start_server.sh
secs() { local t0=$1; echo "$(( $(date +%s%N) - t0 ))" | awk '{printf "%.1f s", $1 / 1e9}'; }

"$bin/authority" init --dir "$work/authority" --batch-size 64 > /dev/null
start "$work/authority.out" "$bin/authority" serve --quiet --dir "$work/authority" --listen 127.0.0.1:0
tok=(--authority "$addr" --token-file "$work/authority/token")
backends=(curv avx2)
# The client and trainer read CRYPTONN_MNIST_DIR as their default data: the first two jobs
# are on the embedded subset.
mnist="${CRYPTONN_MNIST_DIR:-}"
unset CRYPTONN_MNIST_DIR

echo "== client encrypt, embedded training set"
for b in "${backends[@]}"; do
  t0=$(date +%s%N)
  CRYPTONN_FE_BACKEND=$b "$bin/client" encrypt "${tok[@]}" --quiet --out "$work/train-$b.enc"
  echo "$b: $(secs "$t0")"
done

echo "== trainer train, 1 epoch over the same ciphertexts"
for b in "${backends[@]}"; do
  t0=$(date +%s%N)
  CRYPTONN_FE_BACKEND=$b "$bin/trainer" train "${tok[@]}" --quiet --data "$work/train-curv.enc" \
    --epochs 1 --out "$work/model-$b.bin" --dlog-table "$work/dlog.bin"
  echo "$b: $(secs "$t0"); $("$bin/trainer" evaluate --model "$work/model-$b.bin" | tail -1)"
done
if cmp -s "$work/model-curv.bin" "$work/model-avx2.bin"; then
  echo "models bit-identical"
else
  echo "MODELS DIFFER" >&2
  exit 1
fi

[ -n "$mnist" ] || exit 0
echo "== prediction service, full MNIST, 2,000 test images, 8 queries in flight"
"$bin/trainer" simulate --data "$mnist" --spec 784-128-32-10 --epochs 1 --seed 1 \
  --bits 8 --quiet --out "$work/mnist.bin"
for bits in 8 4; do
  for b in "${backends[@]}"; do
    start "$work/serve-$b-$bits.out" env CRYPTONN_FE_BACKEND=$b "$bin/trainer" serve \
      --model "$work/mnist.bin" "${tok[@]}" --listen 127.0.0.1:0 --bits "$bits" \
      --client-token-file "$work/serve.token" --dlog-table "$work/dlog.bin"
    echo -n "$bits-bit keys, $b: "
    "$bin/client" predict --quiet --server "$addr" --server-token-file "$work/serve.token" \
      "${tok[@]}" --data "$mnist" --parallel 8 --limit 2000 \
      --out "$work/predictions-$b-$bits.csv" | grep -i "per hour" | tail -1
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
  cmp -s "$work/predictions-curv-$bits.csv" "$work/predictions-avx2-$bits.csv" \
    && echo "$bits-bit predictions identical" || { echo "PREDICTIONS DIFFER" >&2; exit 1; }
done
