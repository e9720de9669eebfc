#!/usr/bin/env bash
# Builds corral's test guest from Debian packages only, into a cache directory:
#
#   guest/build.sh [OUT_DIR]          (default: $CORRAL_GUEST_DIR, else ./.cache/guest)
#
# Outputs in OUT_DIR (see guest/README.md for the contract of each):
#   vmlinuz        the Debian kernel that `linux-image-amd64` currently resolves to
#   vmlinux        the same kernel uncompressed, booted through its PVH entry (3x faster under TCG)
#   initramfs.gz   busybox-static + that kernel's virtio/ACPI-button modules + guest/init
#   tiny.qcow2     a small blank qcow2 disk (64 MiB virtual)
#   tiny.json      the image's metadata: direct kernel boot of vmlinux (else vmlinuz) + initramfs
#   build.stamp    the inputs the outputs were built from
#
# Nothing is installed on the host: the kernel package is fetched with `apt-get download` and
# unpacked with `dpkg -x` into a temporary directory. The build is idempotent and cached: when
# build.stamp matches the current inputs (kernel package and version, busybox binary, guest/init,
# this script) it does nothing. The extracted kernel is kept per version under OUT_DIR/kernel/, so
# editing guest/init does not download the kernel again. Concurrent builds of one OUT_DIR are
# serialised with flock. Needs: apt-get, dpkg, busybox-static, gzip, qemu-img (scripts/host-deps.sh).
set -euo pipefail

GUEST_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-${CORRAL_GUEST_DIR:-./.cache/guest}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUSYBOX="${CORRAL_BUSYBOX:-/bin/busybox}"
META_PKG="linux-image-amd64"
CMDLINE="console=ttyS0 quiet"
# Load order: each module needs symbols of the ones before it (busybox insmod does no deps).
# virtio_blk gives /dev/vda; failover..virtio_net give NICs; button+evdev give the ACPI power
# button as an input device that busybox acpid watches.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
    failover net_failover virtio_net button evdev)

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg gzip qemu-img flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/host-deps.sh)"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: install busybox-static (scripts/host-deps.sh)"
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked: install busybox-static"

exec 9>"$OUT/.lock"
flock 9

# -- resolve the kernel package: linux-image-amd64 -> linux-image-6.1.0-N-amd64 -------------

candidate_field() {  # candidate_field PACKAGE FIELD: one field of the candidate version
    apt-cache show --no-all-versions "$1" 2>/dev/null |
        awk -v f="$2:" '$1 == f { sub(/^[^:]*: */, ""); print; exit }'
}

resolve_kernel() {
    # One apt-cache call when it can be (each takes about a second): the metapackage depends
    # on "linux-image-6.1.0-N-amd64 (= VERSION)".
    local dep
    dep="$(candidate_field "$META_PKG" Depends | tr ',|' '\n\n' | sed 's/^ *//' |
        grep -E '^linux-image-[0-9][^ ]*-amd64( |$)' | head -n1 || true)"
    KERNEL_PKG="${dep%% *}"
    KERNEL_VERSION=""
    case "$dep" in
        *"(= "*")"*) KERNEL_VERSION="${dep#*(= }" KERNEL_VERSION="${KERNEL_VERSION%%)*}" ;;
    esac
    if [ -n "$KERNEL_PKG" ] && [ -z "$KERNEL_VERSION" ]; then
        KERNEL_VERSION="$(candidate_field "$KERNEL_PKG" Version)"
    fi
    [ -n "$KERNEL_PKG" ] && [ -n "$KERNEL_VERSION" ]
}

if ! resolve_kernel; then
    if [ "$(id -u)" -eq 0 ]; then
        log "$META_PKG unknown to apt: running apt-get update"
        apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed"
    fi
    if ! resolve_kernel; then
        if [ -f "$OUT/build.stamp" ] && [ -f "$OUT/tiny.json" ]; then
            log "cannot resolve $META_PKG with apt; keeping the guest already in $OUT"
            exit 0
        fi
        die "cannot resolve $META_PKG to a kernel package (apt-get update as root, then retry)"
    fi
fi

hash_of() { sha256sum "$1" | cut -d' ' -f1; }
STAMP="kernel=$KERNEL_PKG=$KERNEL_VERSION
busybox=$(hash_of "$BUSYBOX")
init=$(hash_of "$GUEST_SRC/init")
build=$(hash_of "$GUEST_SRC/build.sh")
cmdline=$CMDLINE"

if [ -f "$OUT/build.stamp" ] && [ "$(cat "$OUT/build.stamp")" = "$STAMP" ] &&
    [ -f "$OUT/initramfs.gz" ] && [ -f "$OUT/tiny.qcow2" ] && [ -f "$OUT/tiny.json" ] &&
    { [ -f "$OUT/vmlinux" ] || [ -f "$OUT/vmlinuz" ]; }; then
    log "up to date in $OUT ($KERNEL_PKG $KERNEL_VERSION)"
    exit 0
fi

WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# -- the kernel and its modules, kept per package version ----------------------------------

# extract_vmlinux VMLINUZ CONFIG OUT: the uncompressed ELF kernel inside a bzImage. QEMU boots
# such an ELF through its PVH entry point (CONFIG_PVH), skipping the bzImage decompressor,
# which under TCG takes ~6 s of the ~10 s boot. Fails when the kernel cannot boot that way.
extract_vmlinux() {
    local magic tool off
    grep -q '^CONFIG_PVH=y' "$2" || return 1
    case "$(grep -E '^CONFIG_KERNEL_(XZ|ZSTD|GZIP)=y' "$2")" in
        *XZ*) magic=$'\xfd7zXZ' tool="xz" ;;
        *ZSTD*) magic=$'\x28\xb5\x2f\xfd' tool="zstd" ;;
        *GZIP*) magic=$'\x1f\x8b\x08' tool="gzip" ;;
        *) return 1 ;;
    esac
    command -v "$tool" >/dev/null || return 1
    for off in $(LC_ALL=C grep -abo "$magic" "$1" | cut -d: -f1); do
        # The compressed stream is followed by more of the bzImage: the decompressor complains
        # about that trailing data after writing the whole kernel, so its status is ignored.
        tail -c +$((off + 1)) "$1" | "$tool" -dc >"$3" 2>/dev/null || true
        [ "$(head -c 4 "$3" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ] && return 0
    done
    return 1
}

KDIR="$OUT/kernel/${KERNEL_PKG}_${KERNEL_VERSION}"
if [ ! -f "$KDIR/complete" ]; then
    log "downloading $KERNEL_PKG $KERNEL_VERSION"
    mkdir -p "$WORK/deb" "$WORK/root"
    # apt's _apt sandbox user may not write to our directory; the download is verified anyway.
    (cd "$WORK/deb" && apt-get -q -o APT::Sandbox::User=root download \
        "$KERNEL_PKG=$KERNEL_VERSION" >/dev/null) || die "apt-get download $KERNEL_PKG failed"
    dpkg -x "$WORK"/deb/*.deb "$WORK/root"
    rm -rf "$KDIR"
    mkdir -p "$KDIR/modules"
    vmlinuz="$(find "$WORK/root/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)"
    [ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $KERNEL_PKG"
    cp "$vmlinuz" "$KDIR/vmlinuz"
    config="$(find "$WORK/root/boot" -maxdepth 1 -name 'config-*' | head -n1)"
    if [ -n "$config" ] && extract_vmlinux "$vmlinuz" "$config" "$KDIR/vmlinux"; then
        log "extracted an uncompressed PVH-bootable vmlinux"
    else
        rm -f "$KDIR/vmlinux"
        log "no PVH-bootable vmlinux: booting the compressed vmlinuz (slower under TCG)"
    fi
    for mod in "${MODULES[@]}"; do
        found="$(find "$WORK/root/lib/modules" -type f \( -name "$mod.ko" -o -name "$mod.ko.xz" \
            -o -name "$mod.ko.zst" -o -name "$mod.ko.gz" \) | head -n1)"
        [ -n "$found" ] || die "module $mod not found in $KERNEL_PKG"
        case "$found" in
            *.ko.xz) unpack=(xz -dc) ;;
            *.ko.zst) unpack=(zstd -qdc) ;;
            *.ko.gz) unpack=(gzip -dc) ;;
            *) unpack=(cat) ;;
        esac
        command -v "${unpack[0]}" >/dev/null || die "${unpack[0]} is needed to unpack $found"
        "${unpack[@]}" "$found" >"$KDIR/modules/$mod.ko"
    done
    touch "$KDIR/complete"
    rm -rf "$WORK/deb" "$WORK/root"
fi

# -- the initramfs -------------------------------------------------------------------------

log "building initramfs with $KERNEL_PKG $KERNEL_VERSION"
R="$WORK/initramfs"
mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,var/log,lib/modules,etc/acpi/PWRF}
cp "$BUSYBOX" "$R/bin/busybox"
# Every applet as /bin/NAME: one PATH entry in the guest, whatever busybox's own layout.
"$BUSYBOX" --list | while read -r applet; do
    [ "$applet" = "busybox" ] || ln -sf busybox "$R/bin/$applet"
done
cp "$KDIR"/modules/*.ko "$R/lib/modules/"
printf '%s\n' "${MODULES[@]}" >"$R/etc/corral-modules"
install -m 0755 "$GUEST_SRC/init" "$R/init"
cat >"$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# Run by busybox acpid on the ACPI power button (QMP system_powerdown): power off cleanly.
echo "corral-guest: power button, powering off" >/dev/console
sync
poweroff -f
EOF
chmod 0755 "$R/etc/acpi/PWRF/00000080"
# The kernel opens /dev/console before /init runs; without the node (mknod needs root) /init
# re-attaches to the console itself once devtmpfs is mounted.
mknod -m 0600 "$R/dev/console" c 5 1 2>/dev/null || true
# Fixed owners and times keep the build host's users and clock out of the guest.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
    "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n >"$WORK/initramfs.gz"

# -- the disk image and its metadata -------------------------------------------------------

qemu-img create -q -f qcow2 "$WORK/tiny.qcow2" 64M
# Hard links where the filesystem allows: vmlinux is ~66 MB.
ln -f "$KDIR/vmlinuz" "$WORK/vmlinuz" 2>/dev/null || cp "$KDIR/vmlinuz" "$WORK/vmlinuz"
BOOT_KERNEL="vmlinuz"
if [ -f "$KDIR/vmlinux" ]; then
    ln -f "$KDIR/vmlinux" "$WORK/vmlinux" 2>/dev/null || cp "$KDIR/vmlinux" "$WORK/vmlinux"
    BOOT_KERNEL="vmlinux"
fi
cat >"$WORK/tiny.json" <<EOF
{
  "format": "qcow2",
  "disk": "tiny.qcow2",
  "boot": "direct-kernel",
  "kernel": "$BOOT_KERNEL",
  "initrd": "initramfs.gz",
  "cmdline": "$CMDLINE",
  "kernel_package": "$KERNEL_PKG",
  "kernel_version": "$KERNEL_VERSION"
}
EOF

# Outputs replace the old ones one by one; the stamp goes last, so an interrupted build is
# never mistaken for a complete one.
rm -f "$OUT/build.stamp"
# rm first: the new file may be a hard link to the old one, which mv refuses to move onto.
for f in vmlinuz vmlinux initramfs.gz tiny.qcow2 tiny.json; do
    rm -f "$OUT/$f"
    [ ! -f "$WORK/$f" ] || mv "$WORK/$f" "$OUT/$f"
done
# Kernels of other versions are no longer needed.
find "$OUT/kernel" -mindepth 1 -maxdepth 1 ! -path "$KDIR" -exec rm -rf {} +
printf '%s\n' "$STAMP" >"$OUT/build.stamp.tmp"
mv -f "$OUT/build.stamp.tmp" "$OUT/build.stamp"
log "built in $OUT: $BOOT_KERNEL initramfs.gz tiny.qcow2 tiny.json"
