#!/usr/bin/env bash
# Builds (once) the Debian rootfs the end-to-end suite boots with
# systemd-nspawn. Cached outside the repository; rebuilt when missing or
# when this script's recipe changes.
#
# usage: tests/e2e/build-rootfs.sh [CACHE_DIR]   (default /var/cache/driftless-e2e)
# prints the rootfs path on success.
set -euo pipefail

cache=${1:-/var/cache/driftless-e2e}
recipe="bookworm minbase systemd systemd-sysv dbus python3 iproute2 procps nginx-light prometheus-node-exporter dpkg-dev v6"
rootfs="$cache/rootfs"
stamp="$cache/rootfs.recipe"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && [ -x "$rootfs/lib/systemd/systemd" ]; then
    echo "$rootfs"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$cache"
tmp="$cache/rootfs.tmp"
rm -rf "$tmp"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,iproute2,procps,nginx-light,prometheus-node-exporter,dpkg-dev \
    bookworm "$tmp" "$mirror" >&2
# Boot quickly and quietly: no getty, no network waits, fixed identity.
echo "e2e" > "$tmp/etc/hostname"
: > "$tmp/etc/machine-id"
rm -f "$tmp/etc/systemd/system/getty.target.wants/"* || true
ln -sf /dev/null "$tmp/etc/systemd/system/systemd-networkd-wait-online.service"
ln -sf /dev/null "$tmp/etc/systemd/system/getty@.service"
ln -sf /dev/null "$tmp/etc/systemd/system/console-getty.service"
# nginx (a real web server for the directory-mode test) starts only when a
# test asks for it: not enabled, no default site.
rm -f "$tmp/etc/systemd/system/multi-user.target.wants/nginx.service" \
      "$tmp/etc/nginx/sites-enabled/default"
# node_exporter (the metrics test reads driftless's textfile through it)
# likewise starts only when asked; its own textfile timers (apt, smartmon,
# …) never run.
rm -f "$tmp/etc/systemd/system/multi-user.target.wants/prometheus-node-exporter.service" \
      "$tmp/etc/systemd/system/timers.target.wants/prometheus-node-exporter-"*
mkdir -p "$tmp/opt/driftless"
rm -rf "$rootfs"
mv "$tmp" "$rootfs"
echo "$recipe" > "$stamp"
echo "$rootfs"
