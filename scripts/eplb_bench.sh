#!/usr/bin/env bash
# EPLB benchmark (README table): a Zipf-routed load (s = 1.2: the hot experts
# are the low ids, all on rank 0 in the first placement) served by a 2-rank
# daemon with eplb.mode off and with online rebalancing; reports the
# imbalance (max/mean rank load over the stats window) and the throughput
# and step time the clients and the daemon see.
#   bash scripts/eplb_bench.sh [SECONDS]     (default 6 s per measurement)
# From a repository checkout (build/bin) or a dist bundle's root (bin/).
# Environment (defaults: the README table's run): RANKS=2, EXPERTS=16,
# TOP_K=2, HIDDEN=256, INTER=256, EXTRA_SLOTS=4 (the online run's replicas;
# the total must divide by RANKS), TOKENS=256 per request, one client per rank,
# BACKEND=cpu (cuda: one GPU per rank; NCCL_NVLS_ENABLE=0 is passed to the
# ranks), WINDOW=400 steps of statistics, EVERY=100 steps between rebalances.
# E.g. the Qwen3-30B-A3B layer on two GPUs:
#   BACKEND=cuda EXPERTS=128 TOP_K=8 HIDDEN=2048 INTER=768 EXTRA_SLOTS=32 TOKENS=1024 bash scripts/eplb_bench.sh 10
# E.g. the DeepSeek-V3 expert layout (E=256, k=8, 32 extra slots) on 8 ranks:
#   RANKS=8 EXPERTS=256 TOP_K=8 HIDDEN=128 INTER=64 EXTRA_SLOTS=32 bash scripts/eplb_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_env.sh eplb
SECONDS_PER_RUN=${1:-6}
RANKS=${RANKS:-2} EXPERTS=${EXPERTS:-16} TOP_K=${TOP_K:-2} HIDDEN=${HIDDEN:-256} INTER=${INTER:-256}
EXTRA_SLOTS=${EXTRA_SLOTS:-4} TOKENS=${TOKENS:-256} BACKEND=${BACKEND:-cpu}
WINDOW=${WINDOW:-400} EVERY=${EVERY:-100}

write_config() { # MODE SLOTS
    { model_yaml "{method: zipf, zipf_s: 1.2, seed: 5}"; cat <<YAML; } > "$dir/moed.yaml"
moe: {backend: $BACKEND}
eplb: {mode: $1, num_slots: $2, window_steps: $WINDOW, rebalance_every_steps: $EVERY, min_improvement: 0.05}
serve:
  data: unix:$dir/data-%r.sock
  control: unix:$dir/control.sock
log: {level: info}
YAML
}


measure() { # LABEL: one bench run, then the stats it left
    local label=$1 out
    out=$("${ctl[@]}" bench --connections "$RANKS" --ranks "$RANKS" --tokens "$TOKENS" --seconds "$SECONDS_PER_RUN" \
        --layer 0 --json)
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
    mpirun --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 -np "$RANKS" -x OMP_NUM_THREADS=1 \
        -x NCCL_NVLS_ENABLE=0 "$BUILD/bin/moed" --config "$dir/moed.yaml" \
        > "$dir/moed-$1.log" 2>&1 &
    job=$!
    for _ in $(seq 600); do "${ctl[@]}" health > /dev/null 2>&1 && break; sleep 0.1; done
    measure "eplb $1 ($2 slots)"
    [ "$1" = online ] && measure "eplb online, later"
    "${ctl[@]}" shutdown > /dev/null
    wait "$job"
    job=""
    grep -h "new placement" "$dir/moed-$1.log" | sed 's/^/    /' || true
}

echo "Zipf(1.2) routing, H=$HIDDEN I=$INTER E=$EXPERTS k=$TOP_K, $RANKS $BACKEND ranks, $RANKS clients x $TOKENS-token requests, ${SECONDS_PER_RUN} s each"
run off "$EXPERTS"
run online $((EXPERTS + EXTRA_SLOTS))
