#!/usr/bin/env bash
# Builds every fuzz target once, with libFuzzer's coverage instrumentation, on
# the pinned stable toolchain, then runs each for SECONDS (default 30) one after
# another. A crash fails the script and leaves its input in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# The flags are those `cargo fuzz build -s none` passes (no sanitizer, so no
# nightly toolchain and no cargo-fuzz install): sancov instrumentation, the
# `fuzzing` cfg, debug assertions and overflow checks. --target keeps build
# scripts and proc macros uninstrumented. Corpora grow in fuzz/corpus/<target>/
# (not committed), seeded from fuzz/seeds/<target>/ where there is one. Not
# --locked: fuzz/Cargo.lock follows the workspace's lock as the agent gains deps.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-30}"
shift || true
targets=("$@")
if (( ${#targets[@]} == 0 )); then
    targets=(state_file mqtt_payloads apps_toml oci_layout layer_tar refs_json shim_files rollout_record cert_validity)
fi
host="$(rustc -vV | sed -n 's/^host: //p')"
flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    -Cllvm-args=-sanitizer-coverage-stack-depth
    --cfg fuzzing
    -Cdebug-assertions
    -Coverflow-checks
)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTFLAGS="${flags[*]}" cargo build --release -q --target "$host" "${bins[@]}"

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [[ -d "seeds/$t" ]] && seeds=("seeds/$t")
    echo "fuzz: $t for ${secs}s"
    "target/$host/release/$t" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" "corpus/$t" "${seeds[@]}" 2>"artifacts/$t.log" \
        || { tail -n 40 "artifacts/$t.log"; echo "fuzz: $t failed"; exit 1; }
    grep -E "^stat::number_of_executed_units" "artifacts/$t.log" | sed "s/^/fuzz: $t: /"
done
