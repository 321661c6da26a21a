#!/usr/bin/env bash
# Installs what skiff's build, demo and tests need on a Debian machine, and
# nothing when it is all there already. Usage: scripts/deps.sh [demo|test]
set -euo pipefail

what="${1:-test}"
pkgs=(busybox-static runc file)
if [[ "$what" == test ]]; then
    pkgs+=(mosquitto mosquitto-clients openssl qemu-system-arm qemu-utils e2fsprogs cpio
        gcc-arm-linux-gnueabihf libc6-dev-armhf-cross valgrind
        docker-registry skopeo systemd
        lintian mtools e2tools dosfstools fdisk)
fi

# Tests only: the arm64 busybox (test image) and kernel (QEMU board) come from Debian's
# arm64 archive. (The demo's image is the host's own architecture: images/build.sh.)
if [[ "$what" == test ]] && [[ "$(dpkg --print-architecture)" != arm64 ]] &&
    ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    need_update=1
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )) || [[ -n "${need_update:-}" ]]; then
    echo "scripts/deps.sh: installing ${missing[*]:-(package lists only)}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    if (( ${#missing[@]} )); then
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
    fi
fi

# The pinned toolchain (rust-toolchain.toml) with rustfmt and clippy.
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# cargo-deny for ./test.sh's dependency check, pinned (a build from crates.io,
# a few minutes once per machine).
CARGO_DENY_VERSION=0.20.2
if [[ "$what" == test ]] && [[ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]]; then
    echo "scripts/deps.sh: installing cargo-deny $CARGO_DENY_VERSION"
    cargo install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION"
fi
