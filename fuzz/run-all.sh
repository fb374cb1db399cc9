#!/bin/sh
# Runs every fuzz target for FUZZ_SECONDS (default 300) each, one after the other. New
# inputs go to target/corpus/<target> (the committed corpus/<target> is read, not
# written); crashes go to artifacts/<target>/: add each to regressions/<target>/ with
# the fix.
set -eu
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-300}
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
for target in ${FUZZ_TARGETS:-inner_packet datagram uapi wgconf plan translate}; do
    mkdir -p "target/corpus/$target" "corpus/$target" "regressions/$target"
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run -a "$target" "target/corpus/$target" "corpus/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -max_len=70000 -timeout=10 -print_final_stats=1
done
