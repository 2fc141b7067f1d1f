#!/usr/bin/env bash
# Runs every Criterion test binary given on the command line and prints one
# closing line "N passed, N failed" over all of them. Exit status 0 only when
# every binary passed.
set -u
passed=0 failed=0 bad=()
for bin in "$@"; do
    echo "== $bin"
    out=$(timeout 900 "$bin" -j2 2>&1)
    rc=$?
    echo "$out" | grep -vE '^\[----\] Criterion v' | tail -n 40
    line=$(echo "$out" | grep -E 'Synthesis: Tested: [0-9]+' | tail -n 1)
    t=$(echo "$line" | sed -nE 's/.*Tested: ([0-9]+).*/\1/p')
    p=$(echo "$line" | sed -nE 's/.*Passing: ([0-9]+).*/\1/p')
    f=$(echo "$line" | sed -nE 's/.*Failing: ([0-9]+).*/\1/p')
    c=$(echo "$line" | sed -nE 's/.*Crashing: ([0-9]+).*/\1/p')
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0}))
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
        bad+=("$bin (exit $rc)")
        [ "${f:-0}" -eq 0 ] && failed=$((failed + 1))
    fi
done
echo
[ ${#bad[@]} -gt 0 ] && printf 'failed: %s\n' "${bad[@]}"
echo "$passed passed, $failed failed"
[ ${#bad[@]} -eq 0 ]
