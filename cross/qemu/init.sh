#!/bin/busybox sh
# shellcheck shell=dash
# /init of the emulated skiff board (PID 1, busybox sh inside the initramfs).
#
# Stage 1 (from the initramfs): pivot_root cannot leave an initramfs root, and libcontainer
# pivots, so copy the initramfs into a tmpfs and switch_root into it.
# Stage 2 (in the tmpfs): mount proc, sys, devtmpfs and the cgroups, load the kernel modules
# listed in /lib/modules/load.list, mount the state disk at /var/lib/skiff when the kernel
# command line says skiff.disk=<dev>, run /skiff/test.sh (put there by cross/qemu/run.sh) and
# power off.
#
# Kernel command line options read here:
#   skiff.disk=<dev>     the state disk (run.sh --disk sets it)
#   skiff.cgroup=v2      (default) cgroup2 at /sys/fs/cgroup, every controller enabled for
#                        children
#   skiff.cgroup=v1      cgroup v1 as older systemd boards have it: cpu,cpuacct co-mounted,
#                        memory, pids, devices and freezer each on its own, no cgroup2
#   skiff.cgroup=none    no cgroup file system mounted
#
# Lines starting with "@@SKIFF-GUEST " are for the host harness:
#   init uptime=<s>      stage 1 reached (boot-to-/init time)
#   ready uptime=<s>     about to run the test script
#   exit=<rc>            the test script's exit code
#   error: <what>        setup failed; the test script still runs
#   poweroff             clean shutdown (disk unmounted)

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
say() { echo "@@SKIFF-GUEST $*"; }
uptime_s() { read -r up _ </proc/uptime; echo "$up"; }

if [ "$1" != stage2 ]; then
    /bin/busybox mkdir -p /proc
    /bin/busybox mount -t proc proc /proc
    # --install needs /proc/self/exe; it puts the applet links at their usual places.
    /bin/busybox --install -s
    say "init uptime=$(uptime_s)"
    mkdir -p /newroot
    mount -t tmpfs -o mode=0755 tmpfs /newroot
    for e in /*; do
        case "$e" in /newroot | /proc | /sys | /dev) continue ;; esac
        cp -a "$e" /newroot/
    done
    mkdir -p /newroot/proc /newroot/sys /newroot/dev
    umount /proc
    exec switch_root /newroot /init stage2
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/lib/skiff /root
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp

disk='' cgroups=v2
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        skiff.disk=*) disk="/dev/${arg#skiff.disk=}" ;;
        skiff.cgroup=*) cgroups="${arg#skiff.cgroup=}" ;;
    esac
done

case "$cgroups" in
    v2)
        mount -t cgroup2 cgroup2 /sys/fs/cgroup || say "error: mount cgroup2"
        read -r controllers </sys/fs/cgroup/cgroup.controllers
        for c in $controllers; do
            echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control || say "error: enable cgroup controller $c"
        done
        ;;
    v1)
        # The layout of an older systemd board ("legacy" hierarchy): a tmpfs holding one v1
        # hierarchy per controller, cpu and cpuacct co-mounted (with the two symlinks systemd
        # adds), and no cgroup2 anywhere.
        mount -t tmpfs -o mode=0755,nosuid,nodev,noexec cgroup /sys/fs/cgroup ||
            say "error: mount tmpfs on /sys/fs/cgroup"
        for c in cpu,cpuacct memory pids devices freezer; do
            mkdir -p "/sys/fs/cgroup/$c"
            mount -t cgroup -o "nosuid,nodev,noexec,$c" cgroup "/sys/fs/cgroup/$c" || say "error: mount cgroup v1 $c"
        done
        ln -s cpu,cpuacct /sys/fs/cgroup/cpu
        ln -s cpu,cpuacct /sys/fs/cgroup/cpuacct
        ;;
    none) ;;
    *) say "error: unknown skiff.cgroup=$cgroups (v2 | v1 | none)" ;;
esac
hostname skiff-board
ip link set lo up 2>/dev/null || true

if [ -f /lib/modules/load.list ]; then
    while read -r m; do
        insmod "/lib/modules/$m" || say "error: insmod $m"
    done </lib/modules/load.list
fi

if [ -n "$disk" ]; then
    i=0
    while [ ! -b "$disk" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    # A power cut leaves the journal to replay: mount does that.
    mount -t ext4 "$disk" /var/lib/skiff || say "error: mount $disk on /var/lib/skiff"
fi

# Only emergencies on the console from here on, so kernel messages do not split the test's
# lines; `dmesg` still has everything (printed below when the script fails).
echo 1 >/proc/sys/kernel/printk

export HOME=/root TERM=dumb
say "ready uptime=$(uptime_s)"
cd /
if [ -f /skiff/test.sh ]; then
    sh /skiff/test.sh </dev/null
    rc=$?
else
    say "error: no /skiff/test.sh"
    rc=127
fi
say "exit=$rc"
if [ "$rc" -ne 0 ]; then
    echo "--- dmesg (last 40 lines) ---"
    dmesg | tail -n 40
fi
sync
if [ -n "$disk" ]; then
    umount /var/lib/skiff 2>/dev/null || mount -o remount,ro /var/lib/skiff || say "error: umount /var/lib/skiff"
fi
say poweroff
poweroff -f
