#!/usr/bin/env bash
# The README's first command (`make demo`): starts a 2-rank CPU daemon on the
# tiny synthetic model, shows a request answered and the stats, then drains
# and stops it. Everything it starts, it stops (also on Ctrl-C or failure).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
dir=$(mktemp -d /tmp/moed-demo.XXXXXX)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

sed -e "s|^  data: .*|  data: unix:$dir/data-%r.sock|" \
    -e "s|^  control: .*|  control: unix:$dir/control.sock|" \
    config/examples/tiny-cpu.yaml > "$dir/moed.yaml"
ctl=("$BUILD/bin/moectl" --control "unix:$dir/control.sock" --data "unix:$dir/data-%r.sock")

echo "== starting: mpirun -np 2 $BUILD/bin/moed --config $dir/moed.yaml"
mpirun --oversubscribe --bind-to none -np 2 -x OMP_NUM_THREADS=1 \
    "$BUILD/bin/moed" --config "$dir/moed.yaml" > "$dir/moed.log" 2>&1 &
job=$!
cleanup() {
    if kill -0 "$job" 2>/dev/null; then
        "${ctl[@]}" shutdown > /dev/null 2>&1 || kill "$job" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$job" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$job" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

for _ in $(seq 100); do
    "${ctl[@]}" health > /dev/null 2>&1 && break
    kill -0 "$job" 2>/dev/null || { cat "$dir/moed.log"; exit 1; }
    sleep 0.2
done
cat "$dir/moed.log"
echo "== moectl health";                         "${ctl[@]}" health
echo "== moectl forward --layer 0 --tokens 8 (rank 0)"; "${ctl[@]}" forward --layer 0 --tokens 8
echo "== moectl forward --layer 1 --tokens 8 --dtype bf16 (rank 1)"; "${ctl[@]}" --rank 1 forward --layer 1 --tokens 8 --dtype bf16
echo "== moectl bench: 4 connections x 64-token requests for 2 s"
"${ctl[@]}" bench --connections 4 --tokens 64 --seconds 2 --ranks 2
echo "== moectl stats";                          "${ctl[@]}" stats
echo "== moectl shutdown";                       "${ctl[@]}" shutdown
wait "$job" && echo "== every rank exited 0"
