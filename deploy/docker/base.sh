#!/bin/sh
# The base image of `make images` where no registry is reachable: Debian bookworm by
# debootstrap from Debian's own packages, imported as llm-fleet-base:bookworm. Its Python is
# 3.11, as python:3.11-slim's; libnuma1 is there for vLLM's CPU kernels.
# Usage: deploy/docker/base.sh [TAG] [MIRROR]   (as root: debootstrap needs it)
set -eu
tag=${1:-llm-fleet-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libnuma1 \
    bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | $docker import - "$tag"
