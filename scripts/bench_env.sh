# Sourced by the daemon benchmarks (eplb_bench.sh, serve_bench.sh) from the
# repository root or a dist bundle's root:  . scripts/bench_env.sh NAME
# Sets BUILD (a checkout's build/, or . in a bundle: bin/ at its root),
# mpirun as root, $dir (a scratch folder for the config, logs and sockets,
# removed at exit, when the daemon in $job is killed too) and $ctl (moectl
# on that folder's control and data sockets).
BUILD=${BUILD:-build}
[ -x "$BUILD/bin/moed" ] || BUILD=.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
dir=$(mktemp -d "/tmp/moed-$1.XXXXXX")
job=""
bench_cleanup() {
    [ -n "$job" ] && kill "$job" 2>/dev/null || true
    rm -rf "$dir"
}
trap bench_cleanup EXIT
ctl=("$BUILD/bin/moectl" --control "unix:$dir/control.sock" --data "unix:$dir/data-%r.sock")

# The config's model: a synthetic one-layer model of HIDDEN, INTER,
# EXPERTS and TOP_K (the caller's), routed by $1 (a YAML mapping).
model_yaml() {
    cat <<YAML
model:
  weights: {format: synthetic, seed: 3}
  layers: 1
  hidden: $HIDDEN
  moe_intermediate: $INTER
  experts: $EXPERTS
  top_k: $TOP_K
  routing: $1
YAML
}
