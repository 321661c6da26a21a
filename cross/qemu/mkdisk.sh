#!/usr/bin/env bash
# Makes a raw ext4 disk image for the emulated board's /var/lib/skiff (the "SD card").
#
#   cross/qemu/mkdisk.sh IMG [SIZE_MIB]      (default 64 MiB)
#
# Overwrites IMG. Uses the host's mke2fs (e2fsprogs): busybox has no mkfs.ext4.
set -euo pipefail

die() { printf '[cross/qemu] error: %s\n' "$*" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "usage: $0 IMG [SIZE_MIB]"; fi
img="$1"
size="${2:-64}"
case "$size" in '' | *[!0-9]*) die "SIZE_MIB must be a number: $size" ;; esac
command -v mke2fs >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
command -v mke2fs >/dev/null || die "mke2fs missing: apt-get install e2fsprogs (cross/qemu/prepare.sh does)"

rm -f "$img"
truncate -s "${size}M" "$img"
# Journal and all inode tables written now, so the guest does no lazy init in the background.
mke2fs -q -F -t ext4 -L skiff-state -E lazy_itable_init=0,lazy_journal_init=0 "$img"
