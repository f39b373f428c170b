#!/usr/bin/env bash
# Builds the image the Dockerfile and the end-to-end tests start FROM, without a registry:
# a minimal Debian bookworm root filesystem with Python, imported into the local engine.
# Cached: does nothing when the image already exists.
set -euo pipefail
image="${1:-sidecar-base:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image already present"
    exit 0
fi
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
rootfs="$(mktemp -d /tmp/sidecar-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,tini,procps \
    bookworm "$rootfs" >/tmp/debootstrap.log 2>&1 || { tail -20 /tmp/debootstrap.log; exit 1; }
# pip inside containers needs the host's CA bundle to reach the package index.
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
# Keep the host's pip configuration (package index location) inside builds.
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$rootfs/etc/pip.conf"; fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image imported"
