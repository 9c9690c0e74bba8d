#!/usr/bin/env bash
# Build the CPU image with no container registry: bootstrap a Debian bookworm base from Debian's own packages
# (debootstrap), import it as localhost/debian-bootstrap:bookworm, build deploy/docker/Dockerfile.cpu on it
# with buildah, then run the image's `refinery` as its non-root user and generate one image with a tiny model.
#
#   deploy/docker/build-cpu.sh [TAG]        (root; Debian packages debootstrap, buildah, podman)
#
# The base differs from docker.io/library/debian:bookworm-slim only in how it was made (both are Debian
# bookworm's minimal package set); every instruction of the Dockerfile runs as written.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-localhost/refinery:cpu}"
base=localhost/debian-bootstrap:bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! podman image exists "$base"; then
  rootfs="$(mktemp -d)"
  echo "build-cpu: bootstrapping Debian bookworm into $rootfs"
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log"
    rm -rf "$rootfs" "$rootfs.log"
    exit 1
  fi
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
fi

args=(--isolation chroot --network host --layers -f deploy/docker/Dockerfile.cpu -t "$tag"
      --build-arg "BASE_IMAGE=$base")
# A machine whose CPU torch wheel lies on disk (pip's find-links) lends it to the build instead of fetching it.
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  args+=(--volume "$PIP_FIND_LINKS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=)
fi
# A network that reaches PyPI through a TLS-inspecting proxy: the host's CA bundle, for pip, during the build.
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  args+=(--volume "$PIP_CERT:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
echo "build-cpu: buildah bud ${args[*]} ."
buildah bud "${args[@]}" .

# The image as it will run: its entrypoint's program, its user, its environment; one tiny generation.
container="$(buildah from "$tag")"
trap 'buildah rm "$container" >/dev/null' EXIT
run=(buildah run --isolation chroot --user 10001:10001 "$container" --)
"${run[@]}" sh -c 'test "$(id -u)" = 10001 && test -w "$REFINERY_CACHE_DIR"'
if "${run[@]}" env | grep -Eq '^(CIVITAI_TOKEN|HF_TOKEN)='; then
  echo "build-cpu: a token is baked into the image" >&2
  exit 1
fi
"${run[@]}" refinery generate "a lighthouse" --steps 4 --seed 1 -o /tmp/smoke.png
echo "build-cpu: $tag built; entrypoint $(buildah inspect --format '{{.OCIv1.Config.Entrypoint}}' "$tag")"
