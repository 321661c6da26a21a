#!/usr/bin/env bash
# Debian packages of skiff, built with dpkg-deb from the static binaries.
#
#   packaging/build-deb.sh [--out DIR] [--version V] [--bin-dir DIR] ARCH...
#
# ARCH is amd64, arm64 or armhf. For each, two packages land in DIR (default
# <target dir>/deb):
#   skiff_<V>_<ARCH>.deb     the board: /usr/bin/skiff, the systemd unit (enabled on
#                            install), /etc/skiff/agent.env (a conffile), the dirs
#   skiffctl_<V>_<ARCH>.deb  the operator's machine: /usr/bin/skiffctl
# skiffctl is a package of its own: a board needs only the agent, and the controller's
# tool (MQTT client, registry resolver) is 2+ MB a board would never run.
#
# Binaries come from <target dir>/cross/<triple>/ (cross/build.sh x86_64|aarch64|armv7,
# run here when they are missing), or from --bin-dir (one directory holding skiff and
# skiffctl for the single ARCH given). V defaults to the workspace version. The packages
# are reproducible: mtimes from SOURCE_DATE_EPOCH (default: the last commit's time), root
# owners. The binaries are static on purpose (one binary for every Raspberry Pi OS release):
# lintian's statically-linked-binary is overridden, with that reason.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac

log() { printf '[build-deb] %s\n' "$*" >&2; }
die() { printf '[build-deb] error: %s\n' "$*" >&2; exit 1; }

out="$TARGET_DIR/deb"
version=""
bin_dir=""
arches=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        amd64 | arm64 | armhf) arches+=("$1"); shift ;;
        *) die "unknown argument '$1' (ARCH is amd64, arm64 or armhf)" ;;
    esac
done
[ "${#arches[@]}" -gt 0 ] || die "name at least one ARCH: amd64 arm64 armhf"
[ -z "$bin_dir" ] || [ "${#arches[@]}" -eq 1 ] || die "--bin-dir goes with a single ARCH"
if [ -z "$version" ]; then
    version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")
fi
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "bad version '$version'"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

triple_of() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-musl ;;
        armhf) echo armv7-unknown-linux-gnueabihf ;;
    esac
}

MAINTAINER="skiff maintainers <skiff@example.org>"

# control NAME ARCH SIZE_KIB DESCRIPTION-LINES...: a DEBIAN/control file on stdout.
control() {
    local name="$1" arch="$2" size="$3"
    shift 3
    printf 'Package: %s\nVersion: %s\nArchitecture: %s\nMaintainer: %s\n' "$name" "$version" "$arch" "$MAINTAINER"
    printf 'Installed-Size: %s\nSection: admin\nPriority: optional\n' "$size"
    printf 'Homepage: https://example.org/skiff\n'
    printf 'Description: %s\n' "$1"
    shift
    local l
    for l in "$@"; do
        if [ -z "$l" ]; then echo " ."; else echo " $l"; fi
    done
}

# docs DIR NAME: the copyright file and changelog every Debian package carries.
docs() {
    local d="$1/usr/share/doc/$2"
    install -d -m 0755 "$d"
    cat >"$d/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: skiff
Source: https://example.org/skiff

Files: *
Copyright: 2026 The skiff authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
    chmod 0644 "$d/copyright"
    {
        printf '%s (%s) unstable; urgency=medium\n\n' "$2" "$version"
        printf '  * Release %s, built from the static binaries.\n\n' "$version"
        printf ' -- %s  %s\n' "$MAINTAINER" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
    } | gzip -n -9 >"$d/changelog.gz"
    chmod 0644 "$d/changelog.gz"
}

# static_ok DIR NAME: the lintian override for the static binary /usr/bin/NAME.
static_ok() {
    install -d -m 0755 "$1/usr/share/lintian/overrides"
    printf '# Static on purpose: one binary runs on every Raspberry Pi OS release.\n%s: statically-linked-binary [usr/bin/%s]\n' \
        "$2" "$2" >"$1/usr/share/lintian/overrides/$2"
    chmod 0644 "$1/usr/share/lintian/overrides/$2"
}

# finish DIR DEB: normalises owners, modes and times and builds DEB from DIR.
finish() {
    local dir="$1" deb="$2" tmp
    find "$dir" -type d -exec chmod 0755 {} +
    find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    tmp="$deb.tmp.$$"
    dpkg-deb --root-owner-group -Zxz --build "$dir" "$tmp" >/dev/null
    mv -f "$tmp" "$deb"
    log "built $deb"
}

installed_size() { du -sk --apparent-size --exclude=DEBIAN "$1" | cut -f1; }

build_skiff() {
    local arch="$1" bins="$2"
    local dir="$work/skiff-$arch"
    rm -rf "$dir"
    install -d -m 0755 "$dir/DEBIAN" "$dir/usr/bin" "$dir/lib/systemd/system" "$dir/etc/skiff"
    install -m 0755 "$bins/skiff" "$dir/usr/bin/skiff"
    # Packages install to /usr/bin, never /usr/local (the unit in systemd/ is for a hand install).
    sed 's#^ExecStart=/usr/local/bin/skiff #ExecStart=/usr/bin/skiff #' "$ROOT/systemd/skiff.service" \
        >"$dir/lib/systemd/system/skiff.service"
    grep -q '^ExecStart=/usr/bin/skiff agent$' "$dir/lib/systemd/system/skiff.service" ||
        die "systemd/skiff.service: ExecStart is not /usr/local/bin/skiff agent"
    chmod 0644 "$dir/lib/systemd/system/skiff.service"
    install -m 0644 "$ROOT/packaging/agent.env" "$dir/etc/skiff/agent.env"
    docs "$dir" skiff
    static_ok "$dir" skiff
    control skiff "$arch" "$(installed_size "$dir")" \
        "container agent for Raspberry Pi-class boards" \
        "skiff runs OCI containers in-process (no containerd, no Docker), enforces" \
        "CPU, memory and pids limits, keeps the desired state on local flash so" \
        "apps come back after a reboot with no network, and syncs with a" \
        "controller over MQTT when a link is configured in /etc/skiff/agent.env." \
        "" \
        "Stopping, upgrading or removing the agent leaves its containers running." \
        >"$dir/DEBIAN/control"
    echo /etc/skiff/agent.env >"$dir/DEBIAN/conffiles"
    local s
    for s in postinst prerm postrm; do
        install -m 0755 "$ROOT/packaging/skiff.$s" "$dir/DEBIAN/$s"
    done
    chmod 0644 "$dir/DEBIAN/control" "$dir/DEBIAN/conffiles"
    finish "$dir" "$out/skiff_${version}_${arch}.deb"
}

build_skiffctl() {
    local arch="$1" bins="$2"
    local dir="$work/skiffctl-$arch"
    rm -rf "$dir"
    install -d -m 0755 "$dir/DEBIAN" "$dir/usr/bin"
    install -m 0755 "$bins/skiffctl" "$dir/usr/bin/skiffctl"
    docs "$dir" skiffctl
    static_ok "$dir" skiffctl
    control skiffctl "$arch" "$(installed_size "$dir")" \
        "controller CLI for skiff container agents" \
        "skiffctl signs desired states and publishes them to skiff devices over" \
        "MQTT, and shows what the devices report. It belongs on the operator's" \
        "machine; boards need only the skiff package." \
        >"$dir/DEBIAN/control"
    chmod 0644 "$dir/DEBIAN/control"
    finish "$dir" "$out/skiffctl_${version}_${arch}.deb"
}

mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 022

for arch in "${arches[@]}"; do
    bins="$bin_dir"
    if [ -z "$bins" ]; then
        t="$(triple_of "$arch")"
        bins="$TARGET_DIR/cross/$t"
        if [ ! -x "$bins/skiff" ] || [ ! -x "$bins/skiffctl" ]; then
            log "no binaries in $bins: running cross/build.sh $t"
            bash "$ROOT/cross/build.sh" "$t" >&2
        fi
    fi
    for b in skiff skiffctl; do
        [ -x "$bins/$b" ] || die "$bins/$b is missing"
    done
    build_skiff "$arch" "$bins"
    build_skiffctl "$arch" "$bins"
done
