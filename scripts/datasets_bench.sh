#!/usr/bin/env bash
# Benchmark on data that is not MNIST-shaped: the Wisconsin breast-cancer table (30 real
# columns, 2 classes) and the 8x8 digits (64 features, values 0..16, 10 classes), both shipped
# in nn/data. For each: authority, client encryption (timed), encrypted training over TCP
# (timed), the simulation (must give the same model file), the float baseline, and the
# accuracies.
#
#   ./scripts/datasets_bench.sh [WORKDIR]       (default ./datasets-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-datasets-bench}"
cargo build --release --bins -q
bin=target/release
rm -rf "$work" && mkdir -p "$work"

run_one() { # name data features classes x_bound batch spec epochs [extra client/sim flags...]
  local name=$1 data=$2 features=$3 classes=$4 x=$5 batch=$6 spec=$7 epochs=$8; shift 8
  local w="$work/$name"; mkdir -p "$w"
  "$bin/authority" init --dir "$w/keys" --features "$features" --classes "$classes" \
    --x-bound "$x" --batch-size "$batch" > /dev/null
  "$bin/authority" serve --quiet --dir "$w/keys" --listen 127.0.0.1:0 > "$w/auth.out" 2> /dev/null &
  local pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$w/auth.out" && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/^listening on //p' "$w/auth.out")
  local tok=(--authority "$addr" --token-file "$w/keys/token")
  echo "== $name: client encryption"
  "$bin/client" encrypt "${tok[@]}" --quiet --data "$data" "$@" --out "$w/train.enc" | tee "$w/encrypt.txt"
  local enc="$w/train.enc.encoding.json"
  local model=(--spec "$spec" --epochs "$epochs" --seed 1)
  echo "== $name: encrypted training"
  /usr/bin/time -f "wall %e s" "$bin/trainer" train "${tok[@]}" --quiet "${model[@]}" \
    --data "$w/train.enc" --out "$w/secure.bin" --dlog-table "$work/dlog.bin" \
    --eval-data "$data" --eval-encoding "$enc" "${@/--label-column/--eval-label-column}" 2>&1 | tee "$w/train.txt"
  kill $pid 2> /dev/null || true
  echo "== $name: simulation and float baseline"
  "$bin/trainer" simulate --quiet "${model[@]}" --data "$data" --encoding "$enc" "$@" \
    --x-bound "$x" --batch-size "$batch" --out "$w/sim.bin" | tee "$w/sim.txt"
  "$bin/trainer" simulate --quiet --float "${model[@]}" --data "$data" --encoding "$enc" "$@" \
    --x-bound "$x" --batch-size "$batch" --out "$w/float.bin" | tee "$w/float.txt"
  if cmp -s "$w/secure.bin" "$w/sim.bin"; then
    echo "$name: encrypted model == simulated model (bit-identical)"
  else
    echo "$name: MODELS DIFFER" && exit 1
  fi
}

run_one wdbc nn/data/breast-cancer/wdbc.csv 30 2 255 32 16 20 --label-column diagnosis
run_one digits nn/data/digits-8x8 64 10 16 32 32 10
