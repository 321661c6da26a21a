#!/usr/bin/env bash
# Provisions a batch of Raspberry Pi OS SD-card images for skiff, one per device, without
# booting them and without loop devices or mounts: FAT through mtools, ext4 through debugfs
# (e2fsprogs), both at the partitions' byte offsets inside the image file.
#
#   images/provision.sh --image BASE.img --devices devices.csv --out DIR --deb skiff_V_ARCH.deb \
#       --ca ca.crt --ca-key ca.key --controller-pub controller.pub --broker mqtts://HOST:8883 \
#       [--broker-ca CA] [--state apps.toml] [--load IMAGE]... [--skiff PATH] [--days N] [--force]
#
# BASE.img is a Raspberry Pi OS style disk image: an MBR with the FAT boot partition first
# and the ext4 root second. For every device id in devices.csv (one per line: `id` or
# `id,broker-url`; blank lines, `#` comments and a header line whose first column is
# `device`, `device_id` or `id` are skipped) it
# writes DIR/<id>.img, a copy of BASE.img with:
#   - the .deb's files (/usr/bin/skiff, the unit, the docs), registered in dpkg's database
#     as installed, so a later `apt install ./skiff_*.deb` is an ordinary upgrade;
#   - skiff.service enabled (the multi-user.target.wants symlink) and /var/lib/skiff (0700);
#   - /etc/skiff/agent.env with the device id and broker URL, /etc/skiff/ca.crt (the broker's
#     CA: --broker-ca, default --ca), /etc/skiff/controller.pub, and /etc/skiff/device.crt and
#     device.key: a new P-256 key and a client certificate (CN = device id, clientAuth,
#     --days, default 3650) signed by the operator's CA; the key is root-only (0600, uid 0);
#   - with --state, the desired state (as `skiff apply` stores it) and with --load the images
#     (as `skiff image load` stores them, for the .deb's architecture), so the board runs its
#     apps on first boot with no network; these need a `skiff` that runs here (--skiff,
#     default: skiff on PATH);
#   - `cgroup_enable=memory cgroup_memory=1` in cmdline.txt (idempotent; a
#     `cgroup_disable=memory` is removed).
# Each image is written to DIR/.<id>.img.tmp, read back and checked, and renamed to
# DIR/<id>.img (mode 0600: it holds the device's key) when complete. An existing DIR/<id>.img is left alone unless --force. Needs: mtools, e2fsprogs,
# fdisk (sfdisk), openssl, dpkg-deb. Runs as any user that can read its inputs; the files in
# the images are owned by root whoever runs it.
set -euo pipefail

log() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

base="" csv="" out="" deb="" ca="" ca_key="" broker_ca="" controller_pub="" broker=""
state="" skiff="" days=3650 force=0
loads=()
while [ $# -gt 0 ]; do
    case "$1" in
        --force | -h | --help) ;;
        *) [ $# -ge 2 ] || die "$1 needs a value" ;;
    esac
    case "$1" in
        --image) base="$2"; shift 2 ;;
        --devices) csv="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --deb) deb="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --ca-key) ca_key="$2"; shift 2 ;;
        --broker-ca) broker_ca="$2"; shift 2 ;;
        --controller-pub) controller_pub="$2"; shift 2 ;;
        --broker) broker="$2"; shift 2 ;;
        --state) state="$2"; shift 2 ;;
        --load) loads+=("$2"); shift 2 ;;
        --skiff) skiff="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

for v in base csv out deb ca ca_key controller_pub broker; do
    [ -n "${!v}" ] || die "--${v//_/-} is required (see --help)"
done
[ -n "$broker_ca" ] || broker_ca="$ca"
for f in "$base" "$csv" "$deb" "$ca" "$ca_key" "$broker_ca" "$controller_pub" ${state:+"$state"}; do
    if [ ! -f "$f" ] || [ ! -r "$f" ]; then die "$f: not a readable file"; fi
done
for f in ${loads[@]+"${loads[@]}"}; do
    # An OCI layout (a directory) or a tar, as skiff image load takes them.
    if [ ! -r "$f" ] || { [ ! -f "$f" ] && [ ! -d "$f" ]; }; then die "$f: not a readable image layout or tar"; fi
done
[[ "$days" =~ ^[1-9][0-9]{0,4}$ ]] || die "--days: a number of days, 1-99999"
for tool in mcopy mtype debugfs sfdisk openssl dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install mtools e2fsprogs fdisk openssl dpkg)"
done
export MTOOLS_SKIP_CHECK=1

valid_broker() { [[ "$1" =~ ^mqtts?://[A-Za-z0-9._-]+(:[0-9]{1,5})?$ ]] || [[ "$1" =~ ^mqtts?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$ ]]; }
valid_broker "$broker" || die "--broker '$broker': expected mqtts://host[:port]"

# --- devices -------------------------------------------------------------------
# The rule of skiff's DeviceId: 1-63 of [a-z0-9-], starting and ending with a letter or digit.
valid_id() { [[ "$1" =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; }
ids=() brokers=()
declare -A seen=()
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    line="$(printf '%s' "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')"
    case "$line" in '' | '#'*) continue ;; esac
    IFS=, read -r id url rest <<<"$line"
    id="$(printf '%s' "$id" | tr -d '[:space:]')"
    url="$(printf '%s' "${url:-}" | tr -d '[:space:]')"
    case "$lineno:$id" in 1:device | 1:device_id | 1:device-id | 1:id) continue ;; esac
    [ -z "${rest:-}" ] || die "$csv:$lineno: expected id[,broker-url]"
    valid_id "$id" || die "$csv:$lineno: '$id' is not a device id ([a-z0-9-], 1-63, no leading or trailing -)"
    [ "$id" != skiffctl ] || die "$csv:$lineno: 'skiffctl' is the controller's certificate name, never a device's"
    [ -z "${seen[$id]:-}" ] || die "$csv:$lineno: device '$id' is listed twice"
    seen[$id]=1
    [ -z "$url" ] || valid_broker "$url" || die "$csv:$lineno: '$url': expected mqtts://host[:port]"
    ids+=("$id")
    brokers+=("${url:-$broker}")
done <"$csv"
[ "${#ids[@]}" -gt 0 ] || die "$csv lists no device"

# --- the base image --------------------------------------------------------------
# sfdisk -d lines: "<dev>1 : start=  8192, size= 1048576, type=c"
part() { # part N FIELD: the field (start or size, in sectors) of partition N of BASE.img
    sfdisk -d "$base" 2>/dev/null | awk -v n="$1" -v f="$2" '
        /^[^ ]+ : / { i++; if (i == n) { if (match($0, f "= *[0-9]+")) { s = substr($0, RSTART, RLENGTH); sub(/.*= */, "", s); print s } } }'
}
sector=$(sfdisk -d "$base" 2>/dev/null | awk '/^sector-size:/ { print $2 }')
sector="${sector:-512}"
boot_start=$(part 1 start)
root_start=$(part 2 start)
if [ -z "$boot_start" ] || [ -z "$root_start" ]; then die "$base: no MBR with a boot and a root partition (sfdisk -d shows none)"; fi
boot_off=$((boot_start * sector))
root_off=$((root_start * sector))
mtype -i "$base@@$boot_off" ::cmdline.txt >/dev/null 2>&1 ||
    die "$base: partition 1 is not a FAT file system with cmdline.txt"
debugfs -R "stat /etc" "$base?offset=$root_off" 2>/dev/null | grep -q 'Type: directory' ||
    die "$base: partition 2 is not an ext4 root file system with /etc"

# --- what every image gets --------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 0700 "$work"
umask 077

arch=$(dpkg-deb -f "$deb" Architecture)
pkg=$(dpkg-deb -f "$deb" Package)
[ "$pkg" = skiff ] || die "$deb is package '$pkg', not skiff"
case "$arch" in
    arm64) platform=linux/arm64 ;;
    armhf) platform=linux/arm/v7 ;;
    amd64) platform=linux/amd64 ;;
    *) die "$deb: architecture '$arch' is not arm64, armhf or amd64" ;;
esac
common="$work/common"
mkdir -p "$common"
dpkg-deb -x "$deb" "$common"
dpkg-deb -e "$deb" "$work/control"
[ -f "$common/lib/systemd/system/skiff.service" ] || die "$deb has no lib/systemd/system/skiff.service"
install -d -m 0700 "$common/var/lib/skiff"

if [ -n "$state" ] || [ "${#loads[@]}" -gt 0 ]; then
    [ -n "$skiff" ] || skiff="$(command -v skiff || true)"
    if [ -z "$skiff" ] || [ ! -x "$skiff" ]; then
        die "--state and --load need a skiff that runs here: --skiff PATH"
    fi
    # The state dir as the board's agent reads it; the run dir is a scratch one, so no
    # agent on this machine hears about it.
    for img in ${loads[@]+"${loads[@]}"}; do
        log "loading $img for $platform"
        "$skiff" image load --state-dir "$common/var/lib/skiff" --run-dir "$work/run" \
            --platform "$platform" "$img" >&2
    done
    if [ -n "$state" ]; then
        log "storing the desired state $state"
        "$skiff" apply --state-dir "$common/var/lib/skiff" --run-dir "$work/run" -f "$state" >&2
    fi
fi

# dpkg's record of the package, so the board's dpkg knows skiff is installed (the sums
# leave the conffiles out, as dpkg's own do).
dpkg-deb -c "$deb" | awk '{ print $6 }' | sed 's#^\./#/#; s#^/$#/.#; s#/$##' >"$work/skiff.list"
(cd "$common" && dpkg-deb -c "$deb" | awk '$1 ~ /^-/ { print $6 }' | sed 's#^\./##' |
    grep -vxF -f <(sed 's#^/##' "$work/control/conffiles") | while read -r f; do md5sum "$f"; done) >"$work/skiff.md5sums"

# --- per device ----------------------------------------------------------------------
# emit_tree DIR: debugfs commands that copy DIR's contents into / of the image, with the
# modes and numeric owners they have in DIR (an image's files keep theirs; everything
# else is root's, whoever runs this). Directories the image has already keep their
# attributes, except those skiff owns; files, symlinks and nodes are replaced.
ours() { case "$1" in /etc/skiff | /etc/skiff/* | /var/lib/skiff | /var/lib/skiff/* | /usr/share/doc/skiff | /usr/share/doc/skiff/*) return 0 ;; esac; return 1; }
emit_tree() {
    local dir="$1" type mode uid gid path q target bits
    (cd "$dir" && find . -mindepth 1 -printf '%y %m %U %G %p\n' | sort -k5) | while read -r type mode uid gid path; do
        path="${path#.}"
        case "$path" in *'"'* | *\\*) die "cannot copy '$path': quotes and backslashes in names" ;; esac
        q="\"$path\""
        case "$type" in
            d)
                echo "mkdir $q"
                ours "$path" || continue
                bits=040000
                ;;
            f)
                printf 'rm %s\nwrite "%s" %s\n' "$q" "$dir$path" "$q"
                bits=0100000
                ;;
            l)
                target="$(readlink "$dir$path")"
                case "$target" in *'"'* | *\\*) die "cannot copy '$path': quotes in its target" ;; esac
                printf 'rm %s\nsymlink %s "%s"\n' "$q" "$q" "$target"
                bits=0120000
                ;;
            p)
                printf 'rm %s\nmknod %s p\n' "$q" "$q"
                bits=010000
                ;;
            c | b)
                printf 'rm %s\nmknod %s %s %d %d\n' "$q" "$q" "$type" \
                    "$((16#$(stat -c %t "$dir$path")))" "$((16#$(stat -c %T "$dir$path")))"
                if [ "$type" = c ]; then bits=020000; else bits=060000; fi
                ;;
            *) die "cannot copy '$path' (a socket)" ;;
        esac
        [ "$type" = l ] || printf 'sif %s mode 0%o\n' "$q" "$((bits | 8#$mode))"
        printf 'sif %s uid %s\nsif %s gid %s\n' "$q" "$uid" "$q" "$gid"
    done
}

# fix_cmdline FILE: adds the memory cgroup parameters once, removes cgroup_disable=memory.
fix_cmdline() {
    local words=() w have_enable=0 have_memory=0
    read -r -a words <"$1" || true
    local kept=()
    for w in ${words[@]+"${words[@]}"}; do
        case "$w" in
            cgroup_disable=memory) continue ;;
            cgroup_enable=memory) have_enable=1 ;;
            cgroup_memory=1) have_memory=1 ;;
        esac
        kept+=("$w")
    done
    [ "$have_enable" -eq 1 ] || kept+=(cgroup_enable=memory)
    [ "$have_memory" -eq 1 ] || kept+=(cgroup_memory=1)
    printf '%s\n' "${kept[*]}" >"$1"
}

# status_stanza: the dpkg status entry of the package as installed; the conffiles' sums
# are those of the package's files, so the device's own agent.env counts as changed by
# the admin and an upgrade keeps it.
status_stanza() {
    local conf="" f
    while read -r f; do
        [ -n "$f" ] || continue
        conf+=$'\n'" $f $(md5sum <"$common$f" | cut -d' ' -f1)"
    done <"$work/control/conffiles"
    awk '/^Package:/ { print; print "Status: install ok installed"; next } { print }' "$work/control/control"
    printf 'Conffiles:%s\n\n' "$conf"
}

# dbg IMAGE CMD: runs one read-only debugfs command on the root partition.
dbg() { debugfs -R "$2" "$1?offset=$root_off" 2>/dev/null; }

log "preparing the files every image gets"
emit_tree "$common" >"$work/common.cmds"

mkdir -p "$out"
made=0
for i in "${!ids[@]}"; do
    id="${ids[$i]}" url="${brokers[$i]}"
    img="$out/$id.img" tmp="$out/.$id.img.tmp"
    if [ -e "$img" ] && [ "$force" -eq 0 ]; then
        log "$img exists: skipped (--force replaces it)"
        continue
    fi
    log "$id: writing $img"
    dev="$work/dev-$id"
    rm -rf "$dev"
    mkdir -m 0755 "$dev"

    # Identity: a key that never leaves this run but inside the image, and its certificate.
    install -d -m 0755 "$dev/etc/skiff"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dev/etc/skiff/device.key" -out "$work/$id.csr" -subj "/CN=$id" 2>/dev/null ||
        die "$id: openssl could not make a key"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$work/client.ext"
    openssl x509 -req -in "$work/$id.csr" -CA "$ca" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" \
        -days "$days" -extfile "$work/client.ext" -out "$dev/etc/skiff/device.crt" 2>"$work/openssl.err" ||
        die "$id: openssl could not sign the certificate: $(cat "$work/openssl.err")"
    chmod 0600 "$dev/etc/skiff/device.key"
    chmod 0644 "$dev/etc/skiff/device.crt"
    install -m 0644 "$broker_ca" "$dev/etc/skiff/ca.crt"
    install -m 0644 "$controller_pub" "$dev/etc/skiff/controller.pub"
    {
        printf '# /etc/skiff/agent.env of %s, written by images/provision.sh.\n' "$id"
        printf '# "skiff agent --help" lists every option and its variable.\n'
        printf 'SKIFF_MQTT_BROKER=%s\nSKIFF_DEVICE=%s\n' "$url" "$id"
        printf 'SKIFF_CONTROLLER_KEY=/etc/skiff/controller.pub\nSKIFF_MQTT_CA=/etc/skiff/ca.crt\n'
        printf 'SKIFF_MQTT_CERT=/etc/skiff/device.crt\nSKIFF_MQTT_KEY=/etc/skiff/device.key\n'
    } >"$dev/etc/skiff/agent.env"
    chmod 0644 "$dev/etc/skiff/agent.env"
    install -d -m 0755 "$dev/etc/systemd/system/multi-user.target.wants"
    ln -s /lib/systemd/system/skiff.service "$dev/etc/systemd/system/multi-user.target.wants/skiff.service"

    # dpkg's database: the status entry, file list, sums and scripts.
    dbg "$base" "cat /var/lib/dpkg/status" >"$work/status" || true
    if [ -s "$work/status" ]; then
        awk -v RS= -v ORS='\n\n' '!/(^|\n)Package: skiff\n/' "$work/status" >"$work/status.new"
        install -d -m 0755 "$dev/var/lib/dpkg/info"
        status_stanza >>"$work/status.new"
        install -m 0644 "$work/status.new" "$dev/var/lib/dpkg/status"
        install -m 0644 "$work/skiff.list" "$dev/var/lib/dpkg/info/skiff.list"
        install -m 0644 "$work/skiff.md5sums" "$dev/var/lib/dpkg/info/skiff.md5sums"
        install -m 0644 "$work/control/conffiles" "$dev/var/lib/dpkg/info/skiff.conffiles"
        for s in postinst prerm postrm; do
            [ ! -f "$work/control/$s" ] || install -m 0755 "$work/control/$s" "$dev/var/lib/dpkg/info/skiff.$s"
        done
    fi

    cp --sparse=always "$base" "$tmp"
    { cat "$work/common.cmds"; emit_tree "$dev"; } >"$work/cmds"
    debugfs -w -f "$work/cmds" "$tmp?offset=$root_off" >"$work/debugfs.log" 2>&1 ||
        die "$id: debugfs failed: $(tail -5 "$work/debugfs.log")"

    mtype -i "$tmp@@$boot_off" ::cmdline.txt >"$work/cmdline.txt"
    fix_cmdline "$work/cmdline.txt"
    mcopy -o -i "$tmp@@$boot_off" "$work/cmdline.txt" ::cmdline.txt

    # Read back what matters: a debugfs command that failed inside the batch is only a
    # line in its log.
    for f in /usr/bin/skiff /etc/skiff/agent.env /etc/skiff/device.crt /etc/skiff/ca.crt /etc/skiff/controller.pub; do
        src="$dev$f"
        [ -e "$src" ] || src="$common$f"
        cmp -s <(dbg "$tmp" "cat $f") "$src" || die "$id: $f did not land in the image: $(grep -i -m3 'error\|cannot\|no free' "$work/debugfs.log" || true)"
    done
    dbg "$tmp" "stat /etc/skiff/device.key" | grep -q 'Mode:  0600' || die "$id: device.key is not 0600 in the image"
    dbg "$tmp" "stat /etc/skiff/device.key" | grep -q 'User:     0   Group:     0' || die "$id: device.key is not root's in the image"
    [ "$(dbg "$tmp" "stat /etc/systemd/system/multi-user.target.wants/skiff.service" | grep -c 'Type: symlink')" = 1 ] ||
        die "$id: the unit is not enabled in the image"
    mtype -i "$tmp@@$boot_off" ::cmdline.txt | grep -q 'cgroup_enable=memory cgroup_memory=1' ||
        die "$id: cmdline.txt lacks the memory cgroup"
    mv -f "$tmp" "$img"
    made=$((made + 1))
    rm -rf "$dev"
done
log "provisioned $made of ${#ids[@]} device(s) into $out"
