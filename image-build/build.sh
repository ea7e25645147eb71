#!/bin/bash
# Build the proxyvm appliance image: out/proxyvm.qcow2 (+ kernel/initrd for direct kernel boot,
# the libvirt sidecar template and a manifest). Run as root on Debian 12: `make image`.
#
# Owns: the whole image pipeline, without Docker and without loop devices or mounts:
#   1. base system   mmdebstrap (minbase + image-build/base-packages.txt) -> a tarball cached under
#                    $CACHE keyed on the package list and the options below (rebuilt only when they
#                    change; ~30 s with a warm network)
#   2. wheels        a wheel of this repo + its dependencies (host pip; dependency wheels cached)
#   3. root tree     the tarball extracted, proxyvm installed offline into /opt/proxyvm (a venv of
#                    the image's own python3.11), image-build/rootfs/ overlaid, units enabled, caches
#                    and the kernel removed from the tree
#   4. disk          FAT boot partition (SYSLINUX installed with mtools, kernel, initrd) + ext4 root
#                    made by `mke2fs -d`, joined into an MBR disk with sfdisk/dd, then a compressed
#                    qcow2
# Must not: touch the host's own system (everything happens under $WORK, $CACHE and $OUT), leave
# a compiler, an SSH server or package caches in the image, or rebuild when nothing changed
# (FORCE=1 rebuilds anyway).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
OUT=${OUT:-$repo/out}
WORK=${WORK:-$here/work}
CACHE=${CACHE:-/var/cache/proxyvm-image}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DISK_SIZE_MIB=${DISK_SIZE_MIB:-2048}
BOOT_SIZE_MIB=${BOOT_SIZE_MIB:-64}
CMDLINE=${CMDLINE:-root=LABEL=proxyvm-root ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 quiet systemd.show_status=auto}
FORCE=${FORCE:-0}

log() { printf '[image %s] %s\n' "$(date +%T)" "$*"; }
die() { printf 'image-build: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, file ownership in the image)"
need=(mmdebstrap mke2fs mkfs.vfat mcopy syslinux sfdisk qemu-img python3 sha256sum)
for t in "${need[@]}"; do
	command -v "$t" >/dev/null || die "$t not found: apt-get install \$(grep -v '^#' .ci/packages-image.txt)"
done
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
[ -r "$MBR_BIN" ] || die "$MBR_BIN missing: apt-get install syslinux-common"

# Host Python that builds the wheels; must be 3.11 like the image's (binary wheels must match).
if [ -z "${BUILD_PYTHON:-}" ]; then
	if [ -x "$repo/.venv/bin/python" ]; then # scripts/bootstrap's venv (CI)
		BUILD_PYTHON=$repo/.venv/bin/python
	else
		if [ ! -x "$CACHE/build-venv/bin/python" ]; then
			mkdir -p "$CACHE"
			python3 -m venv "$CACHE/build-venv" || die "python3 -m venv failed: apt-get install python3-venv"
		fi
		BUILD_PYTHON=$CACHE/build-venv/bin/python
	fi
fi
pyver=$("$BUILD_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || die "$BUILD_PYTHON is Python $pyver; the image runs Debian 12's 3.11"

mkdir -p "$OUT" "$WORK" "$CACHE/wheels"

# ---------------------------------------------------------------- 1. base tarball (cached)
packages=$(grep -v '^\s*#' "$here/base-packages.txt" | xargs | tr ' ' ,)
# Modules the initramfs needs to find the root file system (MODULES=list keeps it small).
initrd_modules="virtio_pci virtio_blk virtio_scsi sd_mod crc32c_intel"
mm_opts=(
	--variant=minbase --mode=root --format=tar
	--include="$packages"
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/lintian/*'
	--setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"'
	--setup-hook='printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/proxyvm.conf"'
	--setup-hook="printf '%s\n' $initrd_modules > \"\$1/usr/share/initramfs-tools/modules.d/proxyvm\""
)
sources=(
	"deb $MIRROR $SUITE main"
	"deb $MIRROR $SUITE-updates main"
	"deb $SECURITY_MIRROR $SUITE-security main"
)
base_key=$(printf '%s\n' "v1" "$SUITE" "${mm_opts[@]}" "${sources[@]}" | sha256sum | cut -c1-16)
base_tar=$CACHE/base-$base_key.tar
if [ ! -s "$base_tar" ]; then
	log "base system: mmdebstrap $SUITE (key $base_key) -> $base_tar"
	rm -f "$base_tar.tmp"
	mmdebstrap "${mm_opts[@]}" "$SUITE" "$base_tar.tmp" "${sources[@]}" </dev/null
	mv "$base_tar.tmp" "$base_tar"
	# Keep only the newest few bases.
	ls -1t "$CACHE"/base-*.tar 2>/dev/null | tail -n +3 | xargs -r rm -f
else
	log "base system: cached $base_tar"
fi

# ---------------------------------------------------------------- up to date?
src_key=$(
	{
		echo "$base_key $DISK_SIZE_MIB $BOOT_SIZE_MIB $CMDLINE"
		cd "$repo"
		find pyproject.toml README.md proxyvm protocols policy image-build \
			-path image-build/work -prune -o -type f ! -name '*.pyc' -print 2>/dev/null |
			LC_ALL=C sort | xargs sha256sum
	} | sha256sum | cut -c1-16
)
if [ "$FORCE" != 1 ] && [ -s "$OUT/proxyvm.qcow2" ] && [ "$(cat "$OUT/.proxyvm.key" 2>/dev/null)" = "$src_key" ]; then
	log "out/proxyvm.qcow2 is up to date (inputs $src_key); FORCE=1 rebuilds"
	exit 0
fi
rm -f "$OUT/.proxyvm.key"

# ---------------------------------------------------------------- 2. wheels
# $WORK/wheels ends up holding exactly the resolved set (proxyvm + dependencies + pip); downloads
# are kept in $CACHE/wheels for the next build.
wheels=$WORK/wheels
rm -rf "$wheels" "$WORK/proxyvm-wheel"
mkdir -p "$wheels" "$WORK/proxyvm-wheel"
# Machine-local pip configurations may name absent mirrors; their warnings are noise here.
quiet_pip() { "$BUILD_PYTHON" -m pip "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }
log "wheels: proxyvm from $repo"
quiet_pip wheel -q --no-deps -w "$WORK/proxyvm-wheel" "$repo"
proxyvm_whl=$(ls "$WORK"/proxyvm-wheel/proxyvm-*.whl)
log "wheels: dependencies (cache $CACHE/wheels)"
quiet_pip wheel -q -w "$wheels" --find-links "$CACHE/wheels" "$proxyvm_whl"
quiet_pip download -q -d "$wheels" --find-links "$CACHE/wheels" --only-binary=:all: pip
find "$wheels" -name '*.whl' ! -name 'proxyvm-*' -exec cp -n {} "$CACHE/wheels/" \;
cp "$proxyvm_whl" "$wheels/"

# ---------------------------------------------------------------- 3. root tree
root=$WORK/rootfs
log "root tree: extracting base"
rm -rf "$root"
mkdir -p "$root"
tar -C "$root" -xpf "$base_tar" --numeric-owner --xattrs --xattrs-include='*'

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

log "root tree: user, venv, proxyvm"
in_root useradd --system --user-group --home-dir /var/lib/proxyvm --no-create-home \
	--shell /usr/sbin/nologin --comment "proxyvm proxy" proxyvm
mkdir -p "$root/tmp/wheels"
cp "$wheels"/*.whl "$root/tmp/wheels/"
pip_whl=$(cd "$root/tmp/wheels" && ls pip-*.whl | sort -V | tail -1)
in_root python3 -m venv --without-pip /opt/proxyvm
# pip runs from its wheel and is not left in the image; everything installs offline from wheels.
in_root /opt/proxyvm/bin/python "/tmp/wheels/$pip_whl/pip" install -q --no-index --no-cache-dir \
	--disable-pip-version-check --find-links /tmp/wheels "/tmp/wheels/$(basename "$proxyvm_whl")"
rm -rf "$root/tmp/wheels"
in_root /opt/proxyvm/bin/python -m compileall -q /opt/proxyvm/lib >/dev/null || true

log "root tree: overlay, units"
cp -a --no-preserve=ownership "$here/rootfs/." "$root/"
chown -R root:root "$root/etc/systemd" "$root/usr/local/sbin" "$root/etc/sysctl.d" \
	"$root/etc/udev/rules.d" "$root/etc/modules-load.d"
chmod 0755 "$root"/usr/local/sbin/*
install -d -m 0700 -o 0 -g 0 "$root/var/lib/proxyvm-config"
rmdir "$root/etc/proxyvm" 2>/dev/null || true
cp "$here/README.md" "$root/opt/proxyvm/README-image.md"
in_root systemctl enable systemd-networkd.service nftables.service proxyvm-config.service \
	proxyvm-gateway.service proxyvm.service proxyvm-status.service proxyvm-growroot.service >/dev/null 2>&1
# Nothing here fetches updates (the image is replaced whole) or needs online ext4 scrubbing.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
	>/dev/null 2>&1 || true
# The appliance has no interactive users; the serial getty stays for `virsh console`, root is locked.
in_root passwd -l root >/dev/null

log "root tree: manifest"
in_root dpkg-query -W -f '${Package} ${Version}\n' >"$WORK/packages.txt"
in_root /opt/proxyvm/bin/python -c 'import importlib.metadata as m; print(*sorted(d.metadata["Name"] + "==" + d.version for d in m.distributions()), sep="\n")' >"$WORK/python.txt"
probe() { in_root /opt/proxyvm/bin/python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null && echo true || echo false; }
has_cli=$(probe proxyvm.cli)
has_dns=$(probe protocols.dns.service)
has_http=$(probe protocols.http.service)
has_gateway=false
if [ "$has_cli" = true ] && in_root /opt/proxyvm/bin/proxyvm gateway --help >/dev/null 2>&1; then has_gateway=true; fi
if in_root dpkg -l gcc cc g++ clang openssh-server dropbear 2>/dev/null | grep -q '^ii'; then
	die "a compiler or SSH server slipped into the image"
fi

log "root tree: cleaning"
kver=$(cd "$root/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -1)
boot=$WORK/boot
rm -rf "$boot"
mkdir -p "$boot"
cp "$root/boot/vmlinuz-$kver" "$boot/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$boot/initrd.img"
# The kernel and initrd live on the boot partition; /boot keeps config and System.map only.
rm -f "$root/boot/vmlinuz-$kver" "$root/boot/initrd.img-$kver" "$root/vmlinuz" "$root/vmlinuz.old" \
	"$root/initrd.img" "$root/initrd.img.old"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
	"$root"/var/lib/dpkg/*-old "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* \
	"$root"/root/.cache
: >"$root/etc/machine-id"
find "$root/opt/proxyvm" -name '*.pyc' -path '*/tests/*' -delete 2>/dev/null || true

# ---------------------------------------------------------------- 4. disk
root_mib=$((DISK_SIZE_MIB - 1 - BOOT_SIZE_MIB))
log "disk: ext4 root ($root_mib MiB) with mke2fs -d"
rm -f "$WORK/root.img" "$WORK/boot.img" "$WORK/disk.img"
mke2fs -q -F -t ext4 -L proxyvm-root -m 1 -d "$root" -E root_owner=0:0 "$WORK/root.img" "${root_mib}M"

log "disk: FAT boot partition ($BOOT_SIZE_MIB MiB) with SYSLINUX"
sed "s|@CMDLINE@|$CMDLINE|" "$here/syslinux.cfg" >"$boot/syslinux.cfg"
# -h: hidden sectors = the partition's start, so the boot sector finds ldlinux.sys on the disk.
mkfs.vfat -n PVMBOOT -h 2048 -C "$WORK/boot.img" $((BOOT_SIZE_MIB * 1024)) >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -i "$WORK/boot.img" "$boot/vmlinuz" "$boot/initrd.img" "$boot/syslinux.cfg" ::/
syslinux --install "$WORK/boot.img"

log "disk: MBR + partitions -> qcow2"
truncate -s "${DISK_SIZE_MIB}M" "$WORK/disk.img"
sfdisk -q --no-reread --no-tell-kernel "$WORK/disk.img" <<EOF
label: dos
label-id: 0x70726f78
start=2048, size=$((BOOT_SIZE_MIB * 2048)), type=c, bootable
start=$(((1 + BOOT_SIZE_MIB) * 2048)), type=83
EOF
dd if="$MBR_BIN" of="$WORK/disk.img" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/boot.img" of="$WORK/disk.img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$WORK/disk.img" bs=1M seek=$((1 + BOOT_SIZE_MIB)) conv=notrunc,sparse status=none
rm -f "$WORK/root.img" "$WORK/boot.img"

rm -f "$OUT/proxyvm.qcow2.tmp"
qemu-img convert -c -O qcow2 -o compression_type=zstd "$WORK/disk.img" "$OUT/proxyvm.qcow2.tmp"
mv "$OUT/proxyvm.qcow2.tmp" "$OUT/proxyvm.qcow2"
rm -f "$WORK/disk.img"
cp "$boot/vmlinuz" "$OUT/proxyvm-vmlinuz"
cp "$boot/initrd.img" "$OUT/proxyvm-initrd.img"
echo "$CMDLINE" >"$OUT/proxyvm-cmdline.txt"

log "libvirt template and manifest"
sed -e "s|@NAME@|proxyvm-sidecar|g" -e "s|@IMAGE@|/var/lib/libvirt/images/proxyvm.qcow2|" \
	-e "s|@CONFIG_DRIVE@|/var/lib/libvirt/images/proxyvm-config.img|" \
	-e "s|@OUTSIDE_NETWORK@|default|" -e "s|@INSIDE_BRIDGE@|pvmbr0|" \
	"$here/sidecar.xml.in" >"$OUT/proxyvm-sidecar.xml"
sed -e "s|@NETWORK@|pvm-inside|g" -e "s|@BRIDGE@|pvmbr0|g" "$here/inside-network.xml.in" \
	>"$OUT/proxyvm-inside-network.xml"
cp "$WORK/packages.txt" "$OUT/proxyvm-packages.txt"
cp "$WORK/python.txt" "$OUT/proxyvm-python.txt"
qcow_bytes=$(stat -c %s "$OUT/proxyvm.qcow2")
used_kib=$(du -sk "$root" | cut -f1)
cat >"$OUT/proxyvm-manifest.json" <<EOF
{
  "inputs": "$src_key",
  "base": "$(basename "$base_tar")",
  "kernel": "$kver",
  "cmdline": "$CMDLINE",
  "qcow2_bytes": $qcow_bytes,
  "disk_mib": $DISK_SIZE_MIB,
  "root_tree_kib": $used_kib,
  "has_cli": $has_cli,
  "has_dns_service": $has_dns,
  "has_http_service": $has_http,
  "has_gateway_cli": $has_gateway
}
EOF
echo "$src_key" >"$OUT/.proxyvm.key"
rm -rf "$root"
log "done: $OUT/proxyvm.qcow2 $((qcow_bytes / 1024 / 1024)) MiB (root tree $((used_kib / 1024)) MiB, kernel $kver)"
