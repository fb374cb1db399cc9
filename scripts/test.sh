#!/usr/bin/env bash
# `make test`'s runner: every test of the workspace, as `cargo test --workspace` would run
# them, but the lab's end-to-end test binaries (tests/tests/*.rs) TEST_JOBS at a time
# (default 2). They spend most of their time waiting (API servers starting, handshakes,
# failover timers), and each builds its own namespaces, API servers and name prefix, so
# two side by side do not meet (the lab runs tests concurrently within a binary too:
# `make e2e`); a few that measure behaviour under load run alone at the end. Each
# binary's output goes to a log, printed when it ends; every binary
# runs even after a failure, and the summary names each one with its duration.
#
# Usage: scripts/test.sh [CARGO_FLAGS...]
#        LAB_TESTS="wgspec mtu" scripts/test.sh   # only these lab binaries (and every other test)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
JOBS=${TEST_JOBS:-2}
logs=$(mktemp -d "${TMPDIR:-/tmp}/wiremesh-test.XXXXXX")
trap 'rm -rf "$logs"' EXIT

# Build every test target once; list (package, kind, name, executable).
"$CARGO" test "$@" --workspace --no-run --message-format=json-render-diagnostics \
    >"$logs/build.json"
jq -r --arg lab "$PWD/tests" 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
       | (.manifest_path | sub("/Cargo.toml$"; "")) as $dir
       | [(if $dir == $lab then "wiremesh-lab" else ($dir | sub(".*/"; "")) end),
          .target.kind[0], .target.name, .executable, $dir]
       | @tsv' "$logs/build.json" | sort -u >"$logs/targets.tsv"

# The lab binaries that take longest start first, so the last to end is a short one
# (by the durations of the last `make test`; the others follow by name).
slow_first="twocluster nat mcs failclosed hosts dualstack rotation liveness metrics controller
            k8s_harness meshctl dataplane deploy"
# Binaries that measure how the agent holds up under load of their own making (a
# handshake flood) or judge liveness on a tight clock (gateways taken for dead after 3 s
# of silence): they run alone, after the others, so a neighbour's load is not theirs.
solo="steering gateway"

run_one() { # NAME EXECUTABLE DIR: runs one test binary, its output to $logs/NAME.log
    local name=$1 exe=$2 dir=$3 t0=$SECONDS rc=0
    (cd "$dir" && "$exe" --test-threads=1) >"$logs/$name.log" 2>&1 || rc=$?
    echo "$name $rc $((SECONDS - t0))" >>"$logs/results"
    if [ "$rc" -eq 0 ]; then
        echo "test: $name passed in $((SECONDS - t0)) s"
    else
        echo "test: $name FAILED (exit $rc) in $((SECONDS - t0)) s; its output:"
        cat "$logs/$name.log"
    fi
}
export -f run_one
export logs

failed=0
# Unit tests, property tests and the API-server tests of every crate, one binary after
# another, as `cargo test` prints them.
while IFS=$'\t' read -r pkg kind name exe dir; do
    [ "$pkg" = wiremesh-lab ] && [ "$kind" = test ] && continue
    echo "test: $pkg $kind $name"
    (cd "$dir" && "$exe" --test-threads=1) || failed=1
done <"$logs/targets.tsv"
"$CARGO" test "$@" --workspace --doc -- --test-threads=1 || failed=1

# The lab, TEST_JOBS binaries at a time.
awk -F'\t' -v only=" ${LAB_TESTS:-} " '$1 == "wiremesh-lab" && $2 == "test" &&
    (only == "  " || index(only, " " $3 " ") > 0) { print $3 "\t" $4 "\t" $5 }' \
    "$logs/targets.tsv" >"$logs/lab.tsv"
{
    for name in $slow_first; do
        awk -F'\t' -v n="$name" '$1 == n' "$logs/lab.tsv"
    done
    awk -F'\t' -v known=" $(echo $slow_first $solo) " 'index(known, " " $1 " ") == 0' \
        "$logs/lab.tsv"
} >"$logs/lab-parallel.tsv"
for name in $solo; do
    awk -F'\t' -v n="$name" '$1 == n' "$logs/lab.tsv"
done >"$logs/lab-solo.tsv"
t0=$SECONDS
tr '\t' '\n' <"$logs/lab-parallel.tsv" |
    xargs -d '\n' -n 3 -P "$JOBS" bash -c 'run_one "$@"' _ || true
tr '\t' '\n' <"$logs/lab-solo.tsv" | xargs -d '\n' -n 3 -P 1 bash -c 'run_one "$@"' _ || true
echo "test: the lab's $(wc -l <"$logs/lab.tsv") binaries took $((SECONDS - t0)) s with $JOBS at a time"

lab_total=$(wc -l <"$logs/lab.tsv")
lab_ran=$(wc -l <"$logs/results" 2>/dev/null || echo 0)
if [ "$lab_ran" -ne "$lab_total" ]; then
    echo "test: only $lab_ran of $lab_total lab binaries reported" >&2
    failed=1
fi
if awk '$2 != 0 { bad = 1 } END { exit !bad }' "$logs/results" 2>/dev/null; then
    echo "test: failed lab binaries: $(awk '$2 != 0 { printf "%s ", $1 }' "$logs/results")" >&2
    failed=1
fi
sort -k3 -n -r "$logs/results" | awk '{ printf "test:   %-14s %s %4d s\n", $1, ($2 == 0 ? "ok  " : "FAIL"), $3 }'
exit "$failed"
