#!/usr/bin/env bash
# GPU checks of a moed bundle (make dist), run on the GPU host from the bundle
# root:   cd dist/moed && bash scripts/gpu-test.sh [--quick] [--steps LIST]
# (from a repository checkout it uses build/bin and build/tests instead).
#
# Steps (--steps, comma-separated; default all):
#   info    nvidia-smi -L, nvcc --version, mpirun/python versions; the bundle's
#           libraries resolve (ldd)
#   kernel  bin/tests/cuda_layer (CUDA layer vs the CPU backend), then the same
#           under compute-sanitizer memcheck --leak-check full (its quick set:
#           MOE_CUDA_LAYER_QUICK=1, without the largest sizes); with >= 2 GPUs
#           both again under mpirun -np 2 (cuda_layer's multi-rank set: the
#           NCCL exchanges, an empty rank, the exact combine and its
#           bit-identical EPLB swap)
#   daemon  moed under mpirun with 1 rank (and 2 with >= 2 GPUs) on the tiny
#           config with moe.backend cuda, the same with cpu; the same
#           moectl forward (64 tokens, seed 5) on both, in bf16 and in f32
#           (the daemons' bf16 and float32 step rows), then three equal
#           3-token forwards (bit-identical to each other, except under the
#           zipf router); outputs must agree (max|a-b|/max|b| <= 2e-2, no
#           NaN), and on the Qwen3-shaped model with 1 rank the 3-token
#           steps must have run as a CUDA graph (its log line); shutdown,
#           every rank exits 0.
#           Without --quick also a Qwen3-shaped 1-layer model with 1 rank.
#           With 2 GPUs also eplb online (12 slots, zipf router): 6
#           forwards, `moectl rebalance`, the compared forward; the stats
#           must show the rebalance (migration on the backend under test).
#   bench   moe-bench, backend cuda, synthetic 1-layer Qwen3-30B-A3B shape
#           (H2048 I768 E128 k8) and Mixtral shape (H4096 I14336 E8 k2)
#           with moe.gemm auto (the autotuner; its table in the JSON), then
#           with cublas and grouped alone (a table of the three);
#           also under mpirun -np 2 with >= 2 GPUs (same total tokens)
#   peer    scripts/peer_torch.py --self-check, then the PyTorch peers for the
#           same shapes and tokens; a table moed vs peers vs roofline
# Tokens 1,16,128,1024,4096 (--quick: 1,128,4096), 20 iterations.
#
# Each check prints PASS/FAIL/SKIP and the script goes on; the last line is
# "N passed, N failed"; exit status 1 when anything failed. Logs go to $OUT
# when set (the device tool's folder: at most 8 files come back, so the
# details are packed into gpu-test-detail.tar.gz there, beside gpu-test.log,
# summary.txt and results.json), else to ./gpu-test-logs (left unpacked).
# Every process it starts, it stops (trap), also on failure or Ctrl-C.
#
# Environment:
#   MOED_GPU_TEST_BACKEND=cpu   dry run without a GPU: the "cuda" daemon and
#                               moe-bench use the cpu backend (2-rank runs too)
#   MOED_GPU_TEST_TOKENS=1,16   token counts of bench/peer; MOED_GPU_TEST_ITERS=20
#   MOED_GPU_TEST_DTYPE=bf16,f32  the compared daemon forwards' wire dtypes,
#                               each compared (bf16: the daemons' bf16 step
#                               rows; f32 and f16: float32 rows)
#   MOED_GPU_TEST_GEMMS=cublas,grouped  the single-implementation bench runs
#                               (empty: none)
#   MOED_MPIRUN_ARGS="..."      extra mpirun options (e.g. --mca btl ^openib)
#   PYTHON=python3              the Python with torch (and numpy)
# NCCL_NVLS_ENABLE=0 (and the other NVLink-multicast switches) is always set
# and passed to every mpirun.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

usage() {
    sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}
QUICK=0
STEPS=info,kernel,daemon,bench,peer
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --steps) STEPS=${2:-}; shift ;;
        --steps=*) STEPS=${1#--steps=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu-test.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

BACKEND=${MOED_GPU_TEST_BACKEND:-cuda}
case "$BACKEND" in cuda | cpu) ;; *) echo "MOED_GPU_TEST_BACKEND must be cuda or cpu" >&2; exit 2 ;; esac
if [ $QUICK = 1 ]; then TOKENS=${MOED_GPU_TEST_TOKENS:-1,128,4096}; else TOKENS=${MOED_GPU_TEST_TOKENS:-1,16,128,1024,4096}; fi
ITERS=${MOED_GPU_TEST_ITERS:-20}
DTYPES=$(echo "${MOED_GPU_TEST_DTYPE:-bf16,f32}" | tr ',' ' ')
DTYPE=${DTYPES%% *} # the warm-up forwards' dtype
PYTHON=${PYTHON:-python3}
LOGDIR=${OUT:-$ROOT/gpu-test-logs}
D=$LOGDIR/detail
rm -rf "$D" && mkdir -p "$D" || exit 2

if [ -x "$ROOT/bin/moed" ]; then
    BIN=$ROOT/bin TBIN=$ROOT/bin/tests
else # a repository checkout
    BIN=$ROOT/${BUILD:-build}/bin TBIN=$ROOT/${BUILD:-build}/tests
fi

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d ;; esac
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
NCPU=$(nproc 2>/dev/null || echo 4)
# shellcheck disable=SC2206 # MOED_MPIRUN_ARGS is split on purpose
MPIRUN=(mpirun --allow-run-as-root --bind-to none --oversubscribe -x NCCL_NVLS_ENABLE=0
        -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1 -x NVSHMEM_DISABLE_NVLS=1 -x LD_LIBRARY_PATH
        ${MOED_MPIRUN_ARGS:-})

NGPU=0
if command -v nvidia-smi > /dev/null 2>&1; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi
NVCC=$(command -v nvcc 2>/dev/null || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; })
SANITIZER=$(command -v compute-sanitizer 2>/dev/null ||
    { [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer; })
# two ranks: with two GPUs, or in a cpu dry run
NP2=0
if [ "$NGPU" -ge 2 ] || [ "$BACKEND" = cpu ]; then NP2=1; fi

want() { case ",$STEPS," in *",$1,"*) return 0 ;; esac; return 1; }

NPASS=0 NFAIL=0 NSKIP=0
pass() { NPASS=$((NPASS + 1)); echo "PASS $*"; echo "PASS $*" >> "$D/results.txt"; }
fail() { NFAIL=$((NFAIL + 1)); echo "FAIL $*"; echo "FAIL $*" >> "$D/results.txt"; }
skip() { NSKIP=$((NSKIP + 1)); echo "SKIP $*"; echo "SKIP $*" >> "$D/results.txt"; }
tail_log() { tail -n "${2:-25}" "$1" | sed 's/^/    | /'; }

TMP=$(mktemp -d /tmp/moed-gpu.XXXXXX)
PIDS=()
# stop PID [GRACE]: TERM mpirun (it forwards to its ranks), then KILL it and
# the children it had (the ranks), by id.
stop_pid() {
    local pid=$1 grace=${2:-10} kids
    kill -0 "$pid" 2>/dev/null || return 0
    kids=$(pgrep -P "$pid" 2>/dev/null | tr '\n' ' ')
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq $((grace * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    # shellcheck disable=SC2086
    kill -KILL "$pid" $kids 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid" 5; done
    rm -rf "$TMP"
}

# run_check NAME TIMEOUT CMD...: one check, its output in $D/NAME.log
run_check() {
    local name=$1 limit=$2 rc start
    shift 2
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$D/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - start))
    if [ $rc = 0 ]; then
        pass "$name (${took}s)"
    else
        [ $rc = 124 ] && echo "    timed out after ${limit}s" >> "$D/$name.log"
        fail "$name: exit $rc after ${took}s (log: detail/$name.log)"
        tail_log "$D/$name.log"
    fi
    return $rc
}

# make_config FILE BACKEND H I E K LAYERS SOCKDIR: config/examples/tiny-cpu.yaml
# with those shapes, backend and unix sockets, and request limits such that
# one largest result fits serve.max_output_bytes at any of these hidden
# sizes; checked with moed --check-config.
make_config() {
    local file=$1 backend=$2 h=$3 i=$4 e=$5 k=$6 layers=$7 sock=$8
    mkdir -p "$sock"
    sed -e "s|^  backend: .*|  backend: $backend|" \
        -e "s|^  hidden: .*|  hidden: $h|" \
        -e "s|^  moe_intermediate: .*|  moe_intermediate: $i|" \
        -e "s|^  experts: .*|  experts: $e|" \
        -e "s|^  top_k: .*|  top_k: $k|" \
        -e "s|^  layers: .*|  layers: $layers|" \
        -e "s|^  max_tokens_per_step: .*|  max_tokens_per_step: 16384|" \
        -e "s|^  chunking: .*|  chunking: {max_tokens_per_chunk: 16384, overlap: true}|" \
        -e "s|^  data: .*|  data: unix:$sock/data-%r.sock|" \
        -e "s|^  control: .*|  control: unix:$sock/control.sock|" \
        -e "/^  control: /a\\  max_request_tokens: 8192\\n  max_output_bytes: 1073741824" \
        "$ROOT/config/examples/tiny-cpu.yaml" > "$file"
    local want
    for want in "backend: $backend" "hidden: $h" "moe_intermediate: $i" "experts: $e" \
        "top_k: $k" "layers: $layers" "data: unix:$sock/data-%r.sock"; do
        grep -q "^ *$want\$" "$file" || { echo "make_config: '$want' not set in $file" >&2; return 1; }
    done
    "$BIN/moed" --check-config "$file" > "$file.check" 2>&1 || { cat "$file.check" >&2; return 1; }
}

# daemon_run TAG NP CONFIG SOCKDIR HIDDEN OUT: mpirun -np NP moed, wait for
# health, the same forward in each of DTYPES (into OUT.<dtype>.npy),
# shutdown; 0 when all of it worked and every rank exited 0.
# WARM (optional): that many forwards first, then `moectl rebalance`, and
# after the compared forward the stats must show a rebalance of layer 0.
daemon_run() {
    local tag=$1 np=$2 cfg=$3 sock=$4 hidden=$5 out=$6 warm=${7:-0} log=$D/$1.log pid rc
    local ctl=("$BIN/moectl" --control "unix:$sock/control.sock" --data "unix:$sock/data-%r.sock")
    local threads=$((NCPU / np > 0 ? NCPU / np : 1))
    echo "== mpirun -np $np moed --config $cfg" > "$log"
    cat "$cfg" >> "$log"
    "${MPIRUN[@]}" -np "$np" -x OMP_NUM_THREADS="$threads" "$BIN/moed" --config "$cfg" >> "$log.moed" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    local up=0 waited=0
    while [ $waited -lt "${MOED_GPU_TEST_START_S:-300}" ]; do
        if "${ctl[@]}" health >> "$log" 2>&1; then up=1; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1; waited=$((waited + 1))
    done
    if [ $up = 0 ]; then
        echo "== not healthy after ${waited}s" >> "$log"
        stop_pid "$pid"
        cat "$log.moed" >> "$log"; rm -f "$log.moed"
        return 1
    fi
    echo "== healthy after ${waited}s; forward" >> "$log"
    local frc=0 s
    for s in $(seq 1 "$warm"); do
        timeout 300 "${ctl[@]}" forward --layer 0 --tokens 64 --seed "$((100 + s))" --hidden "$hidden" \
            --dtype "$DTYPE" --output "$TMP/$tag-warm.npy" >> "$log" 2>&1 || frc=1
    done
    if [ "$warm" -gt 0 ]; then
        { echo "== rebalance"; "${ctl[@]}" rebalance; } >> "$log" 2>&1 || frc=1
    fi
    local dt
    for dt in $DTYPES; do
        timeout 300 "${ctl[@]}" forward --layer 0 --tokens 64 --seed 5 --hidden "$hidden" --dtype "$dt" \
            --output "$out.$dt.npy" >> "$log" 2>&1 || frc=1
    done
    # three equal 3-token steps: on one GPU the second is captured as a CUDA
    # graph and the third launches it (cuda_graph.cu)
    for s in 1 2 3; do
        timeout 300 "${ctl[@]}" forward --layer 0 --tokens 3 --seed 7 --hidden "$hidden" --dtype "$DTYPE" \
            --output "$out.small$s.npy" >> "$log" 2>&1 || frc=1
    done
    "${ctl[@]}" stats --json > "$TMP/$tag-stats.json" 2>> "$log"
    cat "$TMP/$tag-stats.json" >> "$log"
    if [ "$warm" -gt 0 ] && ! "$PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1])); d=d.get("result", d)
l=[x for x in d["layers"] if x["layer"] == 0][0]; sys.exit(0 if l["rebalances"] >= 1 else "no rebalance of layer 0")' \
        "$TMP/$tag-stats.json" >> "$log" 2>&1; then
        echo "== the stats show no rebalance" >> "$log"
        frc=1
    fi
    { echo "== shutdown"; "${ctl[@]}" shutdown; } >> "$log" 2>&1
    local left=120
    while kill -0 "$pid" 2>/dev/null && [ $left -gt 0 ]; do sleep 0.5; left=$((left - 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        echo "== still running 60s after shutdown: killed" >> "$log"
        stop_pid "$pid"
        rc=99
    else
        wait "$pid"
        rc=$?
    fi
    echo "== mpirun exit status $rc, forward exit status $frc" >> "$log"
    cat "$log.moed" >> "$log"; rm -f "$log.moed"
    [ $frc = 0 ] && [ $rc = 0 ]
}

# compare_npy NAME A B: relative error max|a-b|/max|b| <= 2e-2, finite, nonzero
compare_npy() {
    local name=$1
    "$PYTHON" - "$2" "$3" > "$D/$name.log" 2>&1 << 'EOF'
import sys
import numpy as np
a = np.load(sys.argv[1]).astype(np.float64)
b = np.load(sys.argv[2]).astype(np.float64)
print(f"shapes {a.shape} {b.shape}")
if a.shape != b.shape:
    sys.exit("shape mismatch")
if not (np.isfinite(a).all() and np.isfinite(b).all()):
    sys.exit(f"non-finite values: {np.count_nonzero(~np.isfinite(a))} in a, {np.count_nonzero(~np.isfinite(b))} in b")
scale = np.abs(b).max()
if scale == 0:
    sys.exit("reference output is all zeros")
rel = np.abs(a - b).max() / scale
print(f"max|a-b|/max|b| = {rel:.3e} (max|b| = {scale:.3e}, mean|b| = {np.abs(b).mean():.3e})")
sys.exit(0 if rel <= 2e-2 else f"relative error {rel:.3e} > 2e-2")
EOF
    local rc=$?
    if [ $rc = 0 ]; then
        pass "$name: $(tail -n 1 "$D/$name.log")"
    else
        fail "$name: $(tail -n 1 "$D/$name.log")"
    fi
}

# daemon_compare NAME NP H I E K LAYERS: the $BACKEND daemon vs the cpu daemon
# daemon_compare NAME NP H I E K LAYERS [METHOD]: the same forward through a
# daemon of the backend under test and a cpu one. METHOD (default the
# config's softmax_topk) sets model.routing.method: at large shapes a router
# GEMM in bf16 and one in f32 break near-ties differently, so those compare
# the expert math under a router that reads no logits (perfect).
# EPLB=1 (env): eplb online with 12 slots and a zipf router, 6 forwards and
# a `moectl rebalance` before the compared one (migration on both backends).
daemon_compare() {
    local name=$1 np=$2 h=$3 i=$4 e=$5 k=$6 layers=$7 method=${8:-} b role ok=1 warm=0
    for role in test ref; do
        # test: the backend under test ($BACKEND); ref: the cpu reference
        b=cpu
        [ $role = test ] && b=$BACKEND
        local tag=daemon-$name-np$np-$role sock=$TMP/$name-$np-$role
        if ! make_config "$TMP/$tag.yaml" "$b" "$h" "$i" "$e" "$k" "$layers" "$sock" 2> "$D/$tag.log"; then
            fail "$tag: config rejected (log: detail/$tag.log)"; tail_log "$D/$tag.log"; ok=0; continue
        fi
        [ -n "$method" ] && sed -i "s|method: softmax_topk|method: $method|" "$TMP/$tag.yaml"
        if [ "${EPLB:-0}" = 1 ]; then
            warm=6
            sed -i -e "s|^  mode: off|  mode: online\n  num_slots: 12\n  window_steps: 8\n  rebalance_every_steps: 100000\n  min_improvement: 0.0|" \
                "$TMP/$tag.yaml"
            "$BIN/moed" --check-config "$TMP/$tag.yaml" > /dev/null 2>> "$D/$tag.log" ||
                { fail "$tag: eplb config rejected"; tail_log "$D/$tag.log"; ok=0; continue; }
        fi
        local start took
        start=$(date +%s)
        if daemon_run "$tag" "$np" "$TMP/$tag.yaml" "$sock" "$h" "$TMP/$tag" "$warm"; then
            took=$(($(date +%s) - start))
            pass "$tag (backend $b): start, health, forward ($DTYPES), shutdown, every rank exit 0 (${took}s)"
            cp "$TMP/$tag".*.npy "$D/"
        else
            fail "$tag (backend $b): see detail/$tag.log"; tail_log "$D/$tag.log"; ok=0
        fi
    done
    local dt
    for dt in $DTYPES; do
        if [ $ok = 1 ]; then
            compare_npy "daemon-$name-np$np-compare-$BACKEND-vs-cpu-$dt" \
                "$TMP/daemon-$name-np$np-test.$dt.npy" "$TMP/daemon-$name-np$np-ref.$dt.npy"
        else
            skip "daemon-$name-np$np-compare-$BACKEND-vs-cpu-$dt: a daemon run failed"
        fi
    done
    if [ $ok = 1 ]; then
        compare_npy "daemon-$name-np$np-compare-$BACKEND-vs-cpu-3-tokens" \
            "$TMP/daemon-$name-np$np-test.small3.npy" "$TMP/daemon-$name-np$np-ref.small3.npy"
        # the three equal steps (on one GPU: uncaptured, captured, launched)
        # bit for bit; not under the zipf router (it draws anew each step)
        if [ "${EPLB:-0}" = 1 ]; then
            :
        elif "$PYTHON" -c 'import sys, numpy as np; a = [np.load(f) for f in sys.argv[1:]]
sys.exit(0 if all(np.array_equal(a[0], b) for b in a[1:]) else "outputs differ")' \
            "$TMP/daemon-$name-np$np-test.small"{1,2,3}.npy >> "$D/daemon-$name-np$np-test.log" 2>&1; then
            pass "daemon-$name-np$np-3-tokens-repeat: three equal 3-token steps, bit-identical outputs"
        else
            fail "daemon-$name-np$np-3-tokens-repeat: three equal 3-token steps differ (detail/daemon-$name-np$np-test.log)"
        fi
    else
        skip "daemon-$name-np$np-compare-$BACKEND-vs-cpu-3-tokens: a daemon run failed"
    fi
    # the Qwen3-shaped layer on one GPU (its autotuner picks the grouped
    # kernels at 3 rows; routing on the device by a method that does not
    # draw anew each step): the small steps ran as a graph
    if [ $ok = 1 ] && [ "$BACKEND" = cuda ] && [ "$np" = 1 ] && [ "$name" = qwen3-1layer ] &&
        [ "${EPLB:-0}" != 1 ] && { [ -z "$method" ] || [ "$method" = perfect ]; }; then
        if grep -q "captured as a CUDA graph" "$D/daemon-$name-np$np-test.log"; then
            pass "daemon-$name-np$np-graph: its 3-token steps ran as a CUDA graph"
        else
            fail "daemon-$name-np$np-graph: no step was captured as a CUDA graph (detail/daemon-$name-np$np-test.log)"
        fi
    fi
}

# bench SHAPE NP H I E K [GEMM]: moe-bench JSON into $D/moed-SHAPE-npNP.json
# (moe.gemm auto), or $D/gemm-SHAPE-GEMM.json with moe.gemm GEMM
bench() {
    local shape=$1 np=$2 h=$3 i=$4 e=$5 k=$6 gemm=${7:-} tokens=$TOKENS
    local tag=bench-$shape-np$np${gemm:+-$gemm} cfg=$TMP/bench-$shape${gemm:+-$gemm}.yaml
    local json=$D/moed-$shape-np$np.json
    [ -n "$gemm" ] && json=$D/gemm-$shape-$gemm.json
    if ! make_config "$cfg" "$BACKEND" "$h" "$i" "$e" "$k" 1 "$TMP/bench-sock" 2> "$D/$tag.log"; then
        fail "$tag: config rejected"; tail_log "$D/$tag.log"; return
    fi
    if [ -n "$gemm" ]; then
        sed -i "s|^  backend: .*|&\n  gemm: $gemm|" "$cfg"
        grep -q "^  gemm: $gemm\$" "$cfg" || { fail "$tag: gemm not set"; return; }
    fi
    local cmd=("$BIN/moe-bench")
    if [ "$np" -gt 1 ]; then
        # the same total tokens as the 1-rank run: T/np per rank
        tokens=$(echo "$TOKENS" | tr ',' '\n' | awk -v n="$np" '{t=int($1/n); if (t<1) t=1; print t}' |
            awk '!seen[$0]++' | paste -sd,)
        cmd=("${MPIRUN[@]}" -np "$np" -x OMP_NUM_THREADS=$((NCPU / np > 0 ? NCPU / np : 1)) "$BIN/moe-bench")
    fi
    local start rc
    start=$(date +%s)
    timeout --kill-after=15 "${MOED_GPU_TEST_BENCH_S:-420}" "${cmd[@]}" --config "$cfg" \
        --tokens "$tokens" --iters "$ITERS" --json > "$json" 2> "$D/$tag.log"
    rc=$?
    if [ $rc = 0 ] && "$PYTHON" -c 'import json,sys; json.load(open(sys.argv[1]))' "$json" 2>> "$D/$tag.log"; then
        pass "$tag (backend $BACKEND, tokens/rank $tokens, $(($(date +%s) - start))s)"
    else
        fail "$tag: exit $rc (log: detail/$tag.log)"
        tail_log "$D/$tag.log"
        tail_log "$json" 5
    fi
}

report() {
    "$PYTHON" - "$D" "$LOGDIR" "$BACKEND" << 'EOF'
import glob, json, os, sys
d, logdir, backend = sys.argv[1:4]
def load(path):
    try:
        with open(path) as f:
            text = f.read()
        return json.JSONDecoder().raw_decode(text.lstrip())[0]
    except Exception:
        return None
moed = {}
for path in sorted(glob.glob(os.path.join(d, "moed-*-np*.json"))):
    shape, np_ = os.path.basename(path)[5:-5].rsplit("-np", 1)
    doc = load(path)
    if doc:
        moed[(shape, int(np_))] = {r["tokens_total"]: r["ms_per_layer"] for r in doc.get("results", [])}
peer = load(os.path.join(d, "peer.json")) or {}
device = peer.get("device") or os.popen("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null").read().strip().split("\n")[0]
bw = 4.3e12 if "H200" in device else 3.0e12
shapes = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}
peers = {s.get("name"): s for s in peer.get("shapes", [])}
lines = [f"moed ({backend}) vs PyTorch peers, ms per layer, {device or 'no GPU'}; "
         f"roofline max(used expert bytes / {bw:.1e} B/s, flops / 790e12)",
         f"{'shape':<8} {'T':>6} {'moed 1r':>9} {'moed 2r':>9} {'peer':>9} {'peer/moed':>9} "
         f"{'roofline':>9} {'roof/moed':>9}  best peer"]
rows = []
for name, (h, i, e, k) in shapes.items():
    tokens = sorted(set(moed.get((name, 1), {})) | {int(t) for t in peers.get(name, {}).get("best", {})})
    for t in tokens:
        m1 = moed.get((name, 1), {}).get(t)
        m2 = moed.get((name, 2), {}).get(t)
        best = peers.get(name, {}).get("best", {}).get(str(t))
        p = best["ms"] if best else None
        used = e * (1 - (1 - k / e) ** t)
        roof = max(used * 3 * h * i * 2 / bw, 2.0 * t * k * 3 * h * i / 790e12) * 1e3
        f = lambda v, fmt="{:9.3f}": fmt.format(v) if v is not None else f"{'-':>9}"
        lines.append(f"{name:<8} {t:>6} {f(m1)} {f(m2)} {f(p)} "
                     f"{f(p / m1 if p and m1 else None, '{:8.2f}x')} {f(roof)} "
                     f"{f(roof / m1 * 100 if m1 else None, '{:8.0f}%')}  {best['variant'] if best else '-'}")
        rows.append({"shape": name, "tokens": t, "moed_1rank_ms": m1, "moed_2rank_ms": m2,
                     "peer_best_ms": p, "peer_best_variant": best["variant"] if best else None,
                     "roofline_ms": roof})
gemm = {}
for path in sorted(glob.glob(os.path.join(d, "gemm-*.json"))):
    shape, impl = os.path.basename(path)[5:-5].rsplit("-", 1)
    doc = load(path)
    if doc:
        gemm[(shape, impl)] = {r["tokens_total"]: r["ms_per_layer"] for r in doc.get("results", [])}
if gemm:
    impls = sorted({i for _, i in gemm})
    lines.append("")
    lines.append("moe.gemm, ms per layer (1 rank): " + ", ".join(impls) + ", auto (the autotuner's table below)")
    lines.append(f"{'shape':<8} {'T':>6} " + " ".join(f"{i:>9}" for i in impls) + f" {'auto':>9}")
    for name in shapes:
        for t in sorted(moed.get((name, 1), {})):
            vals = [gemm.get((name, i), {}).get(t) for i in impls] + [moed.get((name, 1), {}).get(t)]
            lines.append(f"{name:<8} {t:>6} " + " ".join(f"{v:9.3f}" if v is not None else f"{'-':>9}" for v in vals))
            rows.append({"shape": name, "tokens": t, "gemm_ms": dict(zip(impls + ["auto"], vals))})
    for name in shapes:
        doc = load(os.path.join(d, f"moed-{name}-np1.json"))
        if doc and doc.get("gemm"):
            lines.append(f"{name} autotuner: {doc['gemm']}")
text = "\n".join(lines)
print(text)
with open(os.path.join(logdir, "summary.txt"), "w") as f:
    f.write(text + "\n")
results = []
if os.path.exists(os.path.join(d, "results.txt")):
    results = [l.rstrip("\n") for l in open(os.path.join(d, "results.txt"))]
with open(os.path.join(logdir, "results.json"), "w") as f:
    json.dump({"device": device, "backend": backend, "checks": results, "table": rows,
               "moed": {f"{s}-np{n}": v for (s, n), v in moed.items()}, "peer": peer}, f, indent=1)
EOF
}

main() {
    echo "$BASHPID" > "$TMP.pid"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    echo "moed GPU tests: $(date -u +%FT%TZ), $(hostname), backend $BACKEND, tokens $TOKENS, iters $ITERS, steps $STEPS"
    echo "bin: $BIN; logs: $LOGDIR; GPUs: $NGPU; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

    if want info; then
        echo "== info"
        if [ "$NGPU" -gt 0 ]; then nvidia-smi -L; else echo "nvidia-smi: no GPU found"; fi
        if [ -n "$NVCC" ]; then "$NVCC" --version | tail -n 2; else echo "nvcc: not found"; fi
        command -v mpirun > /dev/null && mpirun --version 2>&1 | head -n 1
        "$PYTHON" -c 'import sys; print("python", sys.version.split()[0])' 2>&1
        "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>&1 | tail -n 1
        local f bad=0
        for f in "$BIN"/* "$TBIN"/*; do
            if [ ! -f "$f" ] || [ ! -x "$f" ]; then continue; fi
            if ldd "$f" 2>&1 | grep -q 'not found'; then
                echo "  $f: $(ldd "$f" | grep 'not found' | awk '{print $1}' | tr '\n' ' ')"
                bad=1
            fi
        done
        ldd "$BIN/moed" > "$D/ldd-moed.txt" 2>&1
        if [ $bad = 0 ]; then pass "libraries: every binary's libraries resolve (ldd)"; else fail "libraries: unresolved (above)"; fi
    fi

    if want kernel; then
        echo "== kernel tests"
        if [ -x "$TBIN/cuda_layer" ]; then
            run_check kernel-cuda_layer "${MOED_GPU_TEST_KERNEL_S:-600}" "$TBIN/cuda_layer"
            if [ -n "$SANITIZER" ]; then
                MOE_CUDA_LAYER_QUICK=1 run_check kernel-cuda_layer-memcheck "${MOED_GPU_TEST_SANITIZER_S:-900}" "$SANITIZER" \
                    --tool memcheck --leak-check full --error-exitcode 1 --target-processes all "$TBIN/cuda_layer"
            else
                skip "kernel-cuda_layer-memcheck: compute-sanitizer not found"
            fi
            # two ranks: the NCCL exchanges, entries of other ranks, the exact
            # combine's bit-identical swap across GPUs
            if [ $NP2 = 1 ]; then
                run_check kernel-cuda_layer-np2 "${MOED_GPU_TEST_KERNEL_S:-600}" "${MPIRUN[@]}" -np 2 "$TBIN/cuda_layer"
                # NCCL's communicator setup probes kernel images with
                # cudaFuncGetAttributes and expects "no kernel image" for
                # some: API errors are not reported here (moed checks its own)
                if [ -n "$SANITIZER" ]; then
                    run_check kernel-cuda_layer-np2-memcheck "${MOED_GPU_TEST_SANITIZER_S:-900}" "${MPIRUN[@]}" -np 2 \
                        -x MOE_CUDA_LAYER_QUICK=1 "$SANITIZER" --tool memcheck --leak-check full --report-api-errors no \
                        --error-exitcode 1 "$TBIN/cuda_layer"
                fi
            else
                skip "kernel-cuda_layer-np2: fewer than 2 GPUs"
            fi
        elif [ "$BACKEND" = cuda ] && [ "$NGPU" -gt 0 ]; then
            fail "kernel-cuda_layer: $TBIN/cuda_layer missing (bundle not built with CUDA=1?)"
        else
            skip "kernel-cuda_layer: no $TBIN/cuda_layer and no GPU"
        fi
    fi

    if want daemon; then
        echo "== daemons ($BACKEND vs cpu)"
        daemon_compare tiny 1 64 32 8 2 2
        if [ $NP2 = 1 ]; then daemon_compare tiny 2 64 32 8 2 2; else skip "daemon-tiny-np2: fewer than 2 GPUs"; fi
        # one rank is always balanced (no placement would be adopted): the
        # migration itself is covered by cuda_layer on one GPU
        if [ $NP2 = 1 ]; then EPLB=1 daemon_compare tiny-eplb 2 64 32 8 2 2 zipf
        else skip "daemon-tiny-eplb-np2: fewer than 2 GPUs (cuda_layer covers migration on one)"; fi
        if [ $QUICK = 0 ]; then daemon_compare qwen3-1layer 1 2048 768 128 8 1 perfect; fi
    fi

    if want bench; then
        echo "== moe-bench ($BACKEND)"
        bench qwen3 1 2048 768 128 8
        bench mixtral 1 4096 14336 8 2
        local gemm
        for gemm in $(echo "${MOED_GPU_TEST_GEMMS-cublas,grouped}" | tr ',' ' '); do
            bench qwen3 1 2048 768 128 8 "$gemm"
            bench mixtral 1 4096 14336 8 2 "$gemm"
        done
        if [ $NP2 = 1 ]; then
            bench qwen3 2 2048 768 128 8
            bench mixtral 2 4096 14336 8 2
        else
            skip "bench np2: fewer than 2 GPUs"
        fi
    fi

    if want peer; then
        echo "== PyTorch peers"
        if ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' > "$D/peer-probe.log" 2>&1; then
            if [ "$NGPU" -gt 0 ]; then
                fail "peer: $PYTHON has no torch with CUDA: $(tail -n 1 "$D/peer-probe.log")"
            else
                skip "peer: no torch with CUDA here ($(tail -n 1 "$D/peer-probe.log"))"
            fi
        else
            PYTHONUNBUFFERED=1 run_check peer-self-check 300 "$PYTHON" "$ROOT/scripts/peer_torch.py" --self-check
            grep -E '^(PASS|FAIL|INFO)' "$D/peer-self-check.log" | sed 's/^/    /'
            PYTHONUNBUFFERED=1 run_check peer-bench "${MOED_GPU_TEST_PEER_S:-540}" "$PYTHON" \
                "$ROOT/scripts/peer_torch.py" --shape qwen3 --shape mixtral --tokens "$TOKENS" \
                --iters "$ITERS" --json "$D/peer.json"
            sed -n '/^qwen3:/,$p' "$D/peer-bench.log"
        fi
    fi

    echo "== summary"
    if [ -f "$D/moed-qwen3-np1.json" ] || [ -f "$D/peer.json" ]; then
        report || echo "(report failed)"
    else
        report > /dev/null 2>&1
    fi
    if [ -n "${OUT:-}" ]; then
        tar -czf "$LOGDIR/gpu-test-detail.tar.gz" -C "$LOGDIR" detail && rm -rf "$D"
        echo "details: $LOGDIR/gpu-test-detail.tar.gz"
    fi
    [ "$NSKIP" -gt 0 ] && echo "$NSKIP skipped"
    echo "$NPASS passed, $NFAIL failed"
    local rc=0
    [ "$NFAIL" = 0 ] || rc=1
    echo "$rc" > "$TMP.rc"
    return $rc
}

# On INT/TERM: TERM main's whole process tree (main, mpirun, ranks, timeout,
# moe-bench, python), by id; main's own trap then stops its daemons and
# cleans up; KILL whatever is left after 10 s.
# shellcheck disable=SC2317 # called from on_signal
tree() {
    local p=$1 c
    echo "$p"
    for c in $(pgrep -P "$p" 2>/dev/null); do tree "$c"; done
}
# shellcheck disable=SC2317 # called by the INT/TERM trap
on_signal() {
    local main_pid all
    main_pid=$(cat "$TMP.pid" 2>/dev/null)
    if [ -n "$main_pid" ]; then
        all=$(tree "$main_pid" | tr '\n' ' ')
        echo "gpu-test.sh: interrupted; stopping $all" >&2
        # shellcheck disable=SC2086
        kill -TERM $all 2>/dev/null
        for _ in $(seq 50); do kill -0 "$main_pid" 2>/dev/null || break; sleep 0.2; done
        # shellcheck disable=SC2086
        kill -KILL $all 2>/dev/null
    fi
    wait
    rm -rf "$TMP" "$TMP.pid" "$TMP.rc"
    exit 130
}
# The pipeline runs in the background so that a signal reaches on_signal at
# once (bash runs traps only after a foreground command ends).
main 2>&1 | tee "$LOGDIR/gpu-test.log" &
PIPE=$!
trap on_signal INT TERM
while kill -0 "$PIPE" 2>/dev/null; do wait "$PIPE"; done
RC=$(cat "$TMP.rc" 2>/dev/null || echo 1)
rm -f "$TMP.pid" "$TMP.rc"
exit "$RC"
