#!/usr/bin/env bash
# Build a minimal Debian bookworm base image from the Debian mirror, for sites (and CI)
# where Docker Hub cannot be reached:
#   deploy/make-base-image.sh [IMAGE_NAME]       (default: ct-triage/debian:bookworm)
# Needs root, debootstrap and a running Docker daemon. The mirror is the host's
# (first URI of /etc/apt/sources.list*, else deb.debian.org). Does nothing when the
# image already exists (set FORCE=1 to rebuild).
set -euo pipefail
name=${1:-ct-triage/debian:bookworm}
if [ -z "${FORCE:-}" ] && docker image inspect "$name" >/dev/null 2>&1; then
  echo "$name exists"
  exit 0
fi
mirror=${DEBIAN_MIRROR:-$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* \
  2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)}
mirror=${mirror:-http://deb.debian.org/debian}
dir=$(mktemp -d /var/tmp/ct-triage-rootfs.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "debootstrap bookworm from $mirror ..." >&2
debootstrap --variant=minbase bookworm "$dir" "$mirror" >/dev/null
# The same sources as the mirror, with updates and security, so apt inside builds works.
cat >"$dir/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security} bookworm-security main
SOURCES
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
tar -C "$dir" -c . | docker import -c 'CMD ["/bin/bash"]' - "$name"
echo "built $name" >&2
