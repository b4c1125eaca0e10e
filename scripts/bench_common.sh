# Shared by the inference benchmarks (sourced, not run): builds the release binaries, makes
# the work directory $work, defines `start` and starts an authority for MNIST-shaped data
# (batch 64), setting $bin, $auth and the caller flags ${tok[@]}.
: "${CRYPTONN_MNIST_DIR:?set CRYPTONN_MNIST_DIR to a directory with the four MNIST IDX files}"
bin=target/release
cargo build --release --bins -q
rm -rf "$work"
mkdir -p "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

# Starts a server command (its stdout into $1), waits for "listening on"; sets $addr and $pid.
start() {
  local out=$1; shift
  "$@" > "$out" 2> "$out.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1200); do grep -q "listening on" "$out" && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$out")
  [ -n "$addr" ] || { cat "$out.err"; exit 1; }
}

"$bin/authority" init --dir "$work/authority" --batch-size 64 > /dev/null
start "$work/authority.out" "$bin/authority" serve --quiet --dir "$work/authority" --listen 127.0.0.1:0
auth=$addr
tok=(--authority "$auth" --token-file "$work/authority/token")
