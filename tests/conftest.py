"""Session-wide real resources: the prepared teacher folder and one local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM on CPU: keep the KV cache small so the engine fits beside Ray and the HF model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct teacher as an HF folder, converted once and cached."""
    from todi.services.models import prepare_model

    return prepare_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def teacher_tokenizer(teacher_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The compose stack's tests run first: while they run, no engine, server or Ray cluster
    of this session competes with the containers for the host's ports, cores and memory."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_compose.py")
