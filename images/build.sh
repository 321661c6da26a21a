#!/usr/bin/env bash
# Builds the busybox test image from Debian's busybox-static as an OCI image layout:
#   images/out/busybox/      the layout (index.json -> image index -> one manifest per arch), tag "1"
#   images/out/busybox.tar   the same layout as a tar
# for the host's architecture (amd64, arm64 or armhf, as `dpkg --print-architecture` says;
# armhf is linux/arm/v7), plus arm64 on amd64 hosts (the emulated aarch64 board the tests
# boot). More with ARCH arguments: `images/build.sh armhf` on amd64 builds amd64, arm64 and
# armhf. A foreign architecture is added to dpkg (`dpkg --add-architecture`) only when it
# is not there yet, and its package lists are fetched once.
# Byte-for-byte reproducible for a given Debian package version: tars are sorted with
# mtime 0 and numeric root owners, gzip -n drops the name and time.
# A second run is a no-op while the outputs exist for the same architectures and this script
# is unchanged (--force rebuilds). Needs root (apt). No network except apt.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/out"
layout="$out/busybox"
stamp="$out/.busybox.stamp"
tag="1"

say() { echo "images/build.sh: $*"; }
die() { echo "images/build.sh: error: $*" >&2; exit 1; }

force=0
extra=()
for a in "$@"; do
    case "$a" in
        --force) force=1 ;;
        amd64 | arm64 | armhf) extra+=("$a") ;;
        -h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$a' (--force, or an architecture: amd64 arm64 armhf)" ;;
    esac
done

host="$(dpkg --print-architecture)"
case "$host" in
    amd64) arches=(amd64 arm64) ;;
    arm64 | armhf) arches=("$host") ;;
    *) die "host architecture $host: busybox images are built for amd64, arm64 and armhf hosts" ;;
esac
for a in ${extra[@]+"${extra[@]}"}; do
    [[ " ${arches[*]} " == *" $a "* ]] || arches+=("$a")
done

want_stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) ${arches[*]}"
if [[ "$force" -eq 0 && -f "$layout/index.json" && -f "$out/busybox.tar" && -f "$stamp" &&
    "$(cat "$stamp")" == "$want_stamp" ]]; then
    say "$layout is up to date (${arches[*]})"
    exit 0
fi
[[ "$(id -u)" -eq 0 ]] || die "needs root: it adds dpkg architectures and downloads packages with apt"
say "building busybox:$tag for ${arches[*]} (host: $host)"

# --- dependencies -------------------------------------------------------------
need_update=0
for a in "${arches[@]}"; do
    if [[ "$a" != "$host" ]] && ! dpkg --print-foreign-architectures | grep -qx "$a"; then
        say "adding the dpkg architecture $a (busybox-static:$a comes from its archive)"
        dpkg --add-architecture "$a"
        need_update=1
    fi
done
apt_update() {
    say "apt-get update (package lists)"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
}
if [[ "$need_update" -eq 1 ]]; then
    apt_update
    need_update=2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

debs=()
for a in "${arches[@]}"; do debs+=("busybox-static:$a"); done
say "downloading ${debs[*]}"
download() { (cd "$work" && apt-get -q -o APT::Sandbox::User=root download "${debs[@]}" >/dev/null); }
if ! download; then
    # Lists that predate an architecture (or are stale) miss the package: fetch them once.
    [[ "$need_update" -eq 2 ]] && die "apt-get download ${debs[*]} failed"
    apt_update
    download || die "apt-get download ${debs[*]} failed"
fi
for a in "${arches[@]}"; do
    mkdir -p "$work/deb-$a"
    dpkg-deb -x "$work"/busybox-static_*_"$a".deb "$work/deb-$a"
done

# Only the host's binary can run; all debs are the same Debian version, so its applet
# list holds for the other arches too.
[[ -x "$work/deb-$host/bin/busybox" ]] || die "no busybox-static for host arch $host"
"$work/deb-$host/bin/busybox" --list-full | grep / | grep -vx bin/busybox | sort >"$work/applets"

# --- helpers ------------------------------------------------------------------
blobs="$work/layout/blobs/sha256"
mkdir -p "$blobs"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# put FILE: moves FILE into the blob store, prints "<hex> <size>".
put() {
    local h s
    h="$(sha "$1")"
    s="$(size "$1")"
    mv "$1" "$blobs/$h"
    echo "$h $s"
}

# oci_arch DEB_ARCH: the OCI architecture (armhf is arm, variant v7).
oci_arch() {
    case "$1" in
        armhf) echo arm ;;
        *) echo "$1" ;;
    esac
}

# rel_link APPLET_PATH: the relative symlink target from APPLET_PATH to bin/busybox.
rel_link() {
    local dir="${1%/*}" up=""
    IFS=/ read -ra parts <<<"$dir"
    for _ in "${parts[@]}"; do up="../$up"; done
    if [[ "$dir" == bin ]]; then echo busybox; else echo "${up}bin/busybox"; fi
}

# --- per-arch image -----------------------------------------------------------
manifests=()
for a in "${arches[@]}"; do
    say "building the linux/$(oci_arch "$a") image"
    root="$work/rootfs-$a"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,root,tmp,var/www}
    install -m 0755 "$work/deb-$a/bin/busybox" "$root/bin/busybox"
    while read -r applet; do
        ln -s "$(rel_link "$applet")" "$root/$applet"
    done <"$work/applets"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf '<!doctype html>\n<title>skiff</title>\n<p>hello from busybox httpd in skiff</p>\n' >"$root/var/www/index.html"
    find "$root" -type d -exec chmod 0755 {} +
    chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/var/www/index.html"
    chmod 0700 "$root/root"
    chmod 1777 "$root/tmp"

    tar -C "$root" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --format=gnu \
        -cf "$work/layer.tar" .
    diff_id="$(sha "$work/layer.tar")"
    gzip -n -9 "$work/layer.tar"
    read -r layer_hex layer_size < <(put "$work/layer.tar.gz")

    cfg_variant=""
    [[ "$a" == armhf ]] && cfg_variant=',"variant":"v7"'
    printf '{"architecture":"%s","os":"linux"%s,"config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$(oci_arch "$a")" "$cfg_variant" "$diff_id" >"$work/config.json"
    read -r config_hex config_size < <(put "$work/config.json")

    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
        "$config_hex" "$config_size" "$layer_hex" "$layer_size" >"$work/manifest.json"
    read -r man_hex man_size < <(put "$work/manifest.json")
    variant=""
    [[ "$a" == arm64 ]] && variant=',"variant":"v8"'
    [[ "$a" == armhf ]] && variant=',"variant":"v7"'
    manifests+=("$(printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"%s}}' \
        "$man_hex" "$man_size" "$(oci_arch "$a")" "$variant")")
done

# --- index and layout ---------------------------------------------------------
(
    IFS=,
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' \
        "${manifests[*]}" >"$work/index-blob.json"
)
read -r idx_hex idx_size < <(put "$work/index-blob.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$idx_hex" "$idx_size" "$tag" >"$work/layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
find "$work/layout" -type d -exec chmod 0755 {} +
find "$work/layout" -type f -exec chmod 0644 {} +

tar -C "$work/layout" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -cf "$work/busybox.tar" oci-layout index.json blobs

# Replace the outputs only once everything is built, so a failed run leaves the old ones.
mkdir -p "$out"
rm -rf "$layout" "$out/busybox.tar" "$stamp"
mv "$work/layout" "$layout"
mv "$work/busybox.tar" "$out/busybox.tar"
echo "$want_stamp" >"$stamp"
say "built $layout and $out/busybox.tar (busybox:$tag, ${arches[*]}; index sha256:$idx_hex)"
