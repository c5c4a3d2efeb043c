#!/usr/bin/env bash
# Build the SecureLLM container image without a container registry.
#
#   scripts/docker-image.sh base    make (once per machine) the base image and print its tag
#   scripts/docker-image.sh image   base + an image of the binaries built on this host, tagged
#                                   $SECURELLM_IMAGE (default securellm:latest); prints the tag
#
# The base image is a `debootstrap --variant=minbase` of this host's Debian release (so the host's
# binaries find the same glibc) with the few runtime packages below, imported with `docker import`.
# The root filesystem tarball is cached by content under
# ${SECURELLM_CACHE_DIR:-~/.cache/securellm}/docker-base/ (keyed by a hash of the release, the
# package list and the trimming steps), and the image is tagged with that hash: a second run finds
# the image (or imports the cached tarball) and debootstraps nothing. Nothing is pulled.
#
# The image stage (docker/prebuilt.Dockerfile) copies the service binaries, the CLI and
# llama-server (scripts/install-llama-server.sh, portable x86-64, static) from a staging folder.
#
#   BIN             binaries to copy (default ./target/release; the tests use ./target/debug)
#   LLAMA_SERVER    llama-server to copy (default: scripts/install-llama-server.sh's)
#   DEBIAN_SUITE    the release to debootstrap (default: this host's VERSION_CODENAME, else bookworm)
#   DEBIAN_MIRROR   (default http://deb.debian.org/debian)
#   SECURELLM_IMAGE the tag to build (default securellm:latest)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE_DIR="${SECURELLM_CACHE_DIR:-$HOME/.cache/securellm}"
HOST_SUITE="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
SUITE="${DEBIAN_SUITE:-${HOST_SUITE:-bookworm}}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# libgomp1: llama-server's OpenMP; ca-certificates: TLS to cloud upstreams; libstdc++6 and the
# shell come with minbase (healthchecks run `securellm health` directly, no shell needed).
PACKAGES="libgomp1,ca-certificates"
# Bump when the trimming below changes (it is part of the cache key).
RECIPE=1
log() { echo "docker-image: $*" >&2; }

need_docker() {
  if ! docker info >/dev/null 2>&1; then
    log "no Docker engine answers (docker info failed)"
    exit 3
  fi
}

base() {
  need_docker
  local key tag tarball
  key="$(printf '%s\n' "$SUITE" "$PACKAGES" "minbase" "$RECIPE" "$(uname -m)" | sha256sum | cut -c1-16)"
  tag="securellm-base:$SUITE-$key"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    return 0
  fi
  tarball="$CACHE_DIR/docker-base/$SUITE-$key.tar"
  if [ ! -s "$tarball" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
      log "installing debootstrap (Debian package)"
      apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y --no-install-recommends debootstrap >/dev/null; } \
        || { log "debootstrap is missing and could not be installed"; exit 1; }
    fi
    if [ "$(id -u)" != 0 ]; then
      log "debootstrap needs root (run once as root, or with sudo, to make $tarball)"
      exit 1
    fi
    local start
    start=$(date +%s)
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/securellm-rootfs.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    local work="$WORK"
    log "debootstrap --variant=minbase $SUITE (+ $PACKAGES) from $MIRROR: once per machine, a few minutes"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$MIRROR" \
      > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    # What a container never needs: package caches and lists, docs, man pages, locales.
    rm -rf "$work/root/var/cache/apt/"*.bin "$work/root/var/cache/apt/archives/"*.deb \
      "$work/root/var/lib/apt/lists/"* "$work/root/usr/share/doc" "$work/root/usr/share/man" \
      "$work/root/usr/share/info" "$work/root/usr/share/locale" "$work/root/var/log/"*
    mkdir -p "$CACHE_DIR/docker-base"
    tar --numeric-owner -C "$work/root" -cf "$tarball.tmp.$$" .
    mv -f "$tarball.tmp.$$" "$tarball"
    rm -rf "$work"
    log "root filesystem cached: $tarball ($(du -h "$tarball" | cut -f1), $(( $(date +%s) - start )) s)"
  fi
  docker import --change 'CMD ["/bin/sh"]' -m "debootstrap minbase $SUITE + $PACKAGES" \
    "$tarball" "$tag" >/dev/null
  log "imported $tag"
  echo "$tag"
}

image() {
  local base_tag bin llama ctx tag
  base_tag="$(base)"
  bin="${BIN:-$ROOT/target/release}"
  llama="${LLAMA_SERVER:-$("$ROOT/scripts/install-llama-server.sh" | tail -n 1)}"
  tag="${SECURELLM_IMAGE:-securellm:latest}"
  # The staging folder is the whole build context: only what the image needs.
  ctx="${CARGO_TARGET_DIR:-$ROOT/target}/docker-context"
  rm -rf "$ctx"
  mkdir -p "$ctx/bin"
  for b in vram-scheduler registry backend-manager securellm-gateway securellm; do
    [ -x "$bin/$b" ] || { log "missing $bin/$b (build it first: make release, or cargo build)"; exit 1; }
    cp -f "$bin/$b" "$ctx/bin/$b"
  done
  if [ -x "$bin/securellm-mcp" ]; then cp -f "$bin/securellm-mcp" "$ctx/bin/"; fi
  cp -f "$llama" "$ctx/bin/llama-server"
  cp -f "$ROOT/docker/prebuilt.Dockerfile" "$ctx/Dockerfile"
  log "building $tag from $base_tag and $bin"
  local before after
  before="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  docker build -q --build-arg "BASE_IMAGE=$base_tag" -t "$tag" "$ctx" >/dev/null
  after="$(docker image inspect -f '{{.Id}}' "$tag")"
  # The image this tag named before is now untagged: remove it (each rebuild would otherwise
  # leave a few hundred MB behind); one a container still uses stays.
  if [ -n "$before" ] && [ "$before" != "$after" ]; then
    docker rmi "$before" >/dev/null 2>&1 || true
  fi
  echo "$tag"
}

case "${1:-}" in
  base) base ;;
  image) image ;;
  *) echo "usage: $0 base|image" >&2; exit 2 ;;
esac
