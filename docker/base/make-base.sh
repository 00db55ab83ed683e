#!/usr/bin/env bash
# Makes the offline base image (default shard-base:bookworm): a minimal Debian bookworm
# with Python 3.11 and venv, built with debootstrap from the Debian mirror and imported
# into Docker. For hosts that reach no container registry; where one is reachable, build
# FROM a public image instead (README, "Run with Docker").
# Usage: docker/base/make-base.sh [IMAGE] [MIRROR]   (needs root and debootstrap)
set -euo pipefail
IMAGE=${1:-shard-base:bookworm}
MIRROR=${2:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists; remove it to rebuild"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
# python3-venv brings ensurepip's bundled pip, which installs the wheelhouse offline.
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$ROOTFS" "$MIRROR"
# Package lists and caches only add size; the image installs nothing from apt later.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "made $IMAGE"
