"""A row's training targets at a training temperature: the stored entries, re-tempered, with
their estimator weights. The math is docs/method.md ("One capture, any temperature" and
"Sampled targets").

With l the stored log-probs at the capture temperature T_c and s = T_c / T, the teacher at T is

    log p_T(v) = s * l_v - Z(s),   Z(s) = log sum_v exp(s * l_v)
                                        = logaddexp(logsumexp_{v listed} s * l_v,  f(s)),

where f(s) = log sum_{v not listed} exp(s * l_v) is what the set's `tail_logz` column records
for each temperature of `retemper_temperatures`: exact at those temperatures (up to the 1/64
nat rounding of the stored log-probs and float16 for f). At T = T_c nothing changes.

Weights (`target_weights` of a `Batch`; None for top-k sets, which keep the tail bucket):
- draws only (k = 0): w_u = (c_u / N) * p_T(u) / p_Tc(u)   (importance weights; 1 at T = T_c)
- hybrid (k > 0): the exact head w_i = p_T(i); the draws, which came from the capture-time
  mass outside the head (P_rest = 1 - sum_head p_Tc), w_u = P_rest * (c_u / N) * p_T(u) / p_Tc(u)
so that for any per-entry divergence term d, sum_i w_i d_i / p_T(i) estimates sum_v d_v
without bias.
"""

from __future__ import annotations

import math

import numpy as np

from todi.storage.schema import Sample, ShardFormatError, ShardSetMetadata


def temperature_index(meta: ShardSetMetadata, temperature: float) -> int | None:
    """None when `temperature` is the capture temperature, else its column of `tail_logz`;
    ShardFormatError when the set cannot be re-tempered to it."""
    if math.isclose(temperature, meta.temperature, rel_tol=1e-9, abs_tol=0.0):
        return None
    for g, t in enumerate(meta.retemper_temperatures):
        if math.isclose(temperature, t, rel_tol=1e-9, abs_tol=0.0):
            return g
    can = ", ".join(f"{t:g}" for t in (meta.temperature, *meta.retemper_temperatures))
    raise ShardFormatError(
        f"{temperature:g}: the shard set was captured at temperature {meta.temperature:g} and "
        f"records exact re-tempering to {list(meta.retemper_temperatures) or 'none'}; use one "
        f"of {can}, or capture with --retemper {temperature:g} (hf engine)"
    )


def sample_targets(
    sample: Sample, meta: ShardSetMetadata, temperature: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids int64 [P, w], log p_T float32 [P, w], weights float32 [P, w] or None) of one row.

    Top-k sets: w = k and weights None (the trainer's top-k + tail path). Sampled sets: the
    head (if any) then the draws, padded to the row's widest position with weight 0."""
    g = None if temperature is None else temperature_index(meta, temperature)
    head_ids = sample.topk_ids.astype(np.int64)
    head_l = sample.topk_logprobs.astype(np.float64)
    if meta.targets == "topk":
        if g is None:
            return head_ids, sample.topk_logprobs.astype(np.float32), None
        s = meta.temperature / float(temperature)  # type: ignore[arg-type]
        z = _partition(s * head_l, sample, g)
        return head_ids, (s * head_l - z[:, None]).astype(np.float32), None
    if sample.draws is None:
        raise ShardFormatError(f"sample {sample.sample_id!r}: a sampled set's row has no draws")
    d_ids, d_counts, d_l = sample.draws.padded()
    d_l = d_l.astype(np.float64)
    real = d_counts > 0
    frac = d_counts / float(meta.draws)
    rest = np.clip(1.0 - np.exp(head_l).sum(-1), 0.0, 1.0) if head_l.shape[1] else None
    if g is None:
        head_lt, d_lt = head_l, d_l
        ratio = np.ones_like(d_l)
    else:
        s = meta.temperature / float(temperature)  # type: ignore[arg-type]
        listed = np.concatenate([s * head_l, np.where(real, s * d_l, -np.inf)], axis=1)
        z = _partition(listed, sample, g)
        head_lt = s * head_l - z[:, None]
        d_lt = s * d_l - z[:, None]
        ratio = np.exp(d_lt - d_l)
    w_draws = np.where(real, frac * ratio, 0.0)
    if rest is not None:
        w_draws = w_draws * rest[:, None]
    ids = np.concatenate([head_ids, d_ids], axis=1)
    lps = np.concatenate([head_lt, np.where(real, d_lt, 0.0)], axis=1)
    weights = np.concatenate([np.exp(head_lt), w_draws], axis=1)
    return ids, lps.astype(np.float32), weights.astype(np.float32)


def _partition(listed: np.ndarray, sample: Sample, g: int) -> np.ndarray:
    """Z(s) per position [P] from the listed entries' s * l [P, w] and the recorded f(s)."""
    if sample.tail_logz is None:
        raise ShardFormatError(f"sample {sample.sample_id!r}: no tail_logz to re-temper with")
    top = np.max(listed, axis=1, initial=-np.inf)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # a position with nothing listed: log 0 = -inf
        lse = safe + np.log(np.exp(listed - safe[:, None]).sum(1))
    return np.logaddexp(lse, sample.tail_logz[:, g].astype(np.float64))
