# Shared by the inference benchmarks (sourced, not run): builds the release binaries, makes
# the work directory $work, defines `start` and starts an authority for MNIST-shaped data
# (batch 64), setting $bin, $auth and the caller flags ${tok[@]}.
: "${CRYPTONN_MNIST_DIR:?set CRYPTONN_MNIST_DIR to a directory with the four MNIST IDX files}"
bin=target/release
cargo build --release --bins -q
rm -rf "$work"
mkdir -p "$work"
# shellcheck source=start_server.sh
source scripts/start_server.sh

"$bin/authority" init --dir "$work/authority" --batch-size 64 > /dev/null
start "$work/authority.out" "$bin/authority" serve --quiet --dir "$work/authority" --listen 127.0.0.1:0
auth=$addr
tok=(--authority "$auth" --token-file "$work/authority/token")
