#!/usr/bin/env bash
# Runs every Criterion test binary given on the command line, the Python
# client's unittest suite and the README check, and prints one closing line
# "N passed, N failed" over all of them. Exit status 0 only when all passed.
set -u
BUILD=${BUILD:-build}
passed=0 failed=0 bad=()

count_criterion() { # $1 = binary
    local bin=$1 out rc line t p f
    echo "== $bin"
    out=$(timeout 900 "$bin" -j2 2>&1)
    rc=$?
    echo "$out" | grep -vE '^\[----\] Criterion v' | tail -n 40
    line=$(echo "$out" | grep -E 'Synthesis: Tested: [0-9]+' | tail -n 1)
    p=$(echo "$line" | sed -nE 's/.*Passing: ([0-9]+).*/\1/p')
    f=$(echo "$line" | sed -nE 's/.*Failing: ([0-9]+).*/\1/p')
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0}))
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
        bad+=("$bin (exit $rc)")
        [ "${f:-0}" -eq 0 ] && failed=$((failed + 1))
    fi
}

for bin in "$@"; do count_criterion "$bin"; done

if [ -d protocol/python ]; then
    echo "== python3 -m unittest (protocol/python)"
    out=$(cd protocol/python && MOED_BUILD="$PWD/../../$BUILD" timeout 600 python3 -m unittest discover -p 'test_*.py' 2>&1)
    rc=$?
    echo "$out" | tail -n 15
    ran=$(echo "$out" | sed -nE 's/^Ran ([0-9]+) tests?.*/\1/p' | tail -n 1)
    f=$(echo "$out" | sed -nE 's/^FAILED \((.*)\)/\1/p' | grep -oE '(failures|errors)=[0-9]+' | awk -F= '{n += $2} END {print n + 0}')
    f=${f:-0}
    if [ "$rc" -ne 0 ] || [ -z "$ran" ]; then
        bad+=("python unittest (exit $rc)")
        [ "$f" -eq 0 ] && f=1
    fi
    passed=$((passed + ${ran:-0} - f))
    failed=$((failed + f))
fi

echo "== README config reference matches the field table"
if diff <(sed -n '/<!-- config-reference:begin -->/,/<!-- config-reference:end -->/p' README.md | sed '1d;$d') \
        <("$BUILD/bin/moed" --print-config-reference) > /dev/null; then
    passed=$((passed + 1))
else
    echo "README.md's config reference is stale: regenerate it with '$BUILD/bin/moed --print-config-reference'"
    bad+=("README config reference")
    failed=$((failed + 1))
fi

echo
[ ${#bad[@]} -gt 0 ] && printf 'failed: %s\n' "${bad[@]}"
echo "$passed passed, $failed failed"
[ ${#bad[@]} -eq 0 ]
