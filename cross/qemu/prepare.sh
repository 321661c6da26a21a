#!/usr/bin/env bash
# Prepares the emulated aarch64 board that cross/qemu/run.sh boots.
#
#   cross/qemu/prepare.sh
#
# Installs qemu-system-arm, e2fsprogs and cpio; fetches Debian's arm64 kernel
# (linux-image-arm64:arm64 -> linux-image-<abi>-arm64) and busybox-static:arm64 with
# `apt-get download` (extracted, not installed); builds the base initramfs (busybox, the
# kernel modules the board needs, cross/qemu/init.sh as /init).
#
# Everything lands under <target dir>/qemu/, keyed by the package versions and the inputs'
# hashes, so a second run does no download and no rebuild. It ends by writing
# <target dir>/qemu/board.env (KERNEL=, INITRD_BASE=, KERNEL_RELEASE=), which run.sh reads.
#
# Environment: SKIFF_QEMU_KERNEL_PKG overrides the kernel package (default: what
# linux-image-arm64:arm64 depends on); SKIFF_QEMU_MODULES the modules to load at boot.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/cross/qemu"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
CACHE="$TARGET_DIR/qemu"
# virtio_pci + virtio_blk: the state disk; crc32c_generic + ext4: its filesystem (ext4 asks
# for crc32c by name, which insmod cannot resolve); overlay: container rootfs.
MODULES="${SKIFF_QEMU_MODULES:-virtio_pci virtio_blk crc32c_generic ext4 overlay}"

log() { printf '[cross/qemu] %s\n' "$*" >&2; }
die() { printf '[cross/qemu] error: %s\n' "$*" >&2; exit 1; }
APT=(apt-get -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root)

apt_updated=0
apt_update() {
    [ "$apt_updated" -eq 1 ] && return 0
    log "apt-get update"
    "${APT[@]}" update -qq >&2
    apt_updated=1
}
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "apt: installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# pkg_version NAME:ARCH -> the candidate version, empty if apt does not know the package.
pkg_version() {
    apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ { print $2; exit }'
}
# resolve NAME:ARCH -> "name version", updating the package lists once if needed.
resolve() {
    local v
    v=$(pkg_version "$1")
    if [ -z "$v" ]; then
        apt_update
        v=$(pkg_version "$1")
    fi
    [ -n "$v" ] || die "apt knows no package $1"
    echo "$1 $v"
}
kernel_pkg() {
    local p
    if [ -n "${SKIFF_QEMU_KERNEL_PKG:-}" ]; then
        echo "$SKIFF_QEMU_KERNEL_PKG"
        return
    fi
    p=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    if [ -z "$p" ]; then
        apt_update
        p=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    fi
    [ -n "$p" ] || die "cannot resolve linux-image-arm64:arm64 to a kernel package"
    case "$p" in *:*) echo "$p" ;; *) echo "$p:arm64" ;; esac
}
# fetch NAME VERSION DIR: apt-get download into DIR (retried once after a list update, for a
# version the mirror has dropped since the lists were read).
fetch() {
    local name="$1" version="$2" dir="$3"
    (cd "$dir" && "${APT[@]}" download -qq "$name=$version" >&2) && return 0
    apt_update
    version=$(pkg_version "$name")
    (cd "$dir" && "${APT[@]}" download -qq "$name=$version" >&2)
}
# kocat FILE: a kernel module's bytes, whatever its compression.
kocat() {
    case "$1" in
        *.xz) xz -dc "$1" ;;
        *.zst) zstd -dcq "$1" ;;
        *) cat "$1" ;;
    esac
}
safe() { printf '%s' "$1" | tr -c 'A-Za-z0-9._+-' '_'; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt, and the tests boot as root anyway)"
if ! dpkg --print-foreign-architectures | grep -x arm64 >/dev/null; then
    log "dpkg: adding the arm64 architecture"
    dpkg --add-architecture arm64
    apt_update
fi
apt_install qemu-system-arm e2fsprogs cpio
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.prepare.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel and modules ---------------------------------------------------------------------
# apt-cache takes seconds with two architectures' lists: remember what the packages resolved
# to for as long as the lists and the override stay the same.
lists_key=$( {
    echo "${SKIFF_QEMU_KERNEL_PKG:-}"
    stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null || true
} | sha256sum | cut -c1-16)
if [ -f "$CACHE/resolved.$lists_key" ]; then
    read -r kpkg kver bpkg bver <"$CACHE/resolved.$lists_key"
else
    kernel=$(kernel_pkg)
    k=$(resolve "$kernel")
    b=$(resolve busybox-static:arm64)
    read -r kpkg kver bpkg bver <<<"$k $b"
    rm -f "$CACHE"/resolved.*
    echo "$kpkg $kver $bpkg $bver" >"$CACHE/resolved.$lists_key"
fi
kdir="$CACHE/kernel-$(safe "${kpkg%%:*}_$kver")"
if [ ! -f "$kdir/.done" ]; then
    log "fetching $kpkg $kver"
    rm -rf "$kdir"
    mkdir -p "$work/deb" "$work/x" "$work/k"
    fetch "$kpkg" "$kver" "$work/deb"
    dpkg-deb -x "$work"/deb/linux-image-*.deb "$work/x"
    cp "$work"/x/boot/vmlinuz-* "$work/k/vmlinuz"
    release=$(basename "$(ls -d "$work"/x/lib/modules/*/)")
    echo "$release" >"$work/k/release"
    # The extracted tree is ~400 MB: keep the .deb (modules are pulled out of it when the
    # initramfs is built) and an index of "path-in-deb deps,comma,separated" per module.
    (cd "$work/x" && find "./lib/modules/$release/kernel" -name '*.ko*' | LC_ALL=C sort) |
        while read -r f; do
            echo "$f $(kocat "$work/x/$f" | tr '\0' '\n' | grep -a -m1 '^depends=' | cut -d= -f2)"
        done >"$work/k/modules.index"
    mv "$work"/deb/linux-image-*.deb "$work/k/kernel.deb"
    rm -rf "$work/x"
    mv "$work/k" "$kdir"
    touch "$kdir/.done"
fi
release=$(cat "$kdir/release")

# --- busybox ----------------------------------------------------------------------------------
bdir="$CACHE/busybox-$(safe "$bver")"
if [ ! -f "$bdir/.done" ]; then
    log "fetching $bpkg $bver"
    rm -rf "$bdir"
    fetch "$bpkg" "$bver" "$work"
    mkdir -p "$work/b" "$bdir"
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/b"
    cp "$work/b/bin/busybox" "$bdir/busybox"
    rm -rf "$work/b" "$work"/*.deb
    touch "$bdir/.done"
fi

# --- base initramfs ---------------------------------------------------------------------------
# Modules in load order: each one after its dependencies.
declare -A seen=()
order=()
add_module() {
    local name="$1" line path deps d
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    # Module file names use '_' or '-' interchangeably with the module name.
    line=$(awk -v n="$name" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko.*/, "", f); gsub(/-/, "_", f);
        m = n; gsub(/-/, "_", m); if (f == m) { print; exit } }' "$kdir/modules.index")
    [ -n "$line" ] || die "kernel $release has no module $name"
    path=${line%% *}
    deps=${line#* }
    [ "$deps" = "$line" ] && deps=
    for d in ${deps//,/ }; do add_module "$d"; done
    order+=("$path")
}
for m in $MODULES; do add_module "$m"; done

key=$( {
    echo "kernel $kpkg $kver"
    echo "busybox $bver"
    printf '%s\n' "${order[@]}"
    cat "$HERE/init.sh"
    cat "${BASH_SOURCE[0]}"
} | sha256sum | cut -c1-16)
base="$CACHE/base-$key.cpio.gz"
if [ ! -f "$base" ]; then
    log "building base initramfs $base"
    r="$work/root"
    mkdir -p "$r/bin" "$r/sbin" "$r/usr/bin" "$r/usr/sbin" "$r/lib/modules" "$r/proc" "$r/sys" "$r/dev" "$r/etc" "$r/skiff"
    cp "$bdir/busybox" "$r/bin/busybox"
    cp "$HERE/init.sh" "$r/init"
    chmod 0755 "$r/init" "$r/bin/busybox"
    : >"$r/lib/modules/load.list"
    (cd "$work" && dpkg-deb --fsys-tarfile "$kdir/kernel.deb" | tar -x "${order[@]}")
    for p in "${order[@]}"; do
        f=$(basename "$p")
        f=${f%.xz}
        f=${f%.zst}
        kocat "$work/$p" >"$r/lib/modules/$f"
        echo "$f" >>"$r/lib/modules/load.list"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\n' >"$r/etc/group"
    # The kernel opens /dev/console for /init before anything is mounted.
    mknod -m 0600 "$r/dev/console" c 5 1
    (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$work/base.cpio"
    gzip -9n <"$work/base.cpio" >"$work/base.cpio.gz"
    # run.sh appends the run's own uncompressed cpio; the kernel takes an archive that
    # follows a compressed one only at a 4-byte aligned offset (zero bytes are skipped).
    truncate -s %512 "$work/base.cpio.gz"
    rm -f "$CACHE"/base-*.cpio.gz
    mv "$work/base.cpio.gz" "$base"
fi

cat >"$work/board.env" <<EOF
KERNEL=$kdir/vmlinuz
KERNEL_RELEASE=$release
INITRD_BASE=$base
EOF
mv "$work/board.env" "$CACHE/board.env"
log "ready: kernel $release ($kpkg $kver), busybox $bver, modules: $(printf '%s ' "${order[@]##*/}")"
cat "$CACHE/board.env"
