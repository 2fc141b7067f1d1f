#!/usr/bin/env bash
# EPLB benchmark (README table): a Zipf-routed load (s = 1.2: the hot experts
# are the low ids, all on rank 0 in the first placement) served by a 2-rank
# CPU daemon with eplb.mode off and with online rebalancing; reports the
# imbalance (max/mean rank load over the stats window) and the throughput
# and step time the clients and the daemon see.
#   bash scripts/eplb_bench.sh [SECONDS]     (default 6 s per measurement)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
SECONDS_PER_RUN=${1:-6}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
dir=$(mktemp -d /tmp/moed-eplb.XXXXXX)
job=""
cleanup() {
    [ -n "$job" ] && kill "$job" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

write_config() { # MODE SLOTS
    cat > "$dir/moed.yaml" <<YAML
model:
  weights: {format: synthetic, seed: 3}
  layers: 1
  hidden: 256
  moe_intermediate: 256
  experts: 16
  top_k: 2
  routing: {method: zipf, zipf_s: 1.2, seed: 5}
moe: {backend: cpu}
eplb: {mode: $1, num_slots: $2, window_steps: 400, rebalance_every_steps: 100, min_improvement: 0.05}
serve:
  data: unix:$dir/data-%r.sock
  control: unix:$dir/control.sock
log: {level: info}
YAML
}

ctl=("$BUILD/bin/moectl" --control "unix:$dir/control.sock" --data "unix:$dir/data-%r.sock")

measure() { # LABEL: one bench run, then the stats it left
    local label=$1 out
    out=$("${ctl[@]}" bench --connections 2 --ranks 2 --tokens 256 --seconds "$SECONDS_PER_RUN" --layer 0 --json)
    "${ctl[@]}" stats --json | python3 -c '
import json, sys
bench = json.loads(sys.argv[2]); stats = json.load(sys.stdin); layer = stats["layers"][0]
fmt = lambda v: "-" if v is None else "%.3f" % v
print("%-22s imbalance %s  rank loads %s  step p50 %.2f ms  %.0f tokens/s  rebalances %d (predicted %s -> %s, %d bytes migrated)" % (
    sys.argv[1], fmt(layer["imbalance"]), layer["rank_loads"], stats["step_ms"]["p50"],
    bench.get("tokens_per_s", 0), layer["rebalances"], fmt(layer["imbalance_before"]),
    fmt(layer["imbalance_after"]), layer["migration_bytes"]))' "$label" "$out"
}

run() { # MODE SLOTS
    write_config "$1" "$2"
    mpirun --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 -np 2 -x OMP_NUM_THREADS=1 "$BUILD/bin/moed" --config "$dir/moed.yaml" \
        > "$dir/moed-$1.log" 2>&1 &
    job=$!
    for _ in $(seq 100); do "${ctl[@]}" health > /dev/null 2>&1 && break; sleep 0.1; done
    measure "eplb $1 ($2 slots)"
    [ "$1" = online ] && measure "eplb online, later"
    "${ctl[@]}" shutdown > /dev/null
    wait "$job"
    job=""
    grep -h "new placement" "$dir/moed-$1.log" | sed 's/^/    /' || true
}

echo "Zipf(1.2) routing, H=256 I=256 E=16 k=2, 2 CPU ranks, 2 clients x 256-token requests, ${SECONDS_PER_RUN} s each"
run off 16
run online 20
