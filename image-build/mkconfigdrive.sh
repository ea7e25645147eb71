#!/bin/bash
# Make a proxyvm config drive from a directory, without mounting anything.
#
#   image-build/mkconfigdrive.sh DIR OUT.img          FAT file system labelled PROXYVM (mtools)
#   image-build/mkconfigdrive.sh --iso DIR OUT.iso    ISO 9660 labelled PROXYVM (genisoimage)
#
# DIR holds proxyvm.yaml (required), rules.yaml, secrets/CA/trust-anchor files (top level; they are
# installed in the VM as /etc/proxyvm/NAME, mode 0600, owner proxyvm) and optionally
# network/*.network|*.link|*.netdev (installed in /etc/systemd/network, replacing same-named files).
set -euo pipefail
iso=no
if [ "${1:-}" = --iso ]; then iso=yes; shift; fi
if [ $# -ne 2 ]; then
	echo "usage: $0 [--iso] DIR OUT" >&2
	exit 2
fi
src=$1 out=$2
if [ ! -f "$src/proxyvm.yaml" ]; then
	echo "$0: $src/proxyvm.yaml is missing" >&2
	exit 1
fi
rm -f "$out"
if [ "$iso" = yes ]; then
	genisoimage -quiet -V PROXYVM -J -r -o "$out" "$src"
	exit 0
fi
kib=$(du -sk "$src" | cut -f1)
kib=$(((kib * 2 + 1024 + 1023) / 1024 * 1024)) # room for FAT overhead, whole MiB, >= 1 MiB
mkfs.vfat -n PROXYVM -C "$out" "$kib" >/dev/null
shopt -s nullglob dotglob
items=("$src"/*)
MTOOLS_SKIP_CHECK=1 mcopy -s -p -i "$out" "${items[@]}" ::/
