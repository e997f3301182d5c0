"""Fingerprints of the teacher a shard set was written with (part of the shard contract).

The set's metadata records `tokenizer_sha256` and `teacher_fingerprint`; a trainer or an
evaluator recomputes the tokenizer's fingerprint to refuse a student that would map text to
other ids. Both sides compute them here, so they agree by construction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from todi.common.errors import TodiError


class FingerprintError(TodiError, ValueError):
    """A folder that cannot be fingerprinted (no weight files)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), merges and added tokens.

    Two tokenizers with the same fingerprint map text to the same ids, which is what the
    teacher/student contract needs; chat templates and cosmetic settings do not count.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        payload = {
            "vocab": state.get("model", {}).get("vocab"),
            "merges": state.get("model", {}).get("merges"),
            "added": sorted((t["id"], t["content"]) for t in state.get("added_tokens", [])),
        }
    else:  # slow tokenizers: the vocabulary is all we can reach
        payload = {"vocab": tokenizer.get_vocab()}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the folder's weight files (names, sizes, and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in {".safetensors", ".bin"})
    if not files:
        raise FingerprintError(f"{model_dir}: no .safetensors or .bin weight files")
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
