"""Evaluation of a student against the offline teacher: shard metrics and sampled ROUGE-L.

Shard metrics (`evaluate_shards`), over every response position of a held-out shard set,
i.e. every stored position t whose next token x[t+1] is a response token (the prompt and the
padding do not count). At each such position the teacher is known through its stored top-k
(ids S, log-probs normalized over the full vocabulary at the set's temperature T) plus the
tail bucket; the student through its logits z, at the same T:

    fkl   = FKL  of the coarsened (k + 1)-outcome distributions   (todi.trainer.chunked)
    rkl   = RKL  of the same
    todi  = ToDi of the same, with the given beta (alpha_v = sigmoid(beta * log p_v / q_v))
    top1_agreement = [argmax_v z_v == S_1]   (the teacher's rank-1 id; independent of T)
    ce    = -log softmax(z)_{x[t+1]}         (at T = 1, on the shard's token, the label)
    perplexity = exp(ce)                     (of the token-weighted mean ce)
    ece   = expected calibration error of the student's top-1 confidence at T = 1 against
            the label: 15 equal-width bins b = ((b-1)/15, b/15] of conf = max_v softmax(z)_v,
            ECE = sum_b (n_b / n) |acc_b - conf_b| (acc_b: share of argmax_v z_v == label,
            conf_b: mean conf in bin b); `calibration` holds the bins' counts, acc and conf.

Sampled targets (batches with `target_weights`, docs/method.md "Sampled targets"): fkl, rkl
and todi are the importance-sampling estimates of the FULL-vocabulary divergences from the
listed ids and weights (`sparse_divergence(weights=)`, no tail bucket); the teacher's top-1 is
the listed (w > 0) id with the largest log-prob, and teacher_topk_mass is the teacher mass of
the distinct listed ids.

With a full-vocabulary teacher (`reference=FullVocabTeacher(...)`, `todi eval
--full-vocab-teacher DIR`), the teacher runs at evaluation time and the same positions also
get the divergences over the WHOLE vocabulary at T = 1 (the models' own distributions,
whatever temperature the shards were made at; no top-k, no tail):

    full_fkl  = sum_v p_v (log p_v - log q_v)      p = softmax(teacher logits), q = softmax(z)
    full_rkl  = sum_v q_v (log q_v - log p_v)
    full_top1_agreement = [argmax_v z_v == argmax_v teacher_v]

Every value is a mean over all response tokens of the whole set (sums, then one division by
the token count), not a mean of per-batch or per-sequence means. Batches hold B * T <=
max_tokens padded tokens; the student's logits are made from the last hidden state and the
output head for `chunk_size` response positions at a time ([chunk, V], never [B, T, V]; a
model whose head is not linear falls back to its own [B, T, V] logits of one batch), so
memory stays flat however large the set.

Generation metric (`rouge_l_eval`): the model answers each prompt (chat template, temperature
sampling) once per seed; each answer is scored against the reference answer with ROUGE-L
F-measure (`rouge-score`, Porter stemming, x 100 as in the ToDi/MiniLLM papers); the score of
a seed is the mean over prompts, and the report gives the mean and the sample standard
deviation (ddof = 1; 0 for one seed) of the per-seed scores.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from todi.common.errors import TodiError
from todi.storage import Batch, ShardSet, ShardSetMetadata, open_shard_set
from todi.trainer.chunked import sparse_divergence
from todi.trainer.data import padding_row

DIVERGENCE_KINDS = ("fkl", "rkl", "todi")
ECE_BINS = 15
"""Equal-width confidence bins on [0, 1] for the expected calibration error."""
DEFAULT_MAX_TOKENS = 2048
# Positions per head chunk here: half the training default (chunked.DEFAULT_CHUNK_SIZE, 1024),
# since evaluation holds the [chunk, V] buffers of three divergences at once.
EVAL_CHUNK_SIZE = 512


class EvalError(TodiError, ValueError):
    """An evaluation that cannot run as asked (mismatched student, bad prompt file...)."""


# --------------------------------------------------------------------------------------------
# Models


def load_model(
    spec: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    resolve: Callable[[str], str] | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a student SPEC, in eval mode on `device`.

    SPEC is whatever `todi.trainer.student.load_student` accepts (an HF folder,
    `init:teacher=DIR,layers=N`, `init:config=FILE`); `resolve` first maps other names to one
    (`todi eval` passes the teacher service's embedded model names, e.g.
    `smollm2-135m-instruct`). `dtype` ("float32", "bfloat16", "float16") defaults to float32:
    exact, and the dtype the shard targets were computed in.
    """
    from todi.trainer.student import load_student

    spec = str(spec)
    if resolve is not None:
        spec = resolve(spec)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvalError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    model, tokenizer = load_student(spec, dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer


def _head_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_compatible(metadata: ShardSetMetadata, model, tokenizer=None) -> int:
    """Refuse a model whose tokenizer or vocabulary differs from the shard set's.

    Returns the vocabulary limit V_lim: the student's softmax runs over head rows
    [0, V_lim) (the trainer's rule, `todi.trainer.data.check_pairing`, so evaluation sees the
    distribution training optimized). With a tokenizer: its fingerprint must equal the set's
    tokenizer_sha256, and the head (V_s rows) and the set's vocab_size (V_t) may both exceed
    len(tokenizer) = V_tok (padded vocabularies such as 151936 vs 152064) but neither may be
    smaller; V_lim = V_tok. Without a tokenizer, V_s must equal V_t, and V_lim = V_s.
    """
    v_s, v_t = _head_size(model), metadata.vocab_size
    if tokenizer is None:
        if v_s != v_t:
            raise EvalError(
                f"vocabulary mismatch: shard set vocab_size {v_t} vs model head {v_s} rows "
                "(pass the tokenizer to apply the padded-vocabulary rule)"
            )
        return v_s
    from todi.storage.fingerprints import tokenizer_fingerprint
    from todi.trainer.data import DataError, check_pairing
    from todi.trainer.student import StudentInfo, StudentSpec, pad_token_id

    info = StudentInfo(
        spec=StudentSpec("folder", Path("<in memory>")),
        vocab_size=v_s,
        tokenizer_size=len(tokenizer),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        num_layers=int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0),
        pad_id=pad_token_id(tokenizer),
    )
    try:
        return check_pairing(metadata, info).vocab_limit
    except DataError as exc:
        raise EvalError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Shard metrics


class FullVocabTeacher:
    """The teacher at evaluation time: its full-vocabulary log-probs (T = 1) at a batch's
    response positions, for the `full_*` metrics.

    `model`: the teacher (an HF causal LM, from `load_model`). `cache=True` keeps each batch's
    log-probs ([n, V] float32, keyed by the batch's sample ids), so evaluating several students
    on the same set runs the teacher once (memory: 4 * V bytes per response token, 0.2 MB at
    V = 49,152)."""

    def __init__(self, model, *, cache: bool = False) -> None:
        self.model = model
        self.head = _linear_head(model)
        self._cache: dict[tuple[str, ...], torch.Tensor] | None = {} if cache else None

    def logprobs(self, batch: Batch, inputs: dict, rows, cols, v_lim: int) -> torch.Tensor:
        """log softmax(teacher logits[:v_lim]) at (rows, cols) of `batch` -> [n, v_lim]."""
        key = tuple(batch.sample_ids)
        if self._cache is not None and key in self._cache:
            hit = self._cache[key]
            if hit.shape == (len(rows), v_lim):
                return hit
        if self.head is not None:
            body, weight, bias = self.head
            states = body(**inputs).last_hidden_state[rows, cols]
            logits = torch.nn.functional.linear(
                states, weight[:v_lim], None if bias is None else bias[:v_lim]
            )
        else:
            logits = self.model(**inputs).logits[rows, cols, :v_lim]
        out = torch.log_softmax(logits.float(), dim=-1)
        if self._cache is not None:
            self._cache[key] = out
        return out


class Calibration:
    """Running calibration bins of the top-1 confidence at T = 1 (`ECE_BINS` equal-width bins:
    bin b holds confidences in (b / bins, (b + 1) / bins], b = 0 .. bins - 1).

        conf_n = max_v softmax(z_n)_v,  correct_n = [argmax_v z_n,v == label_n]
        ECE    = sum_b (n_b / n) |acc_b - conf_b|   (acc_b, conf_b: means over bin b)
    """

    def __init__(self, bins: int = ECE_BINS) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add positions: student logits [n, V] (T = 1) and their labels [n] (long)."""
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
        top, pred = z.max(dim=-1)
        conf = (top - torch.logsumexp(z, dim=-1)).exp().double().cpu()
        b = (conf * self.bins).ceil().long().sub_(1).clamp_(0, self.bins - 1)
        self.count += torch.bincount(b, minlength=self.bins).double()
        self.conf_sum += torch.bincount(b, weights=conf, minlength=self.bins)
        hit = (pred == labels).double().cpu()
        self.correct += torch.bincount(b, weights=hit, minlength=self.bins)

    @property
    def ece(self) -> float:
        n = float(self.count.sum())
        if n == 0:
            return math.nan
        return float((self.correct - self.conf_sum).abs().sum()) / n

    def result(self) -> dict[str, Any]:
        """{"ece", "bins", "count", "accuracy", "confidence"} (per-bin lists; None where empty)."""

        def mean(total: torch.Tensor) -> list[float | None]:
            return [
                float(t / c) if c > 0 else None
                for t, c in zip(total.tolist(), self.count.tolist(), strict=True)
            ]

        return {
            "ece": self.ece,
            "bins": self.bins,
            "count": [int(c) for c in self.count.tolist()],
            "accuracy": mean(self.correct),
            "confidence": mean(self.conf_sum),
        }


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> dict[str, Any]:
    """`Calibration.result()` of one set of positions: logits [n, V] at T = 1, labels [n]."""
    cal = Calibration(bins)
    cal.add(logits, labels)
    return cal.result()


def _listed_teacher_mass(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Teacher mass of the DISTINCT listed ids of sampled targets, per row: [n, k] -> [n]
    (float64). An id listed twice counts once; padding (w = 0) not at all."""
    ids = torch.where(weights > 0, topk_ids, torch.full_like(topk_ids, -1))
    ids, order = ids.sort(dim=-1)
    keep = ids >= 0
    keep[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    return (topk_logprobs.gather(1, order).double().exp() * keep).sum(-1)


@dataclass
class _Sums:
    """Running float64 sums over response tokens (turned into means once, at the end)."""

    full_fkl: float = 0.0
    full_rkl: float = 0.0
    full_agree: int = 0
    fkl: float = 0.0
    rkl: float = 0.0
    todi: float = 0.0
    ce: float = 0.0
    agree: int = 0
    topk_mass: float = 0.0
    weighted: bool = False  # some batch had sampled targets (target_weights)
    tokens: int = 0
    samples: int = 0
    calibration: Calibration = field(default_factory=Calibration)


def _position_stats(
    z: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_lps: torch.Tensor,
    sums: _Sums,
    *,
    beta: float,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> None:
    """Add one chunk of positions (student logits z [c, V]) to `sums`; `weights` [c, k]:
    sampled targets (module docstring)."""
    for kind in DIVERGENCE_KINDS:
        d = sparse_divergence(
            kind,
            z,
            topk_ids,
            topk_lps,
            beta=beta,
            temperature=temperature,
            chunk_size=len(z),
            weights=weights,
        )
        setattr(sums, kind, getattr(sums, kind) + float(d.double().sum()))
    zf = z.float()
    ce = torch.logsumexp(zf, dim=-1) - zf.gather(1, labels[:, None]).squeeze(1)
    sums.ce += float(ce.double().sum())
    if weights is None:
        teacher_top1 = topk_ids[:, 0]
        sums.topk_mass += float(topk_lps.double().exp().sum())
    else:
        listed_lps = torch.where(weights > 0, topk_lps, torch.full_like(topk_lps, -math.inf))
        teacher_top1 = topk_ids.gather(1, listed_lps.argmax(dim=-1, keepdim=True)).squeeze(1)
        sums.topk_mass += float(_listed_teacher_mass(topk_ids, topk_lps, weights).sum())
    sums.agree += int((zf.argmax(dim=-1) == teacher_top1).sum())
    sums.calibration.add(zf, labels)
    sums.tokens += len(z)


def _full_vocab_stats(z: torch.Tensor, teacher_lp: torch.Tensor, sums: _Sums) -> None:
    """Add the full-vocabulary FKL / RKL / top-1 (T = 1) of one chunk: z, teacher_lp [c, V]."""
    lq = torch.log_softmax(z.float(), dim=-1)
    diff = teacher_lp - lq
    sums.full_fkl += float((teacher_lp.exp() * diff).sum(dtype=torch.float64))
    sums.full_rkl += float((lq.exp() * -diff).sum(dtype=torch.float64))
    sums.full_agree += int((lq.argmax(-1) == teacher_lp.argmax(-1)).sum())


def evaluate_shards(
    model,
    shard_set: ShardSet | str | os.PathLike[str],
    *,
    beta: float = 1.0,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    max_samples: int | None = None,
    tokenizer=None,
    chunk_size: int = EVAL_CHUNK_SIZE,
    full_logits: bool = False,
    progress: bool = False,
    reference: FullVocabTeacher | None = None,
) -> dict[str, Any]:
    """Per-token divergences, top-1 agreement and CE/perplexity of `model` on a shard set.

    See the module docstring for the definitions. The divergences use the set's temperature
    (from its metadata); CE and perplexity are at T = 1. `tokenizer`, when given, is checked
    against the set's tokenizer fingerprint; the head size always against its vocabulary.
    Batches hold at most `batch_size` sequences and `max_tokens` padded tokens;
    `full_logits` takes the model's own [B, T, V] logits instead of the chunked head (the
    fallback path, for models without a linear head; same values). Returns a
    JSON-ready dict: fkl, rkl, todi, top1_agreement, ce, perplexity, teacher_topk_mass (mean
    stored top-k mass; sampled targets: of the distinct listed ids), ece and calibration
    (`Calibration`), sampled_targets (whether the targets carried weights), tokens, samples,
    beta, temperature, top_k, seconds, tokens_per_second;
    with `reference` also full_fkl, full_rkl, full_top1_agreement (module docstring).
    """
    if isinstance(shard_set, str | os.PathLike):
        shard_set = open_shard_set(shard_set)
    total = shard_set.num_rows if max_samples is None else min(max_samples, shard_set.num_rows)
    return evaluate_batches(
        model,
        shard_set.iter_batches(batch_size=batch_size, max_tokens=max_tokens),
        shard_set.signature,
        beta=beta,
        max_samples=max_samples,
        tokenizer=tokenizer,
        chunk_size=chunk_size,
        full_logits=full_logits,
        progress=progress,
        total=total,
        reference=reference,
    )


def evaluate_batches(
    model,
    batches: Iterable[Batch],
    metadata: ShardSetMetadata,
    *,
    beta: float = 1.0,
    max_samples: int | None = None,
    tokenizer=None,
    chunk_size: int = EVAL_CHUNK_SIZE,
    full_logits: bool = False,
    progress: bool = False,
    total: int | None = None,
    reference: FullVocabTeacher | None = None,
) -> dict[str, Any]:
    """`evaluate_shards` over any stream of `storage.Batch` whose targets follow `metadata`."""
    if not beta > 0:
        raise EvalError(f"beta must be > 0, got {beta}")
    v_lim = check_compatible(metadata, model, tokenizer)
    device = next(model.parameters()).device
    temperature = float(metadata.temperature)
    head = None if full_logits else _linear_head(model)
    sums = _Sums()
    bar = _progress_bar(total, "eval", progress)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                if max_samples is not None and sums.samples >= max_samples:
                    break
                if max_samples is not None and sums.samples + len(batch.sample_ids) > max_samples:
                    batch = _first_samples(batch, max_samples - sums.samples)
                _batch_stats(
                    model,
                    head,
                    batch,
                    sums,
                    v_lim,
                    device,
                    beta,
                    temperature,
                    chunk_size,
                    reference,
                )
                sums.samples += len(batch.sample_ids)
                if bar is not None:
                    bar.update(len(batch.sample_ids))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    if sums.tokens == 0:
        raise EvalError("the shard set has no response tokens to evaluate")
    n = sums.tokens
    ce = sums.ce / n
    full = {}
    if reference is not None:
        full = {
            "full_fkl": sums.full_fkl / n,
            "full_rkl": sums.full_rkl / n,
            "full_top1_agreement": sums.full_agree / n,
        }
    return {
        **full,
        "fkl": sums.fkl / n,
        "rkl": sums.rkl / n,
        "todi": sums.todi / n,
        "top1_agreement": sums.agree / n,
        "ce": ce,
        "perplexity": math.exp(ce) if ce < 700 else math.inf,
        "teacher_topk_mass": sums.topk_mass / n,
        "ece": sums.calibration.ece,
        "calibration": sums.calibration.result(),
        "sampled_targets": sums.weighted,
        "tokens": n,
        "samples": sums.samples,
        "beta": float(beta),
        "temperature": temperature,
        "top_k": metadata.top_k,
        "seconds": seconds,
        "tokens_per_second": n / seconds if seconds > 0 else math.inf,
    }


def _first_samples(batch: Batch, keep: int) -> Batch:
    return Batch(
        batch.input_ids[:keep],
        batch.attention_mask[:keep],
        batch.labels[:keep],
        batch.topk_ids[:keep],
        batch.topk_logprobs[:keep],
        batch.sample_ids[:keep],
        None if batch.target_weights is None else batch.target_weights[:keep],
    )


def _linear_head(model) -> tuple[Any, torch.Tensor, torch.Tensor | None] | None:
    """(body, head weight, bias) when logits = body(x) @ W^T + b exactly, else None."""
    from todi.trainer.student import StudentError, body_and_head

    config = model.config.get_text_config()
    for name in ("logit_scale", "logits_scaling"):  # heads that rescale after the matmul
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    try:
        return body_and_head(model)
    except StudentError:
        return None


def _batch_stats(
    model, head, batch, sums, v_lim, device, beta, temperature, chunk_size, reference=None
) -> None:
    """Add one batch. With a linear head (the usual case) only the last hidden state [B, T, H]
    is kept and the logits exist for one chunk of response positions at a time; otherwise the
    model's own [B, T, V] logits of this one batch are held."""
    # Trim the batch to its longest real sequence (collate may pad further).
    width = int(batch.attention_mask.sum(1).max())
    inputs = {
        "input_ids": batch.input_ids[:, :width].to(device),
        "attention_mask": batch.attention_mask[:, :width].to(device),
        "use_cache": False,
    }
    rows, cols = batch.loss_mask[:, :width].nonzero(as_tuple=True)
    topk_ids = batch.topk_ids[:, :width][rows, cols]
    top = padding_row(topk_ids, v_lim)
    if top is not None:
        raise EvalError(f"teacher top-k id {top} is a padding row (vocabulary limit {v_lim})")
    topk_lps = batch.topk_logprobs[:, :width][rows, cols]
    weights = None
    if batch.target_weights is not None:
        weights = batch.target_weights[:, :width][rows, cols]
        sums.weighted = True
    labels = batch.labels[:, :width][rows, cols]
    rows, cols = rows.to(device), cols.to(device)
    if head is not None:
        body, weight, bias = head
        states = body(**inputs).last_hidden_state  # [B, T, H]
        weight = weight[:v_lim]  # padding rows of the head stay out of the softmax
        bias = None if bias is None else bias[:v_lim]
    else:
        states = model(**inputs).logits  # [B, T, V]
    teacher_lp = None if reference is None else reference.logprobs(batch, inputs, rows, cols, v_lim)
    for s in range(0, len(rows), chunk_size):
        sl = slice(s, s + chunk_size)
        if head is not None:
            z = torch.nn.functional.linear(states[rows[sl], cols[sl]], weight, bias)
        else:
            z = states[rows[sl], cols[sl], :v_lim]
        _position_stats(
            z,
            labels[sl].to(device),
            topk_ids[sl].to(device),
            topk_lps[sl].to(device),
            sums,
            beta=beta,
            temperature=temperature,
            weights=None if weights is None else weights[sl].to(device),
        )
        if teacher_lp is not None:
            _full_vocab_stats(z, teacher_lp[sl], sums)
    del states


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", leave=False)


# --------------------------------------------------------------------------------------------
# Generation: ROUGE-L of sampled answers


@dataclass(frozen=True)
class ReferenceRow:
    """A prompt (chat messages) and its reference answer."""

    messages: list[dict[str, str]]
    reference: str


def read_reference_rows(
    path: str | os.PathLike[str], limit: int | None = None
) -> list[ReferenceRow]:
    """Rows of a JSONL file: {"prompt", "response"[, "system"]} or {"messages": [...]}.

    With `messages`, the last message must be the assistant's: it is the reference, the
    messages before it are the prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{p}: prompt file not found")
    rows: list[ReferenceRow] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            rows.append(_reference_row(obj, f"{p}:{lineno}"))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise EvalError(f"{p}: no rows")
    return rows


def _reference_row(obj: Any, where: str) -> ReferenceRow:
    if not isinstance(obj, dict):
        raise EvalError(f"{where}: expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs
        )
        if not ok or len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise EvalError(
                f"{where}: 'messages' must be role/content objects ending with the assistant's"
            )
        return ReferenceRow([dict(m) for m in msgs[:-1]], msgs[-1]["content"])
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        msgs.append({"role": "user", "content": obj["prompt"]})
        return ReferenceRow(msgs, obj["response"])
    raise EvalError(f"{where}: needs string fields 'prompt' and 'response', or 'messages'")


def _as_rows(rows: Iterable[ReferenceRow | dict]) -> list[ReferenceRow]:
    out = []
    for i, r in enumerate(rows):
        out.append(r if isinstance(r, ReferenceRow) else _reference_row(r, f"row {i}"))
    if not out:
        raise EvalError("no prompts to generate from")
    return out


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant turn's opening."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


def _generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[str]:
    """Sampled answers for prompts (left-padded into one batch)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def rouge_l_eval(
    model,
    tokenizer,
    rows: Sequence[ReferenceRow | dict],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    keep_samples: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """ROUGE-L F-measure (x 100) of sampled answers against the references, per seed.

    For each seed: `torch.manual_seed(seed)`, then the prompts in order, `batch_size` at a time
    (left-padded), sampled at `temperature` (pure temperature sampling: top-k off, `top_p`
    1.0 by default; temperature 0 = greedy). The same seed, batch size and model give the same
    answers. Returns rouge_l_mean, rouge_l_std (over seeds, ddof = 1), per_seed, seeds,
    prompts, settings, and the first `keep_samples` prompts' answers of the first seed.
    """
    from rouge_score import rouge_scorer

    if not seeds:
        raise EvalError("no seeds given")
    if max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise EvalError(f"temperature must be >= 0, got {temperature}")
    refs = _as_rows(rows)
    prompts = [encode_prompt(tokenizer, r.messages) for r in refs]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per_seed: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    bar = _progress_bar(len(seeds) * len(refs), "generate", progress)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for n_seed, seed in enumerate(seeds):
                torch.manual_seed(int(seed))
                scores: list[float] = []
                for s in range(0, len(prompts), batch_size):
                    answers = _generate_batch(
                        model,
                        tokenizer,
                        prompts[s : s + batch_size],
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                    )
                    for j, answer in enumerate(answers):
                        ref = refs[s + j]
                        score = 100.0 * scorer.score(ref.reference, answer)["rougeL"].fmeasure
                        scores.append(score)
                        if n_seed == 0 and len(samples) < keep_samples:
                            samples.append(
                                {
                                    "prompt": ref.messages[-1]["content"],
                                    "reference": ref.reference,
                                    "answer": answer,
                                    "rouge_l": score,
                                }
                            )
                    if bar is not None:
                        bar.update(len(answers))
                per_seed[str(seed)] = statistics.fmean(scores)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    values = list(per_seed.values())
    return {
        "rouge_l_mean": statistics.fmean(values),
        "rouge_l_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": per_seed,
        "seeds": [int(s) for s in seeds],
        "prompts": len(refs),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seconds": time.perf_counter() - start,
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------
# The whole evaluation behind `todi eval`


@dataclass
class GenerateOptions:
    prompts: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    max_prompts: int | None = None


def evaluate(
    shards: str | os.PathLike[str],
    models: dict[str, str],
    *,
    beta: float = 1.0,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    max_samples: int | None = None,
    generate: GenerateOptions | None = None,
    device: str | None = None,
    dtype: str | None = None,
    resolve_model: Callable[[str], str] | None = None,
    progress: bool = False,
    full_vocab_teacher: str | None = None,
) -> dict[str, Any]:
    """Evaluate each named model SPEC (e.g. {"student": SPEC, "teacher": DIR}) on a shard set.

    Everything is checked before the first model runs: the shard set opens, the prompt file
    reads, every model loads and matches the set's tokenizer and vocabulary. Returns the JSON
    report: {"shards", "complete", "metadata", "models": {name: {"spec", "shards":
    evaluate_shards(...), "generation": rouge_l_eval(...) or None}}, "metrics", "generation"},
    where the top-level "metrics"/"generation" repeat those of the first model.
    `full_vocab_teacher` (a folder or name): run it once over the set (cached across the
    models) and add the full-vocabulary metrics (`FullVocabTeacher`) to every model's entry.
    """
    shard_set = open_shard_set(shards)
    rows = (
        read_reference_rows(generate.prompts, generate.max_prompts)
        if generate is not None
        else None
    )
    loaded = {}
    for name, spec in models.items():
        model, tokenizer = load_model(spec, device=device, dtype=dtype, resolve=resolve_model)
        check_compatible(shard_set.signature, model, tokenizer)
        loaded[name] = (spec, model, tokenizer)
    reference = None
    if full_vocab_teacher is not None:
        t_model, t_tok = load_model(
            full_vocab_teacher, device=device, dtype=dtype, resolve=resolve_model
        )
        check_compatible(shard_set.signature, t_model, t_tok)
        reference = FullVocabTeacher(t_model, cache=len(loaded) > 1)
    report: dict[str, Any] = {
        "shards": str(shards),
        "complete": shard_set.complete,
        "metadata": shard_set.metadata,
        "models": {},
    }
    for name, (spec, model, tokenizer) in loaded.items():
        entry: dict[str, Any] = {"spec": str(spec)}
        entry["shards"] = evaluate_shards(
            model,
            shard_set,
            beta=beta,
            batch_size=batch_size,
            max_tokens=max_tokens,
            max_samples=max_samples,
            tokenizer=tokenizer,
            progress=progress,
            reference=reference,
        )
        entry["generation"] = None
        if generate is not None and rows is not None:
            entry["generation"] = rouge_l_eval(
                model,
                tokenizer,
                rows,
                generate.seeds,
                max_new_tokens=generate.max_new_tokens,
                temperature=generate.temperature,
                top_p=generate.top_p,
                batch_size=generate.batch_size,
                progress=progress,
            )
        report["models"][name] = entry
    # The first model (the student) also at the top level: what scripts read first.
    first = next(iter(report["models"].values()), {})
    report["metrics"] = first.get("shards")
    report["generation"] = first.get("generation")
    return report


TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("shards", "fkl", "FKL / token"),
    ("shards", "rkl", "RKL / token"),
    ("shards", "todi", "ToDi / token"),
    ("shards", "top1_agreement", "top-1 agreement"),
    ("shards", "ce", "CE (labels, T=1)"),
    ("shards", "perplexity", "perplexity"),
    ("shards", "ece", "ECE (top-1, T=1, 15 bins)"),
    ("shards", "tokens", "response tokens"),
    ("shards", "full_fkl", "full-vocab FKL (T=1)"),
    ("shards", "full_rkl", "full-vocab RKL (T=1)"),
    ("shards", "full_top1_agreement", "full-vocab top-1"),
)


def report_table(report: dict[str, Any]) -> list[list[str]]:
    """The report as rows of strings: a header, then one row per metric, one column per model."""
    names = list(report["models"])
    lines = [["metric", *names]]
    for section, key, label in TABLE_ROWS:
        if all(key not in report["models"][n][section] for n in names):
            continue
        lines.append([label, *(_fmt(report["models"][n][section].get(key)) for n in names)])
    gens = [report["models"][n].get("generation") for n in names]
    if any(g is not None for g in gens):
        lines.append(
            [
                "ROUGE-L (mean ± std)",
                *(f"{g['rouge_l_mean']:.2f} ± {g['rouge_l_std']:.2f}" if g else "-" for g in gens),
            ]
        )
    return lines


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)
