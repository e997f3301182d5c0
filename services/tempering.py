"""Tempered teacher folders: exact log_softmax(logits / T) from an unchanged engine.

vLLM's prompt log-probs ignore `SamplingParams.temperature` (whatever `logprobs_mode` says;
see docs/environment.md). But for the usual causal LM the logits are linear in the output
of the final norm:

    z = W_head . n(h),     n(h) = rms(h) * g      (RMSNorm with gain g; LayerNorm: ... + b)

so a copy of the model whose final-norm gain (and bias) is divided by T yields z / T exactly,
and any engine serving that copy returns log_softmax(z / T). Scaling the norm (not the head)
is right also when the head is tied to the input embeddings, which must stay unchanged.
Gemma-family norms compute n(h) * (1 + g): there the new gain is (1 + g) / T - 1.

Refused (the head is not linear in the norm output, or we cannot find the norm):
final-logit soft-capping (tanh), a bias on the head, no final norm weight among the known
state-dict names, an architecture whose norm parameterization we do not know, `.bin`
checkpoints. A constant logit scale (Cohere `logit_scale`, Granite `logits_scaling`) is
linear and commutes with 1 / T, so it is allowed.

The new gain is stored in the folder's dtype when that is exact (T a power of two, for a
plain norm); otherwise in float32, which an engine running in float32 uses exactly (a bf16
engine rounds it to bf16, an error of the same size as its own bf16 activations).

CLI: `python -m todi.services.tempering MODEL_DIR --temperature T [--out DIR]` prints the folder,
ready for `vllm serve DIR` (then declare that T to the `remote` backend).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from todi.common.errors import TodiError
from todi.common.paths import publish_dir, todi_home
from todi.services.models import ModelError, resolve_model
from todi.storage.fingerprints import weights_fingerprint

MARKER = "todi_tempered.json"

# Final-norm parameter prefixes by state-dict name (first match wins; exactly one must exist).
FINAL_NORM_PREFIXES = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Phi-3, Gemma, OLMo-2, DeepSeek, Granite, ...
    "model.language_model.norm",  # multimodal wrappers (transformers 5 layout)
    "language_model.model.norm",  # multimodal wrappers (older layout)
    "transformer.ln_f",  # GPT-2, Falcon, BLOOM
    "ln_f",  # GPT-2 checkpoints saved without the "transformer." prefix
    "gpt_neox.final_layer_norm",  # GPT-NeoX / Pythia
    "model.final_layernorm",  # Phi-1/2
    "model.decoder.final_layer_norm",  # OPT
)
HEAD_BIAS_KEYS = ("lm_head.bias", "embed_out.bias", "output.bias")

# Architectures whose final norm is n(h) * g (+ b): dividing g (and b) by T is exact.
PLAIN_NORM_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "olmo2",
        "smollm3",
        "starcoder2",
        "granite",
        "granitemoe",
        "cohere",
        "cohere2",
        "deepseek_v3",
        "gpt2",
        "gpt_neox",
        "falcon",
        "stablelm",
        "opt",
    }
)
# Architectures whose final norm is n(h) * (1 + g).
ONE_PLUS_NORM_TYPES = frozenset({"gemma", "gemma3", "gemma3_text"})


class TemperingError(ModelError):
    """The folder cannot be tempered exactly; the message says why and what to do instead."""


@dataclass(frozen=True)
class NormPlan:
    """Where the final norm lives and how to scale it."""

    keys: tuple[str, ...]  # "<prefix>.weight" and, if present, "<prefix>.bias"
    weight_file: str  # the safetensors file (relative to the folder) holding them
    one_plus: bool  # Gemma-style (1 + g) gain


def _text_config(config: dict) -> dict:
    return {**config, **config.get("text_config", {})} if "text_config" in config else config


def _weight_map(model_dir: Path) -> dict[str, str]:
    """state-dict key -> safetensors file name, from the index or the files' headers."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    mapping: dict[str, str] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            mapping.update(dict.fromkeys(st.keys(), f.name))
    return mapping


def plan_tempering(model_dir: str | Path) -> NormPlan:
    """Find the final norm of a folder, or raise TemperingError saying why it cannot be."""
    model_dir = Path(model_dir)
    config = _text_config(json.loads((model_dir / "config.json").read_text()))
    model_type = str(config.get("model_type", ""))
    refuse = f"{model_dir}: cannot temper this teacher exactly"
    hint = "serve it at temperature 1, or use the hf backend (any temperature)"
    for key in ("final_logit_softcapping", "logit_softcapping"):
        if config.get(key) not in (None, 0, 0.0):
            raise TemperingError(
                f"{refuse}: {key}={config[key]} makes the logits non-linear in the final "
                f"hidden state (tanh soft-capping); {hint}"
            )
    if model_type in ONE_PLUS_NORM_TYPES:
        one_plus = True
    elif model_type in PLAIN_NORM_TYPES:
        one_plus = False
    else:
        raise TemperingError(
            f"{refuse}: the final-norm parameterization of model_type {model_type!r} is not "
            f"known to todi (known: {', '.join(sorted(PLAIN_NORM_TYPES | ONE_PLUS_NORM_TYPES))}); "
            f"{hint}"
        )
    if not list(model_dir.glob("*.safetensors")):
        raise TemperingError(f"{refuse}: only .safetensors checkpoints can be tempered; {hint}")
    wmap = _weight_map(model_dir)
    if bias := [k for k in HEAD_BIAS_KEYS if k in wmap]:
        raise TemperingError(f"{refuse}: the output head has a bias ({bias[0]}); {hint}")
    found = [p for p in FINAL_NORM_PREFIXES if f"{p}.weight" in wmap]
    if len(found) != 1:
        what = "no final norm weight" if not found else f"several candidates {found}"
        raise TemperingError(
            f"{refuse}: {what} among {', '.join(p + '.weight' for p in FINAL_NORM_PREFIXES)}; "
            f"{hint}"
        )
    prefix = found[0]
    keys = tuple(k for k in (f"{prefix}.weight", f"{prefix}.bias") if k in wmap)
    files = {wmap[k] for k in keys}
    if len(files) != 1:
        raise TemperingError(f"{refuse}: final norm split across files {sorted(files)}")
    if one_plus and len(keys) > 1:
        raise TemperingError(f"{refuse}: unexpected bias on a (1 + g) norm ({keys[1]}); {hint}")
    return NormPlan(keys=keys, weight_file=files.pop(), one_plus=one_plus)


def _scaled(tensor, temperature: float, one_plus: bool):
    """The new parameter: g / T (or (1 + g) / T - 1), in the original dtype if exact."""
    import torch

    x = tensor.to(torch.float64)
    new = (1.0 + x) / temperature - 1.0 if one_plus else x / temperature
    same = new.to(tensor.dtype)
    if torch.equal(same.to(torch.float64), new):
        return same
    return new.to(torch.float32)


def _temperature_tag(temperature: float) -> str:
    return repr(float(temperature))


def check_temperature(temperature: float) -> float:
    """`temperature` as a float, or TemperingError unless it is finite and > 0."""
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise TemperingError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def temper_model_dir(
    model_dir: str | Path, temperature: float, out: str | Path | None = None
) -> Path:
    """Write (atomically, idempotently) a copy of `model_dir` that serves temperature T.

    `out` defaults to the cache, `todi_home()/tempered/<weights fingerprint[:16]>-T<T>/`.
    T = 1 returns `model_dir` itself (nothing to change).
    """
    src = resolve_model(model_dir)
    temperature = check_temperature(temperature)
    if temperature == 1.0 and out is None:
        return src
    plan = plan_tempering(src)
    fingerprint = weights_fingerprint(src)
    if out is None:
        out = todi_home() / "tempered" / f"{fingerprint[:16]}-T{_temperature_tag(temperature)}"
    out = Path(out)
    expected = {
        "source_weights_sha256": fingerprint,
        "temperature": temperature,
        "norm_keys": list(plan.keys),
        "one_plus": plan.one_plus,
    }
    if _is_done(out, expected):
        return out
    if (out / MARKER).is_file():
        if out.parent != todi_home() / "tempered":
            raise TemperingError(f"{out} already holds a different tempered model; choose --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TemperingError(f"{out} exists and is not a tempered model folder; choose --out")

    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # Everything but the one rewritten weight file is copied unchanged (config, tokenizer,
    # chat template, other shards); copies, not links, so the source can change safely.
    shutil.copytree(
        src, tmp, ignore=shutil.ignore_patterns(plan.weight_file, MARKER, "todi_prepared.json")
    )
    with safe_open(src / plan.weight_file, "pt") as st:
        metadata = st.metadata() or {"format": "pt"}
        tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - not a dict
    stored = {}
    for key in plan.keys:
        tensors[key] = _scaled(tensors[key], temperature, plan.one_plus and key.endswith("weight"))
        stored[key] = str(tensors[key].dtype).removeprefix("torch.")
    save_file(tensors, tmp / plan.weight_file, metadata=metadata)
    index = tmp / "model.safetensors.index.json"
    if index.is_file():  # keep total_size right if a parameter became float32
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(
            _tensor_bytes(tmp / f) for f in sorted(set(data["weight_map"].values()))
        )
        index.write_text(json.dumps(data, indent=2))
    del tensors
    (tmp / MARKER).write_text(
        json.dumps({**expected, "source": str(src), "stored_dtype": stored}, indent=2)
    )
    return publish_dir(tmp, out, lambda path: _is_done(path, expected))


def _is_done(out: Path, expected: dict) -> bool:
    try:
        done = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(done.get(k) == v for k, v in expected.items())


def _tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(path, "pt") as st:
        for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
            sl = st.get_slice(k)
            shape = sl.get_shape()
            n = math.prod(shape) if shape else 1
            total += n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def tempered_model_dir(model_dir: str | Path, temperature: float) -> Path:
    """The cached tempered copy of `model_dir` for temperature T (made on first use)."""
    return temper_model_dir(model_dir, temperature)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m todi.services.tempering",
        description="Write a copy of an HF teacher folder whose prompt log-probs are "
        "log_softmax(logits / T) in any engine (for `vllm serve`).",
    )
    parser.add_argument("model", help="HF model folder or embedded model name")
    parser.add_argument("--temperature", "-t", type=float, required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: the todi cache")
    args = parser.parse_args(argv)
    try:
        print(temper_model_dir(args.model, args.temperature, args.out))
    except TodiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
