"""Long sequences through the whole path at toy width: a 2,048-token capture (teacher top-k
through the `hf` backend and the precompute job), training on it (Ray, 2 workers, FSDP with
activation checkpointing), and the held-out evaluation of the exported student.

The teacher is a random 2-layer Llama of width 64 with SmolLM2's tokenizer and vocabulary
(49,152): every tensor the long path builds has its real length and vocabulary, only the
width is small, so the run takes seconds per stage on two cores. What it costs at real width
is measured in bench/bench_scale.py and sized in bench/sizing.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SEQ = 2048


@pytest.fixture(scope="module")
def toy_teacher(teacher_dir, tmp_path_factory) -> Path:
    """A toy-width Llama that shares the embedded teacher's tokenizer, context 4,096."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    config = LlamaConfig(
        vocab_size=49_152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("toy") / "teacher"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.timeout(600)
def test_2048_token_capture_train_eval(toy_teacher, ray_cluster, tmp_path):
    from todi.services.backends import create_backend
    from todi.services.config import JobSpec
    from todi.services.precompute import run_precompute
    from todi.storage import open_shard_set
    from todi.trainer.config import TrainConfig
    from todi.trainer.train import train

    words = "the river keeps the old mill turning while bread rises in the warm kitchen "
    rows = [{"id": f"long-{i}", "text": f"{i} " + words * 200} for i in range(4)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    backend = create_backend("hf", toy_teacher, max_top_k=8, max_model_len=4096)
    try:
        spec = JobSpec(
            dataset=str(data), out=str(tmp_path / "shards"), top_k=8, max_seq_len=SEQ,
            chat_template=False, batch_tokens=SEQ,
        )  # fmt: skip
        progress = run_precompute(spec, backend)
    finally:
        backend.close()
    assert progress.state == "succeeded"
    shards = open_shard_set(tmp_path / "shards")
    lengths = [len(s.input_ids) for s in shards]
    assert lengths == [SEQ] * 4  # truncated to exactly the capture length

    cfg = TrainConfig(
        shards=str(tmp_path / "shards"), student=f"init:teacher={toy_teacher},layers=1",
        out=str(tmp_path / "run"), workers=2, cpus_per_worker=0.5, strategy="fsdp",
        gradient_checkpointing=True, batch_size=1, max_steps=2, chunk_size=512, lr=1e-3,
        shuffle_buffer=4, bucket_buffer=0, eval_shards=str(tmp_path / "shards"),
        eval_max_samples=2, progress=False,
    )  # fmt: skip
    summary = train(cfg)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # Each step: one 2,048-token sequence per worker, every position after the first counted.
    assert all(r["tokens"] == 2 * (SEQ - 1) for r in log)
    assert summary.eval is not None and summary.eval["samples"] == 2
    assert summary.eval["todi"] > 0 and summary.eval["ce"] > 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
