#!/usr/bin/env bash
# Boots the emulated aarch64 board once and runs a shell script inside it.
#
#   cross/qemu/run.sh [--disk IMG] [--append ARGS] [--workdir DIR] [--timeout SECS] SCRIPT
#
# The guest gets the aarch64 `skiff` at /usr/bin/skiff, the OCI layouts in images/out (when
# present; e.g. images/out/busybox -> /images/busybox), SCRIPT as /skiff/test.sh, and IMG (from cross/qemu/mkdisk.sh) as
# /dev/vda mounted on /var/lib/skiff. The console goes to stdout; see cross/qemu/init.sh for
# the "@@SKIFF-GUEST" lines. QEMU exits 0 even when the guest panics: callers look for
# "@@SKIFF-GUEST exit=0". --append adds kernel command line arguments (e.g. skiff.cgroup=v1,
# cgroup_disable=memory: see cross/qemu/init.sh).
#
# With --workdir (what the Rust harness uses) the script builds the initrd there and execs
# QEMU, so the caller's child process is QEMU itself: the caller owns the timeout, the kill
# (a power cut is a SIGKILL at the moment it chooses) and the cleanup of DIR. Without it,
# a temp dir is used and removed, and QEMU is killed after --timeout SECS (default 120).
#
# Needs cross/qemu/prepare.sh and cross/build.sh aarch64 to have run. Environment:
# SKIFF_GUEST_BIN (default: the cross build's skiff), SKIFF_GUEST_IMAGES (default:
# images/out), SKIFF_QEMU_MEM (512M), SKIFF_QEMU_SMP (2), SKIFF_QEMU_APPEND (extra kernel args).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac

die() { printf '[cross/qemu] error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

disk="" workdir="" timeout=120 script="" extra=""
while [ $# -gt 0 ]; do
    case "$1" in
        --disk) disk="$2"; shift 2 ;;
        --workdir) workdir="$2"; shift 2 ;;
        --append) extra="$extra $2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$script" ] || die "one SCRIPT only"; script="$1"; shift ;;
    esac
done
[ -n "$script" ] || { usage >&2; exit 2; }
[ -f "$script" ] || die "no script $script"
[ -z "$disk" ] || [ -f "$disk" ] || die "no disk image $disk (make one with cross/qemu/mkdisk.sh)"

env_file="$TARGET_DIR/qemu/board.env"
[ -f "$env_file" ] || die "$env_file missing: run cross/qemu/prepare.sh first"
KERNEL="" INITRD_BASE=""
# shellcheck source=/dev/null
. "$env_file"
if [ ! -f "$KERNEL" ] || [ ! -f "$INITRD_BASE" ]; then
    die "board files gone: run cross/qemu/prepare.sh again"
fi
bin="${SKIFF_GUEST_BIN:-$TARGET_DIR/cross/aarch64-unknown-linux-musl/skiff}"
[ -f "$bin" ] || die "$bin missing: run cross/build.sh aarch64 first"
images="${SKIFF_GUEST_IMAGES:-$ROOT/images/out}"
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 missing: run cross/qemu/prepare.sh"

own_workdir=0
if [ -z "$workdir" ]; then
    workdir=$(mktemp -d "${TMPDIR:-/tmp}/skiff-qemu.XXXXXX")
    own_workdir=1
    trap 'rm -rf "$workdir"' EXIT
fi
mkdir -p "$workdir"

# The run's own files go in a second, uncompressed cpio appended to the cached base one: the
# kernel unpacks concatenated archives in order.
p="$workdir/payload"
rm -rf "$p"
mkdir -p "$p/usr/bin" "$p/skiff"
cp "$bin" "$p/usr/bin/skiff"
cp "$script" "$p/skiff/test.sh"
chmod 0755 "$p/usr/bin/skiff" "$p/skiff/test.sh"
# Only the OCI layouts (images/out also holds tarballs of the same images).
for d in "$images"/*/; do
    [ -f "$d/oci-layout" ] || continue
    mkdir -p "$p/images"
    cp -a "${d%/}" "$p/images/"
done
(cd "$p" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$workdir/payload.cpio"
cat "$INITRD_BASE" "$workdir/payload.cpio" >"$workdir/initrd"
rm -rf "$p" "$workdir/payload.cpio"

# cryptomgr.notests: the kernel's crypto self-tests cost ~0.3 s of every boot under TCG.
append="console=ttyAMA0 quiet panic=-1 cryptomgr.notests"
qemu=(qemu-system-aarch64 -M virt -cpu cortex-a53 -m "${SKIFF_QEMU_MEM:-512M}"
    -smp "${SKIFF_QEMU_SMP:-2}" -nic none -nographic -no-reboot
    -kernel "$KERNEL" -initrd "$workdir/initrd")
if [ -n "$disk" ]; then
    # cache=writeback (QEMU's default): what the guest flushed is in the host's page cache,
    # which survives a SIGKILL of QEMU; what it did not flush may or may not be there, like
    # on a real card.
    qemu+=(-drive "file=$disk,if=virtio,format=raw")
    append="$append skiff.disk=vda"
fi
qemu+=(-append "$append$extra ${SKIFF_QEMU_APPEND:-}")

if [ "$own_workdir" -eq 0 ]; then
    exec "${qemu[@]}" </dev/null
fi
rc=0
timeout --kill-after=5 "$timeout" "${qemu[@]}" </dev/null || rc=$?
[ "$rc" -ne 124 ] || echo "[cross/qemu] timed out after ${timeout}s" >&2
exit "$rc"
