#!/usr/bin/env bash
# Static release builds of `skiff` and `skiffctl` for the boards.
#
#   cross/build.sh [TARGET...]
#
# TARGET is aarch64-unknown-linux-musl (64-bit Raspberry Pi OS, musl, linked by rust-lld),
# armv7-unknown-linux-gnueabihf (32-bit Raspberry Pi OS, static glibc, linked by Debian's
# arm-linux-gnueabihf-gcc) or x86_64-unknown-linux-gnu (amd64 machines and the amd64 .deb,
# static glibc); the short forms `aarch64`, `armv7` and `x86_64` work too. With no TARGET,
# the two board targets are built. Binaries land in <target dir>/cross/<target>/, and the script prints each
# one's size and `file` line, failing if a binary is not statically linked.
#
# Installs what it needs (rustup targets; apt: musl-dev:arm64, which pulls
# gcc-aarch64-linux-gnu, for the C inside aws-lc-sys and ring; gcc-arm-linux-gnueabihf
# libc6-dev-armhf-cross; file) and skips what is there, so a second run costs an incremental
# cargo build. Builds use the workspace's target dir, sharing artifacts with other builds.
set -euo pipefail

# Run from `cargo test` (the QEMU tests call this), cargo's per-crate variables
# leak in and make crates such as ring rebuild from scratch (their build scripts
# watch them): start from a clean slate, keeping the user's own settings.
for v in $(compgen -e | grep -E '^CARGO_' | grep -vE '^CARGO_(HOME|TARGET_DIR|BUILD_JOBS|NET_.*|REGISTRIES_.*|HTTP_.*)$'); do
    unset "$v"
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac

BINS=(skiff skiffctl)
PACKAGES=(-p skiff-agent -p skiff-controller)

log() { printf '[cross/build] %s\n' "$*" >&2; }
die() { printf '[cross/build] error: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
    # Installs the packages given that are not installed yet.
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "need root to install: ${missing[*]}"
    log "apt: installing ${missing[*]}"
    if [ "$apt_updated" -eq 0 ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
}

ensure_arm64_arch() {
    dpkg --print-foreign-architectures | grep -x arm64 >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || die "need root to add the arm64 dpkg architecture"
    log "dpkg: adding the arm64 architecture"
    dpkg --add-architecture arm64
    apt_updated=0  # the new architecture needs its package lists
}

rustup_target() {
    # `rustup target list --installed` reads the toolchain pinned by rust-toolchain.toml.
    # (grep without -q: an early exit would SIGPIPE rustup and fail the pipe under pipefail)
    rustup target list --installed | grep -x "$1" >/dev/null && return 0
    log "rustup: adding target $1"
    rustup target add "$1" >&2
}

build_aarch64_musl() {
    local t=aarch64-unknown-linux-musl
    ensure_arm64_arch
    # Crates with C inside (aws-lc-sys and ring under rustls, nc) need a C compiler for the
    # target: Debian's musl-dev:arm64 brings `aarch64-linux-musl-gcc` (gcc-aarch64-linux-gnu
    # with musl's headers), the name the cc crate looks for. Linking stays with rust-lld and
    # the musl crt objects and libc.a that ship with the Rust target.
    apt_install musl-dev:arm64
    rustup_target "$t"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
        cargo build --release --target "$t" "${PACKAGES[@]}"
}

# libcontainer 0.7.0 does not compile for 32-bit targets (it compares rlim_t, ino_t and
# fs_type_t with 64-bit constants). Until the workspace patches it (a [patch.crates-io] in
# Cargo.toml) or upstream fixes it, armv7 builds from a shadow workspace under
# target/cross/armv7-ws: symlinks to this one's crates, a copy of Cargo.toml with a
# [patch.crates-io] pointing at libcontainer with cross/patches/libcontainer-0.7.0-32bit.patch
# applied, and its own copy of Cargo.lock, so the real Cargo.toml and Cargo.lock are never
# touched. Echoes the directory to build in.
armv7_workspace() {
    local lc shadow e crate
    lc=$(awk '/^name = "libcontainer"$/ { f = 1 } f && /^$/ { exit } f' "$ROOT/Cargo.lock")
    case "$lc" in
        *'version = "0.7.0"'*'source = "registry+'*) ;;
        *) echo "$ROOT"; return 0 ;; # patched already, or another version: build as is
    esac
    command -v patch >/dev/null || apt_install patch
    local cache="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
    crate=$(find "$cache" -name libcontainer-0.7.0.crate -print -quit 2>/dev/null || true)
    if [ -z "$crate" ]; then
        cargo fetch --manifest-path "$ROOT/Cargo.toml" >&2
        crate=$(find "$cache" -name libcontainer-0.7.0.crate -print -quit)
    fi
    [ -n "$crate" ] || die "libcontainer-0.7.0.crate not in $cache after cargo fetch"
    shadow="$TARGET_DIR/cross/armv7-ws"
    local patched="$TARGET_DIR/cross/libcontainer-0.7.0-32bit"
    local stamp
    stamp=$(sha256sum "$crate" "$ROOT/cross/patches/libcontainer-0.7.0-32bit.patch" | sha256sum | cut -c1-16)
    if [ "$(cat "$patched/.stamp" 2>/dev/null)" != "$stamp" ]; then
        log "patching libcontainer 0.7.0 for 32-bit targets"
        rm -rf "$patched" "$patched.tmp"
        mkdir -p "$patched.tmp"
        tar -xzf "$crate" -C "$patched.tmp" --strip-components=1
        patch -s -p1 -d "$patched.tmp" <"$ROOT/cross/patches/libcontainer-0.7.0-32bit.patch" >&2
        echo "$stamp" >"$patched.tmp/.stamp"
        mv "$patched.tmp" "$patched"
    fi
    mkdir -p "$shadow"
    for e in "$ROOT"/* "$ROOT"/.cargo; do
        [ -e "$e" ] || continue
        case "${e##*/}" in Cargo.toml | Cargo.lock | target) continue ;; esac
        ln -sfn "$e" "$shadow/${e##*/}"
    done
    if grep -q '^\[patch\.crates-io\]' "$ROOT/Cargo.toml"; then
        sed "/^\[patch\.crates-io\]/a libcontainer = { path = \"$patched\" }" "$ROOT/Cargo.toml" >"$shadow/Cargo.toml"
    else
        { cat "$ROOT/Cargo.toml"; printf '\n[patch.crates-io]\nlibcontainer = { path = "%s" }\n' "$patched"; } >"$shadow/Cargo.toml"
    fi
    cp "$ROOT/Cargo.lock" "$shadow/Cargo.lock"
    log "armv7: building in $shadow (libcontainer patched for 32-bit)"
    echo "$shadow"
}

build_armv7_gnueabihf() {
    local t=armv7-unknown-linux-gnueabihf ws
    apt_install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
    rustup_target "$t"
    ws=$(armv7_workspace)
    # Static glibc: Raspberry Pi OS releases differ in glibc version, a static binary runs
    # on all of them. CC_* is for crates that build C (the cc crate).
    (
        cd "$ws"
        CARGO_TARGET_DIR="$TARGET_DIR" \
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc \
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUSTFLAGS="-C target-feature=+crt-static" \
        CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc \
        AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar \
            cargo build --release --target "$t" "${PACKAGES[@]}"
    )
}

build_x86_64_static() {
    # Static glibc (static-pie) with the host's own gcc; --target keeps the flag off build scripts.
    local t=x86_64-unknown-linux-gnu
    rustup_target "$t"
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target "$t" "${PACKAGES[@]}"
}

collect() {
    # Copies the binaries of target $1 to target/cross/$1/ and reports on them.
    local t="$1" out="$TARGET_DIR/cross/$1" b desc size
    mkdir -p "$out"
    for b in "${BINS[@]}"; do
        [ -f "$TARGET_DIR/$t/release/$b" ] || die "cargo produced no $TARGET_DIR/$t/release/$b"
        # cp to a temp name and rename: a QEMU run reading the old binary never sees half a file.
        cp "$TARGET_DIR/$t/release/$b" "$out/.$b.tmp"
        mv -f "$out/.$b.tmp" "$out/$b"
        size=$(stat -c %s "$out/$b")
        desc=$(file -b "$out/$b")
        printf '%-32s %-9s %10d bytes (%s MiB)  %s\n' "$t" "$b" "$size" \
            "$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')" "$desc"
        case "$desc" in
            *"statically linked"* | *"static-pie linked"*) ;;
            *) die "$out/$b is not statically linked: $desc" ;;
        esac
        case "$desc" in *"not stripped"*) die "$out/$b is not stripped: $desc" ;; esac
    done
}

targets=()
for a in "$@"; do
    case "$a" in
        aarch64 | aarch64-unknown-linux-musl) targets+=(aarch64-unknown-linux-musl) ;;
        armv7 | armhf | armv7-unknown-linux-gnueabihf) targets+=(armv7-unknown-linux-gnueabihf) ;;
        x86_64 | amd64 | x86_64-unknown-linux-gnu) targets+=(x86_64-unknown-linux-gnu) ;;
        -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown target '$a' (aarch64-unknown-linux-musl | armv7-unknown-linux-gnueabihf | x86_64-unknown-linux-gnu)" ;;
    esac
done
[ "${#targets[@]}" -gt 0 ] || targets=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)

command -v cargo >/dev/null || die "cargo not found (install rustup)"
command -v rustup >/dev/null || die "rustup not found: it adds the cross targets"
command -v file >/dev/null || apt_install file

for t in "${targets[@]}"; do
    log "building $t"
    case "$t" in
        aarch64-unknown-linux-musl) build_aarch64_musl ;;
        armv7-unknown-linux-gnueabihf) build_armv7_gnueabihf ;;
        x86_64-unknown-linux-gnu) build_x86_64_static ;;
    esac
done
for t in "${targets[@]}"; do
    collect "$t"
done
