#!/usr/bin/env bash
# Build the service images on the registry-free local base:
#   1. tests/docker/build_base_image.sh (cached: a no-op when the base exists);
#   2. fill docker/wheels/ on the host with the pinned wheels, because builds
#      here cannot reach PyPI themselves (no registry, TLS-intercepted egress);
#      the Dockerfile installs from the wheelhouse alone when it is non-empty;
#   3. fill docker/debs/ with the Debian packages the recorder-pulse image adds
#      (libpulse0 and what it needs beyond the base, and the ALSA pulse plugin's
#      package), so that build needs no network either;
#   4. docker build --target relay|recorder|recorder-pulse|processor with
#      BASE_IMAGE pointing at the local base, tagged as compose.yaml names them.
#
# Environment: AUDIOSOCKETS_BASE_IMAGE (default audiosockets/base:bookworm),
# AUDIOSOCKETS_IMAGE_TAG (default latest), AUDIOSOCKETS_WHEELHOUSE=0 to skip
# step 2 (when the build can reach an index itself), AUDIOSOCKETS_DEBS=0 to
# skip step 3 (when the build can reach a Debian mirror itself).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
base="${AUDIOSOCKETS_BASE_IMAGE:-audiosockets/base:bookworm}"
tag="${AUDIOSOCKETS_IMAGE_TAG:-latest}"
python=${PYTHON:-python3}

AUDIOSOCKETS_BASE_IMAGE="$base" "$here/build_base_image.sh"

if [[ "${AUDIOSOCKETS_WHEELHOUSE:-1}" != 0 ]]; then
    # Wheels for the image's interpreter and platform, not the host's.
    pyver=$(docker run --rm --entrypoint python3 "$base" \
        -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    arch=$(docker run --rm --entrypoint python3 "$base" -c 'import platform; print(platform.machine())')
    glibc=$(docker run --rm --entrypoint python3 "$base" \
        -c 'import platform; print(platform.libc_ver()[1].replace(".", "_"))')
    abi="cp${pyver/./}"
    # Older pips do not expand manylinux_2_N to the older tags it accepts: list them.
    platforms=(--platform any --platform "manylinux2014_$arch")
    for ((minor = 17; minor <= ${glibc#2_}; minor++)); do
        platforms+=(--platform "manylinux_2_${minor}_$arch")
    done
    echo "build_images: wheelhouse for $abi manylinux_${glibc}_$arch in docker/wheels/"
    "$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version "$pyver" --implementation cp --abi "$abi" \
        "${platforms[@]}" \
        -r "$root/docker/requirements.lock" -r "$root/docker/build-requirements.lock" \
        -d "$root/docker/wheels"
fi

if [[ "${AUDIOSOCKETS_DEBS:-1}" != 0 ]] && [[ -z "$(find "$root/docker/debs" -name '*.deb' -print -quit)" ]]; then
    # The recorder-pulse image's packages, resolved by the host's apt against what
    # the base image already has (its dpkg status), so exactly the missing ones
    # are fetched; plus libasound2-plugins itself, of which the image takes only
    # the pulse plugin. Needs a Debian host of the base's release.
    command -v apt-get >/dev/null || { echo "build_images: apt-get needed to fill docker/debs/" >&2; exit 1; }
    echo "build_images: Debian packages for recorder-pulse in docker/debs/"
    status=$(mktemp)
    docker run --rm --entrypoint cat "$base" /var/lib/dpkg/status >"$status"
    mkdir -p "$root/docker/debs/partial"
    apt-get install --quiet --yes --download-only --no-install-recommends \
        -o Dir::State::status="$status" -o Dir::Cache::archives="$root/docker/debs" \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root libpulse0 >/dev/null
    (cd "$root/docker/debs" && apt-get download --quiet -o APT::Sandbox::User=root libasound2-plugins >/dev/null)
    rm -rf "$root/docker/debs/partial" "$root/docker/debs/lock" "$status"
fi

# The engine here has only the classic builder (no buildx); its deprecation
# notice is noise, so the build's output is shown only when it fails.
export DOCKER_BUILDKIT=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The release, for the images' OCI version label (the tag may be a test's own).
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$root/pyproject.toml")
for target in relay recorder recorder-pulse processor; do
    echo "build_images: audiosockets/$target:$tag"
    if ! docker build -f "$root/docker/Dockerfile" --target "$target" \
        --build-arg BASE_IMAGE="$base" --build-arg VERSION="$version" \
        -t "audiosockets/$target:$tag" "$root" >"$log" 2>&1; then
        cat "$log" >&2
        echo "build_images: building target $target failed" >&2
        exit 1
    fi
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' 'audiosockets/*'
