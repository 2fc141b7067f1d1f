#!/usr/bin/env bash
# `make dist`: a relocatable bundle of moed for a machine that has the CUDA
# driver/toolkit, NCCL and OpenMPI but not our other libraries (the lent GPU
# machines: Ubuntu 24.04, nothing installable there).
#
#   dist/moed/bin/         moed, moectl, moe-bench
#   dist/moed/bin/tests/   the test binaries of build/tests/ that exist
#   dist/moed/lib/         libuv, libyaml, libcjson, libgomp, libcriterion and
#                          everything those need that the target may lack
#   dist/moed/config/      moed.example.yaml and examples/
#   dist/moed/scripts/     gpu-test.sh, peer_torch.py, eplb_bench.sh, serve_bench.sh (+ bench_env.sh)
#
# Every binary gets RUNPATH $ORIGIN/../lib (bin/tests/*: $ORIGIN/../../lib;
# then any absolute entry it had and /usr/local/cuda/lib64) and
# every bundled library RUNPATH $ORIGIN, so that the libraries those libraries
# need are found beside them too (DT_RUNPATH is not inherited).
#
# Not bundled, taken from the target: glibc (libc, libm, libpthread, libdl,
# librt, libresolv, libutil, ld-linux), libgcc_s, libstdc++, the CUDA libraries
# (libcuda, libcudart, libcublas*, libnv*, ...), NCCL, and OpenMPI (libmpi and
# libopen-rte/libopen-pal with their hwloc/libevent dependencies; we do not
# descend into them). OpenMPI ABI: these binaries link Debian 12's OpenMPI 4.1
# (libmpi.so.40); Ubuntu 24.04's openmpi is 4.1.6, also libmpi.so.40, and 4.1.x
# keeps the ABI, so the target's libmpi and its `mpirun` are the ones to use.
# Bundling MPI would pair our libmpi with the target's orted/PMIx: don't.
#
# Environment: BUILD (default build), DIST (default dist/moed), MAKE (make),
# JOBS; CUDA/CUDA_ARCH pass through the environment to the sub-make.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
DIST=${DIST:-dist/moed}
MAKE=${MAKE:-make}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

command -v patchelf > /dev/null || {
    echo "dist.sh: patchelf is needed (apt-get install patchelf)" >&2
    exit 1
}

echo "== building ($MAKE -j$JOBS all BUILD=$BUILD${CUDA:+ CUDA=$CUDA})"
"$MAKE" -j"$JOBS" all BUILD="$BUILD"

rm -rf "$DIST"
mkdir -p "$DIST/bin/tests" "$DIST/lib" "$DIST/config/examples" "$DIST/scripts"

bins=()
for b in moed moectl moe-bench; do
    [ -x "$BUILD/bin/$b" ] || { echo "dist.sh: $BUILD/bin/$b missing" >&2; exit 1; }
    cp "$BUILD/bin/$b" "$DIST/bin/"
    bins+=("$DIST/bin/$b")
done
tests=()
for t in "$BUILD"/tests/*; do
    if [ ! -f "$t" ] || [ ! -x "$t" ]; then continue; fi
    cp "$t" "$DIST/bin/tests/"
    tests+=("$DIST/bin/tests/$(basename "$t")")
done

# Sonames that the target provides (see the header); matched on the soname.
excluded() {
    case "$1" in
        linux-vdso.so* | linux-gate.so* | ld-linux*.so* | ld64.so*) return 0 ;;
        libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.*) return 0 ;;
        libresolv.so.* | libutil.so.* | libanl.so.* | libnsl.so.* | libnss_*.so.*) return 0 ;;
        libmvec.so.* | libBrokenLocale.so.* | libthread_db.so.* | libcrypt.so.*) return 0 ;;
        libgcc_s.so.* | libstdc++.so.* | libatomic.so.*) return 0 ;;
        libcuda.so.* | libcudart.so.* | libcublas*.so.* | libcufft*.so.* | libcurand.so.*) return 0 ;;
        libcusparse*.so.* | libcusolver*.so.* | libnv*.so.* | libnccl*.so.*) return 0 ;;
        libmpi*.so.* | libopen-rte.so.* | libopen-pal.so.* | libmca_*.so.* | libompitrace.so.*) return 0 ;;
        libpmix.so.* | libprrte.so.* | liboshmem.so.*) return 0 ;;
    esac
    return 1
}

declare -A seen=()
# bundle FILE: copy what FILE needs (not excluded) into lib/, recursively.
# ldd of FILE resolves every name on this machine; DT_NEEDED tells which are
# FILE's own, so that we do not descend into excluded libraries.
bundle() {
    local file=$1 name path
    declare -A where=()
    while read -r name _ path _; do
        [ -n "${path:-}" ] && [ "${path:0:1}" = / ] && where[$name]=$path
    done < <(ldd "$file" 2>/dev/null | grep '=>')
    for name in $(patchelf --print-needed "$file"); do
        excluded "$name" && continue
        [ -n "${seen[$name]:-}" ] && continue
        path=${where[$name]:-}
        if [ -z "$path" ]; then
            echo "dist.sh: $file needs $name, which does not resolve here" >&2
            exit 1
        fi
        seen[$name]=1
        cp -L "$path" "$DIST/lib/$name"
        chmod u+w "$DIST/lib/$name"
        bundle "$DIST/lib/$name"
    done
}
for f in "${bins[@]}" "${tests[@]}"; do bundle "$f"; done

# set_rpath FILE FIRST: RUNPATH = FIRST, then the absolute entries FILE had
# (a -Wl,-rpath the CUDA link may have set), then the usual CUDA folder, so
# that libcudart/libcublas resolve on a host whose ld.so.conf lacks it.
set_rpath() {
    local file=$1 rp=$2 old entry entries
    old=$(patchelf --print-rpath "$file")
    IFS=: read -r -a entries <<< "$old:/usr/local/cuda/lib64"
    for entry in "${entries[@]}"; do
        case "$entry" in
            /*) case ":$rp:" in *":$entry:"*) ;; *) rp="$rp:$entry" ;; esac ;;
        esac
    done
    patchelf --set-rpath "$rp" "$file"
}
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader
for f in "$DIST"/lib/*; do patchelf --set-rpath '$ORIGIN' "$f"; done
# shellcheck disable=SC2016
for f in "${bins[@]}"; do set_rpath "$f" '$ORIGIN/../lib'; done
# shellcheck disable=SC2016
for f in "${tests[@]}"; do set_rpath "$f" '$ORIGIN/../../lib'; done

cp config/moed.example.yaml "$DIST/config/"
cp config/examples/*.yaml "$DIST/config/examples/"
for s in gpu-test.sh peer_torch.py bench_env.sh eplb_bench.sh serve_bench.sh; do
    if [ -f "scripts/$s" ]; then cp "scripts/$s" "$DIST/scripts/"; fi
done
chmod +x "$DIST"/scripts/* 2>/dev/null || true

cuda_hits=$(strings "$DIST/bin/moed" | grep -c -E 'cudaMalloc|cublasCreate|libcudart' || true)
cuda_state="CPU-only build"
[ "${cuda_hits:-0}" -gt 0 ] && cuda_state="CUDA build"
cat > "$DIST/README" << EOF
moed bundle ($cuda_state, built $(date -u +%Y-%m-%dT%H:%MZ) on $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)).
bin/ finds its libraries in lib/ (RUNPATH \$ORIGIN/../lib); glibc, CUDA, NCCL and OpenMPI 4.1 (libmpi.so.40) come from the host.
Run from this folder:  mpirun --allow-run-as-root --bind-to none -np N -x NCCL_NVLS_ENABLE=0 bin/moed --config config/examples/tiny-cpu.yaml
GPU checks:            bash scripts/gpu-test.sh [--quick]   (logs to \$OUT or ./gpu-test-logs)
EOF

echo "== dist: $DIST"
missing=0
for f in "${bins[@]}" "${tests[@]}"; do
    if ldd "$f" | grep -q 'not found'; then
        echo "dist.sh: $f has unresolved libraries:" >&2
        ldd "$f" | grep 'not found' >&2
        missing=1
    fi
done
echo "   lib/: $(find "$DIST/lib" -type f -printf '%f\n' | sort | tr '\n' ' ')"
echo "   bin/tests/: ${#tests[@]} test binaries"
echo "   size: $(du -sh "$DIST" | cut -f1) ($(du -sb "$DIST" | cut -f1) bytes)"
echo "   moed resolves: $(ldd "$DIST/bin/moed" | grep -E 'libuv|libyaml|libcjson' | awk '{print $3}' | tr '\n' ' ')"
exit "$missing"
