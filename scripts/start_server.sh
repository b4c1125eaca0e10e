# Shared by the benchmark scripts (sourced, not run): `start` runs a server command in the
# background and waits for its "listening on" line; the servers are killed when the script
# exits.
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
