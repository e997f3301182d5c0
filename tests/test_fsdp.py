"""FSDP2 and activation checkpointing on the real step, without Ray.

Two processes (torch.multiprocessing, gloo on CPU) train a tiny random Llama with a padded
head under `fully_shard` through `todi.trainer.step.train_step`; the same steps in one
unsharded process are the reference. Checked: the loss curve and the final weights agree
(float32 tolerance: the two runs reduce over different shapes), the padding rows of the head
come out unchanged, each worker holds about half the parameter + gradient + optimizer bytes,
and activation checkpointing recomputes the layers without changing the curve.
(The Ray runs of `--strategy fsdp` are in tests/test_train.py.)
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from todi.storage.batches import IGNORE_INDEX, Batch
from todi.trainer.config import TrainConfig
from todi.trainer.step import StudentObjective, batch_sums, make_optimizer, train_step
from todi.trainer.strategy import enable_gradient_checkpointing, local_state_bytes

V_TOK, V_S, K = 50, 64, 8
ROWS, STEPS = 4, 3  # sequences per global batch (2 per worker), optimizer steps


def _student(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V_S, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.train()
    return model


def _batch(step: int, rows: slice = slice(None)) -> Batch:
    """The global batch of `step` (ROWS sequences of 12 tokens, rows of different response
    lengths), or the `rows` of it one worker gets."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V_TOK, (ROWS, 12), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r in range(ROWS):
        labels[r, 2 + r : -1] = ids[r, 3 + r :]
    topk = torch.stack([torch.randperm(V_TOK, generator=g)[:K] for _ in range(ROWS * 12)])
    logp = torch.log_softmax(torch.randn(ROWS * 12, V_TOK, generator=g), -1)
    lp = logp.gather(-1, topk).sort(-1, descending=True)
    topk = topk.gather(-1, lp.indices).view(ROWS, 12, K)
    b = Batch(ids, torch.ones_like(ids), labels, topk, lp.values.view(ROWS, 12, K), list("abcd"))
    return Batch(
        b.input_ids[rows], b.attention_mask[rows], b.labels[rows], b.topk_ids[rows],
        b.topk_logprobs[rows], b.sample_ids[rows],
    )  # fmt: skip


def _cfg() -> TrainConfig:
    return TrainConfig(shards="-", student="-", out="-", lr=1e-2, weight_decay=0.1)


def _objective(model) -> StudentObjective:
    return StudentObjective(
        model, kind="todi", beta=1.0, temperature=2.0, chunk_size=8, vocab_limit=V_TOK,
        kd_weight=0.5,
    )  # fmt: skip


def _run(objective, model, rows: slice) -> dict:
    """STEPS optimizer steps on one global batch (so the loss must fall); the global loss per
    step; then the state bytes of this process, measured with the gradients of one more
    backward (another batch) in place."""
    from todi.trainer.strategy import all_reduce

    optimizer = make_optimizer(model, _cfg())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    losses, norms = [], []
    for _ in range(STEPS):
        stats = train_step(
            objective, [_batch(0, rows)], optimizer, scheduler, kd_weight=0.5, grad_clip=1.0
        )
        ce, div, n = all_reduce([stats.ce_sum, stats.div_sum, stats.tokens])
        losses.append((0.5 * ce + 0.5 * div) / n)
        norms.append(stats.grad_norm)
    ce, div = batch_sums(objective, _batch(STEPS, rows))
    (0.5 * ce + 0.5 * div).backward()
    return {"losses": losses, "norms": norms, "bytes": local_state_bytes(objective, optimizer)}


def _fsdp_worker(rank: int, world: int, port: int, tied: bool, ckpt: bool, out: str) -> None:
    import torch.distributed as dist

    from todi.trainer.checkpoint import full_state_dict
    from todi.trainer.strategy import fully_shard_student

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _student(tied)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        if ckpt:
            enable_gradient_checkpointing(model)
        objective = fully_shard_student(_objective(model), torch.device("cpu"), bf16=False)
        per = ROWS // world
        result = _run(objective, model, slice(rank * per, (rank + 1) * per))
        result["layer_forwards"] = len(calls)
        result["bytes_all"] = [None] * world
        dist.all_gather_object(result["bytes_all"], result["bytes"])
        state = full_state_dict(model)
        if rank == 0:
            torch.save({**result, "state": state}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("tied", "ckpt"), [(True, False), (False, True)], ids=["tied", "untied-checkpointed"]
)
def test_fsdp_two_workers_match_one_process(tied, ckpt, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), tied, ckpt, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)

    model = _student(tied)
    head_before = model.get_output_embeddings().weight.detach().clone()
    want = _run(_objective(model), model, slice(None))

    # Same curve, same weights: float32 tolerance (different reduction shapes).
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-6)
    assert got["norms"] == pytest.approx(want["norms"], rel=1e-4, abs=1e-6)
    assert want["losses"][-1] < want["losses"][0]
    reference = model.state_dict()
    assert got["state"].keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # The padding rows of the head: untouched by weight decay on the sharded head too.
    head = "lm_head.weight"
    assert torch.equal(got["state"][head][V_TOK:], head_before[V_TOK:])
    assert not torch.equal(got["state"][head][:V_TOK], head_before[:V_TOK])

    # Each worker holds its shard of parameters, gradients and AdamW state: about half.
    for worker in got["bytes_all"]:
        assert worker["total"] <= 0.55 * want["bytes"]["total"], (worker, want["bytes"])
        for part in ("params", "grads", "optimizer"):
            assert worker[part] <= 0.55 * want["bytes"][part], (part, worker, want["bytes"])
    # Checkpointing: layer 0's MLP started again in each backward (recomputed), else once.
    passes = STEPS + 1
    assert got["layer_forwards"] == (2 * passes if ckpt else passes)


def test_gradient_checkpointing_keeps_the_curve():
    """One process: the same steps with and without activation checkpointing give the same
    losses and weights; with it, every decoder layer's forward runs twice per step."""
    runs = []
    for ckpt in (False, True):
        model = _student(tied=True)
        calls = []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        if ckpt:
            enable_gradient_checkpointing(model)
        result = _run(_objective(model), model, slice(None))
        runs.append((result, model.state_dict(), len(calls)))
    (plain, plain_state, plain_calls), (ckpt, ckpt_state, ckpt_calls) = runs
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-7)
    for name, value in plain_state.items():
        torch.testing.assert_close(ckpt_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert ckpt_calls == 2 * plain_calls == 2 * 2 * (STEPS + 1)
