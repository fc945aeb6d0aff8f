#!/usr/bin/env bash
# Build the local base image audiosockets/base:bookworm without any registry:
# debootstrap a Debian bookworm minbase root with python3, python3-venv,
# libportaudio2, ca-certificates and tini, then `docker import` it.
#
# Cached twice: if the image exists the script exits at once; if only the
# rootfs tarball exists (image pruned), it is imported again without
# bootstrapping. Safe to run concurrently (flock on the cache dir).
#
# Environment:
#   AUDIOSOCKETS_BASE_IMAGE   image name      (default audiosockets/base:bookworm)
#   AUDIOSOCKETS_CACHE_DIR    cache directory (default /var/cache/audiosockets)
#   AUDIOSOCKETS_DEBIAN_MIRROR mirror URL     (default: the host's apt mirror, else deb.debian.org)
#   AUDIOSOCKETS_REBUILD_BASE=1  ignore both caches
set -euo pipefail

image="${AUDIOSOCKETS_BASE_IMAGE:-audiosockets/base:bookworm}"
cache="${AUDIOSOCKETS_CACHE_DIR:-/var/cache/audiosockets}"
suite=bookworm
packages=python3,python3-venv,libportaudio2,ca-certificates,tini
rebuild="${AUDIOSOCKETS_REBUILD_BASE:-0}"

die() { echo "build_base_image: $*" >&2; exit 1; }

if [[ "$rebuild" != 1 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "build_base_image: $image already present"
    exit 0
fi

command -v docker >/dev/null || die "docker is not installed"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[[ $(id -u) == 0 ]] || die "debootstrap needs root"

host_mirror() {
    # First Debian mirror apt uses on this host (deb822 or one-line format).
    local line
    line=$(grep -rhoE '^(URIs:\s*|deb\s+(\[[^]]*\]\s+)?)https?://[^ ]+/debian/?(\s|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n1 || true)
    line=${line#URIs:}
    line=${line#deb}
    line=$(echo "$line" | sed -E 's/\[[^]]*\]//; s/^\s+//; s/\s+$//')
    echo "${line:-http://deb.debian.org/debian}"
}
mirror="${AUDIOSOCKETS_DEBIAN_MIRROR:-$(host_mirror)}"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Another run may have finished while we waited for the lock.
if [[ "$rebuild" != 1 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "build_base_image: $image already present"
    exit 0
fi

tarball="$cache/rootfs-$suite.tar"
if [[ "$rebuild" == 1 || ! -s "$tarball" ]]; then
    rootfs="$cache/rootfs-$suite"
    rm -rf "$rootfs" "$tarball.tmp"
    echo "build_base_image: debootstrap $suite from $mirror into $rootfs"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"
    # The image needs no package lists, caches, docs or man pages; apt can
    # fetch lists again (`apt-get update`) when a Dockerfile installs more.
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/tmp/* "$rootfs"/root/.cache
    # Message catalogues: the services log in English; C.UTF-8 is built into glibc.
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    # The same apt sources a Debian image would have, so `apt-get update` works.
    echo "deb $mirror $suite main" >"$rootfs/etc/apt/sources.list"
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
fi

echo "build_base_image: importing $tarball as $image"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $suite minbase + $packages" \
    "$tarball" "$image" >/dev/null
docker image inspect "$image" --format 'build_base_image: {{index .RepoTags 0}} {{.Size}} bytes'
