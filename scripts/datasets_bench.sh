#!/usr/bin/env bash
# Benchmark on data that is not MNIST-shaped, both shipped in nn/data:
# * the Wisconsin breast-cancer table (30 real-valued columns, 2 classes), first 469 rows
#   for training and the last 100 held out for testing;
# * the 8x8 digits (64 features, values 0..16, 10 classes), 1,497 training / 300 test images.
# For each: an authority, the client's encryption (timed), encrypted training over TCP (timed,
# test accuracy per epoch), the simulation (its model file must equal the encrypted run's) and
# the plain float baseline with the same seed and batches.
#
#   ./scripts/datasets_bench.sh [WORKDIR]       (default ./datasets-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-datasets-bench}"
cargo build --release --bins -q
bin=target/release
rm -rf "$work" && mkdir -p "$work"

csv=nn/data/breast-cancer/wdbc.csv
head -n 470 "$csv" > "$work/wdbc-train.csv"
{ head -n 1 "$csv"; tail -n 100 "$csv"; } > "$work/wdbc-test.csv"

# run_one NAME TRAIN EVAL FEATURES CLASSES X BATCH SPEC EPOCHS
run_one() {
  local name=$1 data=$2 eval=$3 features=$4 classes=$5 x=$6 batch=$7 spec=$8 epochs=$9
  local w="$work/$name"; mkdir -p "$w"
  "$bin/authority" init --dir "$w/keys" --features "$features" --classes "$classes" \
    --x-bound "$x" --batch-size "$batch" > /dev/null
  "$bin/authority" serve --quiet --dir "$w/keys" --listen 127.0.0.1:0 > "$w/auth.out" 2> /dev/null &
  local pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$w/auth.out" && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/^listening on //p' "$w/auth.out")
  local tok=(--authority "$addr" --token-file "$w/keys/token")
  local enc="$w/train.enc.encoding.json"
  local model=(--spec "$spec" --epochs "$epochs" --seed 1)
  local ev=(--eval-data "$eval" --eval-encoding "$enc")
  echo "== $name: client encryption"
  /usr/bin/time -f "client wall %e s, peak %M KiB" \
    "$bin/client" encrypt "${tok[@]}" --quiet --data "$data" --out "$w/train.enc" 2>&1 | tee "$w/encrypt.txt"
  echo "== $name: encrypted training"
  /usr/bin/time -f "trainer wall %e s, peak %M KiB" \
    "$bin/trainer" train "${tok[@]}" --quiet "${model[@]}" "${ev[@]}" --data "$w/train.enc" \
    --out "$w/secure.bin" --dlog-table "$work/dlog.bin" 2>&1 | tee "$w/train.txt"
  kill $pid 2> /dev/null || true
  echo "== $name: simulation and float baseline"
  "$bin/trainer" simulate --quiet "${model[@]}" "${ev[@]}" --data "$data" --encoding "$enc" \
    --x-bound "$x" --batch-size "$batch" --out "$w/sim.bin" | tee "$w/sim.txt"
  "$bin/trainer" simulate --quiet --float "${model[@]}" "${ev[@]}" --data "$data" --encoding "$enc" \
    --x-bound "$x" --batch-size "$batch" --out "$w/float.bin" | tee "$w/float.txt"
  if cmp -s "$w/secure.bin" "$w/sim.bin"; then
    echo "$name: encrypted model == simulated model (bit-identical)"
  else
    echo "$name: MODELS DIFFER"; exit 1
  fi
}

run_one wdbc "$work/wdbc-train.csv" "$work/wdbc-test.csv" 30 2 255 32 16 20
run_one digits nn/data/digits-8x8 nn/data/digits-8x8 64 10 16 32 32 10
