#!/usr/bin/env bash
# All of skiff's checks and tests: formatting, lints, unit tests, and the
# end-to-end tests against real containers, a real mosquitto and a real QEMU
# ARM board. Installs what it needs. Run as root (containers need it).
set -euo pipefail
cd "$(dirname "$0")"

scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
# Licenses, sources and duplicate crates (deny.toml); advisories need GitHub (README "CI").
cargo deny --log-level error check bans licenses sources
bash images/build.sh
cargo build --workspace -q
# The static board binaries: aarch64 (also the emulated board's, which the QEMU
# tests would build too) and 32-bit armv7, and the static amd64 one for the amd64 .deb;
# the packages of all three (the packaging tests build amd64 and arm64 again, as they test).
bash cross/build.sh aarch64 armv7 x86_64
bash packaging/build-deb.sh amd64 arm64 armhf
cargo test --workspace -- --test-threads=2
# Every fuzz target, built once, 30 s each.
fuzz/run.sh 30
