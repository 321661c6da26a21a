#!/usr/bin/env bash
# The main job on its embedded default: builds skiff and the bundled busybox
# image, loads it, applies examples/demo.toml and runs the agent in the
# foreground. No network and no broker needed. Ctrl-C stops the agent; the
# containers keep running (that is the point) until `./demo.sh stop`.
# Run as root. In another terminal: ./target/release/skiff ps
set -euo pipefail
cd "$(dirname "$0")"

skiff=./target/release/skiff
if [[ "${1:-}" == stop ]]; then
    "$skiff" apply -f examples/empty.toml
    # Containers outlive the agent: with none running, start one to remove them.
    if ! "$skiff" ps >/dev/null 2>&1; then
        "$skiff" agent 2>/dev/null &
        agent=$!
        trap 'kill $agent 2>/dev/null' EXIT
    fi
    for _ in $(seq 100); do
        if "$skiff" ps --json 2>/dev/null | grep -q '"apps": \[\]'; then
            echo "demo apps removed"
            exit 0
        fi
        sleep 0.2
    done
    echo "demo apps still running: see $skiff ps" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "demo.sh: cargo not found: install Rust with rustup (README, Prerequisites)" >&2; exit 1; }
scripts/deps.sh demo
bash images/build.sh
# The first build compiles every dependency: minutes on a laptop, 20-40 on a Raspberry Pi.
# cargo shows its progress bar on a terminal.
echo "demo.sh: building skiff (release)"
cargo build --release -p skiff-agent
"$skiff" doctor
"$skiff" image load images/out/busybox
"$skiff" apply -f examples/demo.toml
echo
echo "skiff agent is starting. In another terminal try:"
echo "  $skiff ps             # apps, pids, restarts, health"
echo "  $skiff logs ticker -f # an app's output"
echo "  curl -s 127.0.0.1:8080/ # the web app"
echo "Ctrl-C stops the agent (apps keep running); ./demo.sh stop removes the apps."
echo
exec "$skiff" agent
