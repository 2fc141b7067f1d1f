#!/usr/bin/env bash
# Serving benchmark (README, "Serving on a GPU: the host path"): moed on a
# synthetic one-layer model, `moectl bench` at several loads, one table row
# per load — what a client sees of the whole request path (socket, the I/O
# thread, the step loop's copies, the layer), next to which `moe-bench`
# gives the layer alone.
#   bash scripts/serve_bench.sh [SECONDS]    (default 4 s per load)
# From a repository checkout (build/bin) or a dist bundle's root (bin/).
# Environment (defaults: a small CPU run):
#   BACKEND=cpu|cuda  RANKS=1 (cuda: one GPU per rank; NCCL_NVLS_ENABLE=0 is passed)
#   HIDDEN=256 INTER=256 EXPERTS=16 TOP_K=2  GEMM=grouped (cuda's moe.gemm)
#   LOADS="1x16x1 1x1024x1 2x1024x2"  connections x tokens x requests in flight each
#   DTYPE=bf16 (f32, f16)
#   BASELINE=path/to/another/moed  the same loads against it first (an A/B in one run)
# E.g. the Qwen3-30B-A3B layer on one GPU, against an older build:
#   BACKEND=cuda HIDDEN=2048 INTER=768 EXPERTS=128 TOP_K=8 LOADS="1x16x1 1x1024x1 2x1024x2 2x4096x2" \
#     BASELINE=/tmp/old/bin/moed bash scripts/serve_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_env.sh serve
SECONDS_PER_LOAD=${1:-4}
BACKEND=${BACKEND:-cpu} RANKS=${RANKS:-1} HIDDEN=${HIDDEN:-256} INTER=${INTER:-256} EXPERTS=${EXPERTS:-16}
TOP_K=${TOP_K:-2} GEMM=${GEMM:-grouped} DTYPE=${DTYPE:-bf16} LOADS=${LOADS:-"1x16x1 1x1024x1 2x1024x2"}
BASELINE=${BASELINE:-}

max_tokens=0
for load in $LOADS; do
    IFS=x read -r conns tokens inflight <<< "$load"
    [[ "$conns" =~ ^[0-9]+$ && "$tokens" =~ ^[0-9]+$ && "$inflight" =~ ^[0-9]+$ ]] || {
        echo "serve_bench: load '$load' is not CONNECTIONSxTOKENSxIN_FLIGHT" >&2
        exit 2
    }
    [ "$tokens" -gt "$max_tokens" ] && max_tokens=$tokens
done
gemm_line=""
[ "$BACKEND" = cuda ] && gemm_line="  gemm: $GEMM"
{ model_yaml "{method: softmax_topk, norm_topk_prob: true}"; cat <<YAML; } > "$dir/moed.yaml"
moe:
  backend: $BACKEND
$gemm_line
  max_tokens_per_step: $((4 * max_tokens > 16384 ? 4 * max_tokens : 16384))
eplb: {mode: off}
serve:
  data: unix:$dir/data-%r.sock
  control: unix:$dir/control.sock
  max_request_tokens: $max_tokens
log: {level: warn}
YAML


run_daemon() { # LABEL MOED
    local label=$1 moed=$2
    mpirun --allow-run-as-root --bind-to none --oversubscribe -np "$RANKS" -x NCCL_NVLS_ENABLE=0 \
        "$moed" --config "$dir/moed.yaml" > "$dir/$label.log" 2>&1 &
    job=$!
    local waited=0
    until "${ctl[@]}" health > /dev/null 2>&1; do
        if ! kill -0 "$job" 2>/dev/null || [ "$waited" -ge 120 ]; then
            echo "serve_bench: $label did not come up; its log:" >&2
            tail -n 20 "$dir/$label.log" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    for load in $LOADS; do
        IFS=x read -r conns tokens inflight <<< "$load"
        echo "  ($label: $conns x $tokens tokens, $inflight in flight, ${SECONDS_PER_LOAD} s)" >&2
        "${ctl[@]}" bench --connections "$conns" --ranks "$RANKS" --tokens "$tokens" --pipeline "$inflight" \
            --seconds "$SECONDS_PER_LOAD" --dtype "$DTYPE" --hidden "$HIDDEN" --layer 0 --json |
            python3 -c '
import json, sys
label, load = sys.argv[1], sys.argv[2]
d = json.load(sys.stdin)
errors = sum(d["errors"].values())
print("%-10s %-14s %12.0f %10.3f %10.3f %8d" % (label, load, d["tokens_per_s"], d["p50_ms"], d["p99_ms"], errors))
' "$label" "$load"
    done
    "${ctl[@]}" shutdown > /dev/null 2>&1 || true
    wait "$job" 2>/dev/null || true
    job=""
}

echo "moed serving H=$HIDDEN I=$INTER E=$EXPERTS k=$TOP_K ($BACKEND, $RANKS rank(s)), $DTYPE requests"
printf '%-10s %-14s %12s %10s %10s %8s\n' daemon load tokens/s "p50 ms" "p99 ms" errors
[ -n "$BASELINE" ] && run_daemon baseline "$BASELINE"
run_daemon moed "$BUILD/bin/moed"
