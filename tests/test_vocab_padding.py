"""The padded-vocabulary pairing rule (todi.trainer.data.check_pairing), end to end on a real
(tiny, random) Llama student with a padded head: V_s = 64 head rows for a V_tok = 50-token
tokenizer. The padding rows are outside the softmax (the loss equals that of the head cut to
V_tok rows), get no gradient, and come out of optimizer steps unchanged (weight decay
included); shards whose ids reach a padding row, and heads smaller than the tokenizer, are
refused with a message naming the problem."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from todi.storage.batches import IGNORE_INDEX, Batch
from todi.trainer.config import TrainConfig
from todi.trainer.data import DataError, check_pairing, padding_row
from todi.trainer.objective import distillation_loss
from todi.trainer.train import StudentObjective, batch_sums, make_optimizer, train_step

V_TOK, V_S, K = 50, 64, 8


def _student(tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V_S, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _batch() -> Batch:
    """2 sequences of 12 real tokens; teacher top-k over real ids only, full-vocab log-probs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V_TOK, (2, 12), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:-1] = ids[:, 4:]
    topk = torch.stack([torch.randperm(V_TOK, generator=g)[:K] for _ in range(24)]).view(2, 12, K)
    logp = torch.log_softmax(torch.randn(2, 12, V_TOK, generator=g), -1)
    topk_lp = logp.gather(-1, topk).sort(-1, descending=True)
    topk = topk.gather(-1, topk_lp.indices)
    return Batch(ids, torch.ones_like(ids), labels, topk, topk_lp.values, ["a", "b"])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_padding_rows_are_outside_the_softmax_and_unchanged_by_training(tied):
    model = _student(tied)
    head = model.get_output_embeddings().weight
    before = head.detach()[V_TOK:].clone()
    objective = StudentObjective(
        model, kind="todi", beta=1.0, temperature=2.0, chunk_size=16, vocab_limit=V_TOK
    )
    batch = _batch()

    # The loss is that of the same student with its head cut to the tokenizer's rows.
    cut = _student(tied)
    cut.load_state_dict(model.state_dict())
    cut.resize_token_embeddings(V_TOK)
    ref = StudentObjective(cut, kind="todi", beta=1.0, temperature=2.0, chunk_size=16)
    with torch.no_grad():
        got, want = batch_sums(objective, batch), batch_sums(ref, batch)
    assert torch.allclose(got[0], want[0], rtol=1e-5) and torch.allclose(got[1], want[1], rtol=1e-5)

    # No gradient reaches the padding rows.
    ce, div = batch_sums(objective, batch)
    distillation_loss(ce, div, batch.num_tokens, 0.5).backward()
    assert head.grad is not None and not head.grad[V_TOK:].any()
    assert head.grad[:V_TOK].abs().sum() > 0
    model.zero_grad(set_to_none=True)

    # Optimizer steps with weight decay leave them exactly as they were (the real rows move).
    cfg = TrainConfig(shards="unused", student="unused", out="unused", lr=1e-2, weight_decay=0.1)
    optimizer = make_optimizer(objective, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    real_before = head.detach()[:V_TOK].clone()
    for _ in range(3):
        train_step(objective, [batch], optimizer, scheduler, kd_weight=0.5, grad_clip=1.0)
    assert torch.equal(head.detach()[V_TOK:], before)
    assert not torch.equal(head.detach()[:V_TOK], real_before)


def test_ids_in_padding_rows_and_small_heads_are_refused():
    assert padding_row(np.array([3, 7, V_TOK - 1]), V_TOK) is None
    assert padding_row(torch.tensor([[3, V_TOK + 5], [7, 1]]), V_TOK) == V_TOK + 5
    meta = SimpleNamespace(tokenizer_sha256="t" * 64, vocab_size=V_S, temperature=2.0, top_k=K)

    def student(vocab: int, tok: int = V_TOK):
        return SimpleNamespace(tokenizer_sha256="t" * 64, vocab_size=vocab, tokenizer_size=tok)

    # Both heads may exceed the tokenizer; the losses then run over its V_tok rows.
    assert check_pairing(meta, student(V_S + 16)).vocab_limit == V_TOK
    with pytest.raises(DataError, match=r"vocabulary mismatch.*student head is smaller"):
        check_pairing(meta, student(V_TOK - 1))
    with pytest.raises(DataError, match=r"vocabulary mismatch.*shard set is smaller"):
        check_pairing(meta, student(V_S + 10, tok=V_S + 1))
