#!/usr/bin/env bash
# Quick start: install the one system package, build, then run the three CryptoNN roles on
# the embedded MNIST subset (6,000 training images) and print the trained model's accuracy.
#
#   ./scripts/quickstart.sh [EPOCHS]        (default 1 epoch; work files in ./quickstart/)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-1}"

if ! dpkg -s libgmp-dev >/dev/null 2>&1; then
  echo "== installing libgmp-dev (GMP, the big-integer backend of curv-kzen)"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq libgmp-dev
fi

echo "== building (release)"
cargo build --release --bins -q
bin=target/release
work=quickstart
rm -rf "$work" && mkdir -p "$work"

echo "== authority: generating master keys (batch size 64)"
"$bin/authority" init --dir "$work/authority" --batch-size 64
"$bin/authority" serve --dir "$work/authority" --listen 127.0.0.1:0 > "$work/authority.out" 2> "$work/authority.err" &
auth_pid=$!
trap 'kill $auth_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$work/authority.out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/authority.out")
echo "   listening on $addr"

echo "== client: encrypting the embedded training set"
"$bin/client" encrypt --authority "$addr" --token-file "$work/authority/token" --out "$work/train.enc"

echo "== trainer: training 784-128-32-10 (sigmoid) over the encrypted data, $epochs epoch(s)"
"$bin/trainer" train --authority "$addr" --token-file "$work/authority/token" \
  --data "$work/train.enc" --epochs "$epochs" --out "$work/model.bin" \
  --dlog-table "$work/dlog.bin" --checkpoint "$work/checkpoint.bin"

echo "== experimenter: scoring the model on the embedded plaintext test set"
"$bin/trainer" evaluate --model "$work/model.bin"
