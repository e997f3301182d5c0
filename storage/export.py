"""Export a shard set for other distillation tools: `todi shards export PATH --to hf-dataset OUT`.

`hf-dataset` writes a Hugging Face `datasets` folder (`save_to_disk`; open it with
`datasets.load_from_disk`) in the column layout of axolotl's knowledge-distillation trainer
(`axolotl.integrations.kd`: its KD collator and top-k KD loss), one row per sequence:

- `input_ids` int32[L]: the sequence; `attention_mask` int8[L]: all ones;
- `labels` int32[L]: the token where it is trained (the response; every token of a `text`
  row), else -100;
- `target_token_ids` int32[L][k]: row j holds the teacher's top-k for the token *after* j
  (`input_ids[j + 1]`);
- `target_logprobs` float32[L][k]: their log-probs, **renormalized over the top-k** at the
  export temperature;
- `target_mask` int8[L][k]: 1 where row j is a stored (response) position, i.e. where
  `labels[j + 1] != -100`.

This is the alignment axolotl's trainer consumes: it computes the student's logits at every
position j, gathers them at `target_token_ids[j]`, masks with `target_mask[j]`, and shifts the
labels by one for its CE term. Rows that hold no target (the prompt, the last position) carry
ids `0..k-1`, log-prob -1e9 (axolotl's collator pad value: finite, so never a NaN) and mask 0.

What is lost, and why (axolotl's own choices, matched):
- **the tail bucket.** Our shards keep log-probs normalized over the full vocabulary, so the
  mass outside the top-k (`1 - sum_k p`) is known, and the ToDi loss uses it. axolotl's
  offline KD renormalizes the teacher's top-k into a distribution (its dataset strategy
  divides by their sum; its loss also renormalizes the student over the same k ids by
  default, `kd_normalize_topk`), so the export writes `logp_j - logsumexp_k(logp)` and the
  tail mass is dropped. Each row's dropped mass is in `todi_export.json` only as a summary
  (mean, max).
- **the temperature.** The shard set's log-probs are at its temperature T (applied by the
  teacher over the full vocabulary). axolotl divides the student's logits by `kd_temperature`
  and expects targets at that temperature: set `kd_temperature: T`. `--temperature T2`
  re-tempers the top-k the way axolotl's dataset strategy does (`p^(T / T2)`, renormalized
  over the top-k), which is not the same as a teacher run at T2 (the tail is unknown).
- **sampled sets** (`targets: sampled`) export their listed ids (the exact head, if any, and
  the unique drawn ids) with target log-probs log(w), w the estimator weights (counts / N for
  draws only: RS-KD's sparse target), so axolotl's forward KL on them is unbiased; their
  temperature can only be the set's or one of its `retemper_temperatures`.
- **log-prob precision** is the shard codec's (1/64 nat at most for `rans-q32-v1` / `-v2`).

The export's own metadata (the shard set's, the temperature, the dropped mass) is in
`OUT/todi_export.json` and in the dataset's `info.description`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from todi.common.errors import TodiError
from todi.storage.reader import open_shard_set
from todi.storage.retemper import sample_targets, temperature_index
from todi.storage.schema import Sample, ShardFormatError, ShardSetMetadata

FORMATS = ("hf-dataset",)
PAD_LOGPROB = -1e9  # axolotl's KD collator pads target_logprobs with it (mask 0)
IGNORE_INDEX = -100
EXPORT_INFO = "todi_export.json"


class ExportError(TodiError, ValueError):
    """An export that cannot be made (unknown format, bad temperature, target exists)."""


def _row(sample: Sample, ids: np.ndarray, logprobs: np.ndarray, mask: np.ndarray) -> dict:
    """axolotl's KD columns of one sequence from its stored rows: target ids, target
    log-probs and mask [P, k] at the stored positions; padding elsewhere (mask 0)."""
    tokens = np.asarray(sample.input_ids, dtype=np.int32)
    length, (positions, k) = len(tokens), ids.shape
    first = sample.first_position
    labels = tokens.copy()
    labels[: sample.prompt_len] = IGNORE_INDEX
    target_lp = np.full((length, k), PAD_LOGPROB, dtype=np.float32)
    target_lp[first : first + positions] = logprobs.astype(np.float32)
    target_ids = np.broadcast_to(np.arange(k, dtype=np.int32), (length, k)).copy()
    target_ids[first : first + positions] = ids
    target_mask = np.zeros((length, k), dtype=np.int8)
    target_mask[first : first + positions] = mask
    return {
        "input_ids": tokens,
        "attention_mask": np.ones(length, dtype=np.int8),
        "labels": labels,
        "target_token_ids": target_ids,
        "target_logprobs": target_lp,
        "target_mask": target_mask,
    }


def axolotl_row(sample: Sample, *, temperature_ratio: float = 1.0) -> dict[str, Any]:
    """One shard sample -> one row of axolotl's KD columns (see the module docstring).

    `temperature_ratio` = T_set / T_export: the top-k is re-tempered as p^ratio (axolotl's
    dataset strategy) before it is renormalized."""
    lp = sample.topk_logprobs.astype(np.float64) * temperature_ratio
    lse = np.logaddexp.reduce(lp, axis=1, keepdims=True)
    return _row(sample, sample.topk_ids, lp - lse, np.ones(lp.shape, dtype=np.int8))


def sampled_axolotl_row(sample: Sample, meta: ShardSetMetadata, temperature: float) -> dict:
    """One row of a sampled set (draws, or the hybrid): the listed ids with log(w), w their
    estimator weights (`todi.storage.retemper`; counts / N for draws only: RS-KD's sparse
    target), padded per position with mask 0. axolotl's top-k forward KL on these targets has
    the same expected gradient as the full-vocabulary forward KL."""
    ids, _, w = sample_targets(sample, meta, temperature)
    assert w is not None
    with np.errstate(divide="ignore"):
        logw = np.where(w > 0, np.log(np.maximum(w, 1e-45)), PAD_LOGPROB)
    return _row(sample, ids, logw, (w > 0).astype(np.int8))


def _features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "attention_mask": Sequence(Value("int8")),
            "labels": Sequence(Value("int32")),
            "target_token_ids": Sequence(Sequence(Value("int32"))),
            "target_logprobs": Sequence(Sequence(Value("float32"))),
            "target_mask": Sequence(Sequence(Value("int8"))),
        }
    )


def export_hf_dataset(
    shards: str,
    out: str | Path,
    *,
    temperature: float | None = None,
    max_rows: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the shard set `shards` as an axolotl-KD `datasets` folder at `out`.

    Returns (and writes to `out/todi_export.json`) what was exported: rows, positions, the
    source metadata, the temperatures, and the mean / max top-k mass that the renormalization
    dropped (the tail)."""
    import datasets

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    shard_set = open_shard_set(shards)
    meta = shard_set.signature
    t_set = float(meta.temperature)
    t_out = t_set if temperature is None else float(temperature)
    if not t_out > 0:
        raise ExportError(f"--temperature must be > 0, got {temperature}")
    ratio = t_set / t_out
    sampled = meta.targets == "sampled"
    if sampled:
        try:
            temperature_index(meta, t_out)  # only temperatures the set re-tempers to exactly
        except ShardFormatError as exc:
            raise ExportError(f"--temperature {exc}") from None
    stats = {"rows": 0, "positions": 0, "tail_sum": 0.0, "tail_max": 0.0}

    def rows() -> Iterator[dict[str, Any]]:
        for sample in shard_set:
            if max_rows is not None and stats["rows"] >= max_rows:
                return
            stats["rows"] += 1
            stats["positions"] += int(sample.num_positions)
            if sampled:
                yield sampled_axolotl_row(sample, meta, t_out)
                continue
            mass = np.exp(sample.topk_logprobs.astype(np.float64)).sum(axis=1)
            tail = np.clip(1.0 - mass, 0.0, 1.0)
            stats["tail_sum"] += float(tail.sum())
            stats["tail_max"] = max(stats["tail_max"], float(tail.max(initial=0.0)))
            yield axolotl_row(sample, temperature_ratio=ratio)

    info = {
        "format": "axolotl-kd (hf-dataset)",
        "source": str(shards),
        "shard_metadata": shard_set.metadata,
        "top_k": meta.top_k,
        "shard_temperature": t_set,
        "temperature": t_out,
        "axolotl": {"kd_temperature": t_out, "kd_normalize_topk": True},
        "renormalized_topk": not sampled,
        "targets": meta.targets,
        "pad_logprob": PAD_LOGPROB,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-cache-") as cache:
        ds = datasets.Dataset.from_generator(
            rows,
            features=_features(),
            cache_dir=cache,
            writer_batch_size=64,
            keep_in_memory=False,
        )
        positions = max(stats["positions"], 1)
        info.update(
            rows=stats["rows"],
            positions=stats["positions"],
            dropped_tail_mass_mean=stats["tail_sum"] / positions,
            dropped_tail_mass_max=stats["tail_max"],
        )
        ds.info.description = json.dumps(info)
        ds.save_to_disk(str(out))
        del ds
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1, default=str))
    return info


def export_shards(shards: str, to: str, out: str | Path, **kwargs) -> dict[str, Any]:
    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; expected one of {', '.join(FORMATS)}")
    return export_hf_dataset(shards, out, **kwargs)
