"""The chunked output-head loss and the global-mean objective (trainer/objective.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from todi.storage.batches import IGNORE_INDEX
from todi.trainer.chunked import HeadLossParts, chunked_head_loss, reference_head_loss
from todi.trainer.divergences import KINDS
from todi.trainer.objective import distillation_loss, global_token_count, loss_denominator

F64 = torch.float64


def _problem(n=13, h=8, v=29, k=5, dtype=F64, temperature=1.0, seed=0, bias=True):
    """Hidden states, a head, labels (two ignored) and a teacher's top-k at the temperature."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=F64)
    weight = torch.randn(v, h, generator=gen, dtype=F64)
    b = torch.randn(v, generator=gen, dtype=F64) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[1, n - 2]] = IGNORE_INDEX
    teacher = hidden @ weight.T + torch.randn(n, v, generator=gen, dtype=F64)
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(k, dim=-1)
    leaves = [t.to(dtype).requires_grad_(True) for t in (hidden, weight)]
    if b is not None:
        leaves.append(b.to(dtype).requires_grad_(True))
    return leaves, labels, ids, lp.float() if dtype != F64 else lp


def _grads(parts: HeadLossParts, leaves, kd_weight=0.3):
    loss = distillation_loss(parts.ce_sum, parts.div_sum, parts.n_tokens, kd_weight)
    return loss, torch.autograd.grad(loss, leaves)


def _heads(leaves):
    return leaves if len(leaves) == 3 else [*leaves, None]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_naive_in_value_and_gradients(kind, temperature):
    leaves, labels, ids, lp = _problem(temperature=temperature, seed=len(kind))
    h, w, b = _heads(leaves)
    ref = reference_head_loss(h, w, b, labels, ids, lp, kind=kind, temperature=temperature)
    ref_loss, ref_grads = _grads(ref, leaves)
    # 4 and 7 do not divide the 11 counted rows; kd_weight 0.3: gradients made in forward.
    for chunk, fused in ((1, None), (4, None), (7, 0.3), (11, 0.3), (13, None), (64, 0.3)):
        ours = chunked_head_loss(
            h,
            w,
            b,
            labels,
            ids,
            lp,
            kind=kind,
            temperature=temperature,
            chunk_size=chunk,
            kd_weight=fused,
        )
        assert ours.n_tokens == ref.n_tokens == 11
        torch.testing.assert_close(ours.ce_sum, ref.ce_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.div_sum, ref.div_sum, rtol=1e-12, atol=1e-12)
        loss, grads = _grads(ours, leaves)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_chunked_todi_beta_and_no_bias(beta):
    leaves, labels, ids, lp = _problem(bias=False, seed=4)
    h, w = leaves
    ref = reference_head_loss(h, w, None, labels, ids, lp, beta=beta, temperature=2.0)
    _, g_ref = _grads(ref, leaves)
    for fused in (None, 0.3):
        ours = chunked_head_loss(
            h, w, None, labels, ids, lp, beta=beta, temperature=2.0, chunk_size=3, kd_weight=fused
        )
        _, g_ours = _grads(ours, leaves)
        for g, r in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fused", [None, 0.5])
def test_separate_weights_of_ce_and_divergence_reach_the_gradient(fused, temperature):
    # ce_sum and div_sum are separate outputs: each weighting must give its own gradient, also
    # when the forward prepared the gradients of another one (fused=0.5: backward recomputes).
    leaves, labels, ids, lp = _problem(seed=9, temperature=temperature)
    h, w, b = _heads(leaves)
    kw = {"temperature": temperature}
    for kd in (0.0, 0.5, 1.0):
        ours = chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=5, kd_weight=fused, **kw)
        ref = reference_head_loss(h, w, b, labels, ids, lp, **kw)
        for g, r in zip(_grads(ours, leaves, kd)[1], _grads(ref, leaves, kd)[1], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    ours = chunked_head_loss(h, w, b, labels, ids, lp, kd_weight=fused, **kw)
    ref = reference_head_loss(h, w, b, labels, ids, lp, **kw)
    only_ce = torch.autograd.grad(ours.ce_sum * 3.0, leaves)  # div_sum unused
    for g, r in zip(only_ce, torch.autograd.grad(ref.ce_sum * 3.0, leaves), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fused", [None, 0.3])
def test_bf16_hidden_and_head(temperature, fused):
    leaves, labels, ids, lp = _problem(dtype=torch.bfloat16, temperature=temperature, seed=2)
    h, w, b = _heads(leaves)
    ours = chunked_head_loss(
        h, w, b, labels, ids, lp, temperature=temperature, chunk_size=4, kd_weight=fused
    )
    assert ours.ce_sum.dtype == torch.float32 and ours.div_sum.dtype == torch.float32
    loss, grads = _grads(ours, leaves)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    # The naive path with the same bf16 head matmul, then float32 math.
    ref = reference_head_loss(h, w, b, labels, ids, lp, temperature=temperature)
    ref_loss, ref_grads = _grads(ref, leaves)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_autocast_does_not_change_the_math():
    leaves, labels, ids, lp = _problem(dtype=torch.float32, seed=6)
    h, w, b = _heads(leaves)
    plain = chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=4)
    torch.testing.assert_close(auto.div_sum, plain.div_sum)
    (_, g_plain), (_, g_auto) = _grads(plain, leaves), _grads(auto, leaves)
    for a, p in zip(g_auto, g_plain, strict=True):
        torch.testing.assert_close(a, p)


def test_no_grad_and_all_positions_ignored():
    leaves, labels, ids, lp = _problem(seed=1)
    h, w, b = _heads(leaves)
    with torch.no_grad():
        parts = chunked_head_loss(h, w, b, labels, ids, lp)
    assert not parts.ce_sum.requires_grad and parts.n_tokens == 11
    ignored = torch.full_like(labels, IGNORE_INDEX)
    empty = chunked_head_loss(h, w, b, ignored, ids, lp)
    assert empty.n_tokens == 0 and float(empty.ce_sum.detach()) == 0.0 == float(
        empty.div_sum.detach()
    )
    loss = distillation_loss(empty.ce_sum, empty.div_sum, global_token_count(empty.n_tokens))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert float(loss.detach()) == 0.0
    assert all(g is None or (g == 0).all() for g in grads)


def test_backward_keeps_only_per_row_state():
    """What the loss saves for backward, besides its inputs, is O(N * (k + 1)), never [N, V].

    (A structural check through autograd's saved-tensor hooks; the peak memory and time of
    forward + backward are measured in bench/bench_loss.py, not asserted here.)"""
    n, v, k = 64, 8000, 4
    leaves, labels, ids, lp = _problem(n=n, v=v, k=k, dtype=torch.float32, seed=3)
    h, w, b = _heads(leaves)
    inputs = {t.untyped_storage().data_ptr() for t in (h, w, b, labels, ids, lp)}

    def measure(fn) -> int:
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            parts = fn()
            distillation_loss(parts.ce_sum, parts.div_sum, parts.n_tokens)
        fresh = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in saved
            if t.untyped_storage().data_ptr() not in inputs
        }
        return sum(fresh.values())

    chunked = measure(lambda: chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=16))
    fused = measure(
        lambda: chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=16, kd_weight=0.5)
    )
    naive = measure(lambda: reference_head_loss(h, w, b, labels, ids, lp))
    one_logits = n * v * 4
    assert naive >= one_logits  # the naive path keeps [N, V] tensors for backward
    assert chunked <= 8 * n * (k + 8) * 4  # a few floats per row and outcome
    assert chunked < one_logits / 100
    assert fused == chunked  # fused mode keeps gradients of size [N, H] + [V, H] instead


def test_distillation_loss_formula_and_checks():
    ce, div = torch.tensor(6.0), torch.tensor(2.0)
    assert float(distillation_loss(ce, div, 4)) == pytest.approx((0.5 * 6 + 0.5 * 2) / 4)
    assert float(distillation_loss(ce, div, 4, kd_weight=0.25)) == pytest.approx(
        (0.75 * 6 + 0.25 * 2) / 4
    )
    assert float(distillation_loss(ce, div, 2.5)) == pytest.approx(4 / 2.5)  # DDP: N / W
    assert float(distillation_loss(ce, div, 0)) == 0.0
    with pytest.raises(ValueError, match="kd_weight"):
        distillation_loss(ce, div, 4, kd_weight=1.5)
    with pytest.raises(ValueError, match="num_tokens_global"):
        distillation_loss(ce, div, -1)
    assert global_token_count(17) == 17  # not distributed: the local count
    assert loss_denominator(17) == 17.0


def test_accumulation_with_a_common_denominator_is_the_global_mean():
    # Two micro-batches, each its sums over the step's total token count, accumulate to the
    # gradient of the mean over all tokens (not the mean of per-micro-batch means).
    leaves, labels, ids, lp = _problem(n=20, seed=8)
    h, w, b = _heads(leaves)
    whole = chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=6)
    _, g_whole = _grads(whole, leaves)
    cut = 7
    first = chunked_head_loss(h[:cut], w, b, labels[:cut], ids[:cut], lp[:cut])
    second = chunked_head_loss(h[cut:], w, b, labels[cut:], ids[cut:], lp[cut:])
    total = first.n_tokens + second.n_tokens
    assert total == whole.n_tokens and first.n_tokens != second.n_tokens
    acc = [torch.zeros_like(t) for t in leaves]
    for part in (first, second):
        loss = distillation_loss(part.ce_sum, part.div_sum, total, 0.3)
        for a, g in zip(acc, torch.autograd.grad(loss, leaves), strict=True):
            a += g
    for a, g in zip(acc, g_whole, strict=True):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-12)


def test_input_validation():
    leaves, labels, ids, lp = _problem(seed=5)
    h, w, b = _heads(leaves)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_head_loss(h, w, b, labels, ids, lp, kind="kl")
    with pytest.raises(ValueError, match="head weight"):
        chunked_head_loss(h, w[:, :3], b, labels, ids, lp)
    with pytest.raises(ValueError, match="bias"):
        chunked_head_loss(h, w, b[:3], labels, ids, lp)
    with pytest.raises(ValueError, match="labels"):
        chunked_head_loss(h, w, b, labels[:3], ids, lp)
    bad = labels.clone()
    bad[0] = w.shape[0]
    with pytest.raises(ValueError, match="labels must lie"):
        chunked_head_loss(h, w, b, bad, ids, lp)
    with pytest.raises(ValueError, match="top-k"):
        chunked_head_loss(h, w, b, labels, ids[:, :2], lp)
    with pytest.raises(ValueError, match="kd_weight"):
        chunked_head_loss(h, w, b, labels, ids, lp, kd_weight=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=0)


# ------------------------------------------------------------------ DDP: the global mean


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        (h, w, b), labels, ids, lp = _problem(n=20, seed=8)
        # Uneven shards: rank 0 takes 6 positions, rank 1 the other 14 (different token counts).
        rows = slice(0, 6) if rank == 0 else slice(6, 20)
        head = torch.nn.Linear(w.shape[1], w.shape[0], dtype=F64)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        model = torch.nn.parallel.DistributedDataParallel(head)
        local = h[rows].detach().requires_grad_(False)
        parts = chunked_head_loss(
            local, model.module.weight, model.module.bias, labels[rows], ids[rows], lp[rows]
        )
        # DDP averages the workers' gradients; the denominator global / world makes that the
        # gradient of the mean over all tokens.
        loss = distillation_loss(parts.ce_sum, parts.div_sum, loss_denominator(parts.n_tokens))
        # Route the backward through DDP's hooks with a zero-valued use of the module.
        (loss + 0.0 * model(local[:1]).sum()).backward()
        torch.save(
            {"weight": head.weight.grad, "bias": head.bias.grad, "n": parts.n_tokens},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_gradient_is_the_global_token_mean(tmp_path):
    ctx = mp.get_context("spawn")  # the children get this sys.path, so they import this module
    procs = []
    for rank in range(2):
        p = ctx.Process(target=_ddp_worker, args=(rank, 2, str(tmp_path / "init"), str(tmp_path)))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(100)
        assert p.exitcode == 0
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got[0]["n"] != got[1]["n"]
    torch.testing.assert_close(got[0]["weight"], got[1]["weight"])  # DDP synced them
    (h, w, b), labels, ids, lp = _problem(n=20, seed=8)
    whole = chunked_head_loss(h.detach(), w, b, labels, ids, lp)
    loss = distillation_loss(whole.ce_sum, whole.div_sum, whole.n_tokens)
    g_w, g_b = torch.autograd.grad(loss, (w, b))
    torch.testing.assert_close(got[0]["weight"], g_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[0]["bias"], g_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["todi", "fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_renormalized_topk_equals_naive(kind, temperature):
    """`tail=False` through the head engine: values and gradients equal the plain-autograd
    reference, fused or recomputed."""
    leaves, labels, ids, lp = _problem(temperature=temperature, seed=5)
    h, w, b = _heads(leaves)
    kw = {"kind": kind, "temperature": temperature, "tail": False}
    ref = reference_head_loss(h, w, b, labels, ids, lp, **kw)
    ref_loss, ref_grads = _grads(ref, leaves)
    tail_ref = reference_head_loss(h, w, b, labels, ids, lp, kind=kind, temperature=temperature)
    assert not torch.allclose(tail_ref.div_sum, ref.div_sum)
    for chunk, fused in ((4, None), (7, 0.3)):
        ours = chunked_head_loss(h, w, b, labels, ids, lp, chunk_size=chunk, kd_weight=fused, **kw)
        torch.testing.assert_close(ours.div_sum, ref.div_sum, rtol=1e-12, atol=1e-12)
        loss, grads = _grads(ours, leaves)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
