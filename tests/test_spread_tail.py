"""`topk_target="spread"`: top-k targets whose rest of the teacher's mass is spread evenly over
the V - k unlisted ids, the divergence then over the whole vocabulary (`sparse_divergence(
spread=True)`, `chunked_head_loss(spread=True)`).

- It is the dense divergence exactly when the teacher's own tail IS uniform;
- the chunked engine (forward, fused and recomputed backward) equals plain autograd for every
  kind, AKL included (the divergence is dense, so AKL's sorted split is exact);
- it refuses what it does not apply to (weights, tail=False), and the trainer takes it from
  `--topk-target spread`.
"""

from __future__ import annotations

import pytest
import torch

from todi.trainer.chunked import (
    chunked_head_loss,
    reference_head_loss,
    reference_sparse_divergence,
    sparse_divergence,
)
from todi.trainer.config import TrainConfig
from todi.trainer.divergences import KINDS, dense_divergence

F64 = torch.float64


def _topk(v: int = 41, n: int = 9, k: int = 6, seed: int = 0, temperature: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(n, v, generator=gen, dtype=F64)
    lp = torch.log_softmax(2 * torch.randn(n, v, generator=gen, dtype=F64) / temperature, -1)
    lps, ids = lp.topk(k, -1)
    return student, ids, lps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uniform_teacher_tail_gives_the_dense_divergence(kind, temperature):
    """A teacher whose non-top-k logits are all equal: spreading its rest evenly is exact."""
    gen = torch.Generator().manual_seed(len(kind))
    v, k = 37, 5
    teacher = torch.full((4, v), -1.0, dtype=F64)
    head = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(4)])
    teacher.scatter_(1, head, 3 * torch.rand(4, k, generator=gen, dtype=F64) + 1)
    student = 2 * torch.randn(4, v, generator=gen, dtype=F64)
    lp = torch.log_softmax(teacher / temperature, -1)
    lps, ids = lp.topk(k, -1)
    want_z = student.clone().requires_grad_(True)
    want = dense_divergence(kind, want_z, teacher, temperature=temperature)
    want.sum().backward()
    z = student.clone().requires_grad_(True)
    got = sparse_divergence(kind, z, ids, lps, temperature=temperature, spread=True)
    got.sum().backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad, want_z.grad, rtol=1e-10, atol=1e-12)
    # ... while the tail bucket differs from it (it hides where the student puts its rest).
    if kind in ("rkl", "todi"):
        bucket = sparse_divergence(kind, student, ids, lps, temperature=temperature)
        assert bool((want.detach() - bucket > 1e-3).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_engine_matches_reference(kind, temperature):
    student, ids, lps = _topk(seed=len(kind), temperature=temperature)
    up = torch.linspace(0.5, 2.0, len(student), dtype=F64)
    b = student.clone().requires_grad_(True)
    want = reference_sparse_divergence(kind, b, ids, lps, temperature=temperature, spread=True)
    (want * up).sum().backward()
    for chunk in (1, 4, 1024):
        a = student.clone().requires_grad_(True)
        got = sparse_divergence(
            kind, a, ids, lps, temperature=temperature, spread=True, chunk_size=chunk
        )
        (got * up).sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["todi", "fkl", "rkl", "akl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_head_loss_matches_reference(kind, temperature):
    """Fused backward (announced kd_weight), recompute backward (none announced, or a
    different weighting than announced), ignored rows."""
    gen = torch.Generator().manual_seed(7)
    n, h, v, k = 11, 6, 33, 5
    leaves = [
        torch.randn(n, h, generator=gen, dtype=F64).requires_grad_(True),
        torch.randn(v, h, generator=gen, dtype=F64).requires_grad_(True),
        torch.randn(v, generator=gen, dtype=F64).requires_grad_(True),
    ]
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[0, 5]] = -100
    lp = torch.log_softmax(2 * torch.randn(n, v, generator=gen, dtype=F64) / temperature, -1)
    lps, ids = lp.topk(k, -1)
    kw = {"kind": kind, "temperature": temperature, "spread": True}
    ref = reference_head_loss(*leaves, labels, ids, lps, **kw)
    ref_grads = torch.autograd.grad(0.7 * ref.ce_sum + 0.3 * ref.div_sum, leaves)
    for chunk, fused in ((1, None), (4, 0.3), (64, 0.3), (4, 0.5)):
        ours = chunked_head_loss(*leaves, labels, ids, lps, chunk_size=chunk, kd_weight=fused, **kw)
        torch.testing.assert_close(ours.ce_sum, ref.ce_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.div_sum, ref.div_sum, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(0.7 * ours.ce_sum + 0.3 * ours.div_sum, leaves)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def test_refusals_and_config():
    student, ids, lps = _topk()
    w = torch.rand(ids.shape, dtype=F64)
    for impl in (sparse_divergence, reference_sparse_divergence):
        with pytest.raises(ValueError, match="spread"):
            impl("todi", student, ids, lps, spread=True, weights=w)
        with pytest.raises(ValueError, match="spread"):
            impl("todi", student, ids, lps, spread=True, tail=False)
    cfg = TrainConfig(shards="s", student="m", out="o", topk_target="spread")
    assert cfg.topk_target == "spread"
    with pytest.raises(ValueError, match="topk_target"):
        TrainConfig(shards="s", student="m", out="o", topk_target="uniform")
