"""Students: load an HF folder, or build one from a teacher's layers or from a config.

SPEC forms (`load_student(spec)`):

- `DIR`                               an HF causal-LM folder (weights + tokenizer);
- `init:teacher=DIR,layers=N`         N evenly spaced decoder layers of the teacher in DIR
                                      (indices round(i * (L - 1) / (N - 1)), i = 0..N-1, so the
                                      first and last layers are always kept) plus its
                                      embeddings, final norm and head. The teacher's weight
                                      files are read once, tensor by tensor; the teacher is
                                      never instantiated or run. Tokenizer: the teacher's;
- `init:config=FILE[,tokenizer=DIR]`  random initialization (seeded) from a config JSON; the
                                      tokenizer comes from DIR, else from FILE's folder.

`describe_student(spec)` answers the pre-flight questions (head size, tokenizer) from the
config and tokenizer alone, without building any weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from todi.common.errors import TodiError

_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<idx>\d+)(?P<post>\..*)$")
_PER_LAYER_LISTS = ("layer_types",)  # config lists with one entry per decoder layer


class StudentError(TodiError, ValueError):
    """A student SPEC that cannot be used; the message names the SPEC part at fault."""


@dataclass(frozen=True)
class StudentSpec:
    kind: str  # "folder" | "teacher" | "config"
    path: Path  # the folder, the teacher folder, or the config file
    layers: int | None = None
    tokenizer: Path | None = None

    @property
    def tokenizer_dir(self) -> Path:
        if self.kind in ("folder", "teacher"):
            return self.path
        assert self.tokenizer is not None
        return self.tokenizer


@dataclass(frozen=True)
class StudentInfo:
    """What the trainer checks before step one."""

    spec: StudentSpec
    vocab_size: int  # rows of the output head (the logits dimension)
    tokenizer_size: int  # len(tokenizer): ids >= this are padding rows of the head
    tokenizer_sha256: str
    num_layers: int
    pad_id: int


def parse_student_spec(spec: str) -> StudentSpec:
    """Parse a SPEC string (see the module docstring); paths must exist."""
    text = str(spec).strip()
    if not text.startswith("init:"):
        path = Path(text)
        if not (path / "config.json").is_file():
            raise StudentError(f"student {text!r}: not an HF model folder (no config.json)")
        return StudentSpec("folder", path)
    fields: dict[str, str] = {}
    for part in text[len("init:") :].split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise StudentError(f"student {text!r}: expected key=value, got {part!r}")
        fields[key.strip()] = value.strip()
    if "teacher" in fields:
        unknown = set(fields) - {"teacher", "layers"}
        if unknown:
            raise StudentError(f"student {text!r}: unknown key(s) {sorted(unknown)}")
        teacher = Path(fields["teacher"])
        if not (teacher / "config.json").is_file():
            raise StudentError(f"student {text!r}: teacher={teacher} is not an HF model folder")
        try:
            layers = int(fields.get("layers", ""))
        except ValueError:
            raise StudentError(
                f"student {text!r}: layers=N (a positive integer) is required"
            ) from None
        if layers < 1:
            raise StudentError(f"student {text!r}: layers must be >= 1, got {layers}")
        return StudentSpec("teacher", teacher, layers=layers)
    if "config" in fields:
        unknown = set(fields) - {"config", "tokenizer"}
        if unknown:
            raise StudentError(f"student {text!r}: unknown key(s) {sorted(unknown)}")
        config = Path(fields["config"])
        if not config.is_file():
            raise StudentError(f"student {text!r}: config file {config} does not exist")
        tok = Path(fields.get("tokenizer", config.parent))
        if not _has_tokenizer(tok):
            raise StudentError(
                f"student {text!r}: no tokenizer in {tok}; add tokenizer=DIR (the teacher's "
                "folder: a student must share the teacher's tokenizer)"
            )
        return StudentSpec("config", config, tokenizer=tok)
    raise StudentError(
        f"student {text!r}: expected an HF folder, init:teacher=DIR,layers=N or "
        "init:config=FILE[,tokenizer=DIR]"
    )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def layer_indices(total: int, n: int) -> list[int]:
    """N evenly spaced indices of `total` layers, first and last included (sorted, distinct)."""
    if not 1 <= n <= total:
        raise StudentError(f"layers={n}: the teacher has {total} layers (need 1..{total})")
    if n == 1:
        return [total - 1]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def _load_config(spec: StudentSpec):
    from transformers import AutoConfig

    if spec.kind == "config":
        data = json.loads(spec.path.read_text())
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise StudentError(f"{spec.path}: config has no model_type")
        return AutoConfig.for_model(model_type, **data)
    config = AutoConfig.from_pretrained(spec.path)
    if spec.kind == "teacher":
        text = config.get_text_config()
        total = int(text.num_hidden_layers)
        keep = layer_indices(total, int(spec.layers or 0))
        text.num_hidden_layers = len(keep)
        for name in _PER_LAYER_LISTS:
            values = getattr(text, name, None)
            if isinstance(values, list) and len(values) == total:
                setattr(text, name, [values[i] for i in keep])
        config.todi_student_of = {"teacher": str(spec.path), "layers": keep}
    return config


def _head_rows(config) -> int:
    return int(config.get_text_config().vocab_size)


def load_tokenizer(spec: StudentSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.tokenizer_dir)


def describe_student(spec: str | StudentSpec) -> StudentInfo:
    """Head size, tokenizer size and fingerprint, layer count: no weights are built."""
    from todi.storage.fingerprints import tokenizer_fingerprint

    parsed = spec if isinstance(spec, StudentSpec) else parse_student_spec(spec)
    config = _load_config(parsed)
    tokenizer = load_tokenizer(parsed)
    return StudentInfo(
        spec=parsed,
        vocab_size=_head_rows(config),
        tokenizer_size=len(tokenizer),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        num_layers=int(config.get_text_config().num_hidden_layers),
        pad_id=pad_token_id(tokenizer),
    )


def pad_token_id(tokenizer) -> int:
    """The id used to pad batches (masked out anyway): pad, else eos, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def teacher_layer_tensors(folder: Path, keep: list[int]) -> dict[str, Any]:
    """The teacher's tensors a student of layers `keep` needs, renamed (layer keep[i] -> i).

    Read lazily from the safetensors files: the skipped layers are never loaded, nothing is
    instantiated or run. Non-layer tensors (embeddings, final norm, head) are kept as is."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise StudentError(f"{folder}: no .safetensors weight files to build a student from")
    new_index = {src: dst for dst, src in enumerate(keep)}
    out: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                m = _LAYER_KEY.match(key)
                if m is None:
                    out[key] = handle.get_tensor(key)
                elif int(m.group("idx")) in new_index:
                    name = f"{m.group('pre')}{new_index[int(m.group('idx'))]}{m.group('post')}"
                    out[name] = handle.get_tensor(key)
    return out


def build_student(spec: str | StudentSpec, *, seed: int = 0, dtype=None):
    """(model, tokenizer) for SPEC, in `dtype` (default float32: the training master copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    parsed = spec if isinstance(spec, StudentSpec) else parse_student_spec(spec)
    dtype = dtype or torch.float32
    tokenizer = load_tokenizer(parsed)
    if parsed.kind == "folder":
        model = AutoModelForCausalLM.from_pretrained(parsed.path, dtype=dtype)
        return model, tokenizer
    config = _load_config(parsed)
    config.dtype = dtype
    torch.manual_seed(seed)  # init:config is a random init: make it a function of the seed
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if parsed.kind == "teacher":
        keep = config.todi_student_of["layers"]
        state = teacher_layer_tensors(parsed.path, keep)
        result = model.load_state_dict(state, strict=False)
        tied = tied_keys(model)
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise StudentError(
                f"{parsed.path}: teacher weights do not fit the student "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
        if tied:
            model.tie_weights()
    model.to(dtype)
    return model, tokenizer


def tied_keys(model) -> set[str]:
    """Parameter names that share storage with another (e.g. a head tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def load_student(spec: str, *, seed: int = 0, dtype=None):
    """(model, tokenizer) for an HF folder, `init:teacher=DIR,layers=N` or `init:config=FILE`."""
    return build_student(spec, seed=seed, dtype=dtype)


def save_student(model, tokenizer, out: str | Path) -> Path:
    """An HF folder (safetensors, config, tokenizer) that transformers and vLLM load."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def body_and_head(model):
    """(base model returning the last hidden state, head weight [V, H], head bias or None).

    The base model applies the final norm; calling it instead of the CausalLM skips the
    lm_head, so the full [B, T, V] logits never exist (the loss computes them in chunks)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if body is None or head is None or not hasattr(head, "weight"):
        raise StudentError(f"{type(model).__name__}: cannot find the base model and the head")
    if getattr(model.config, "final_logit_softcapping", None):
        raise StudentError(
            f"{type(model).__name__}: logit soft-capping is not a linear head; the chunked "
            "loss needs logits = hidden @ W^T + b"
        )
    return body, head.weight, getattr(head, "bias", None)


def decoder_layers(model) -> list:
    """The student's decoder layers (the units FSDP shards and checkpointing recomputes):
    the ModuleList of the base model with one entry per hidden layer (`model.layers` for
    Llama, Qwen2, Mistral, Gemma)."""
    from torch import nn

    body, _, _ = body_and_head(model)
    n = int(model.config.get_text_config().num_hidden_layers)
    for child in body.children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return list(child)
    raise StudentError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found")
