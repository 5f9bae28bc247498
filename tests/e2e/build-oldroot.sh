#!/usr/bin/env bash
# Builds (once) a minimal Debian 11 (bullseye, glibc 2.31) root for the
# package's oldest supported release: tests/e2e/package.rs installs the
# .deb there with dpkg and runs a sync in a chroot (no systemd is booted).
# Cached outside the repository; rebuilt when missing or when the recipe
# changes.
#
# usage: tests/e2e/build-oldroot.sh [CACHE_DIR]   (default /var/cache/driftless-e2e)
# prints the root's path on success.
set -euo pipefail

cache=${1:-/var/cache/driftless-e2e}
recipe="bullseye minbase v1"
root="$cache/bullseye"
stamp="$cache/bullseye.recipe"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && [ -x "$root/usr/bin/dpkg" ]; then
    echo "$root"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$cache"
tmp="$cache/bullseye.tmp"
rm -rf "$tmp"
debootstrap --variant=minbase bullseye "$tmp" "$mirror" >&2
rm -rf "$root"
mv "$tmp" "$root"
echo "$recipe" > "$stamp"
echo "$root"
