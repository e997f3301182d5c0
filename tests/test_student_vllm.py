"""The exported student in vLLM: it loads in the real engine and generates what transformers
generates; and `todi serve --backend vllm --model <student>` makes it the teacher of a next
stage (REST log-probs and a precompute job written from it).

The student is the demo's size: `init:teacher=<SmolLM2>,layers=10` (DemoConfig.student_layers),
saved by `trainer.student.save_student` -- the function `todi train` writes every checkpoint
and so its exported `model/` with (`trainer.train.write_checkpoint`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from todi.demo import DemoConfig
from todi.storage import open_shard_set

pytestmark = pytest.mark.slow
TODI = str(Path(sys.executable).with_name("todi"))
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three colors.",
]
NEW_TOKENS = 8
TOP_K = 8


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    from todi.trainer.student import build_student, parse_student_spec, save_student

    layers = DemoConfig().student_layers
    spec = parse_student_spec(f"init:teacher={teacher_dir},layers={layers}")
    model, tokenizer = build_student(spec, seed=0)
    out = save_student(model, tokenizer, tmp_path_factory.mktemp("student") / "model")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    return out


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.timeout(600)
def test_student_generates_in_vllm_as_in_transformers(student_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from todi.services.backends.vllm import cpu_engine_env

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    prompts = [_chat_ids(tokenizer, p) for p in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    expected = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        expected.append(out[0, len(ids) :].tolist())
    del model

    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with cpu_engine_env(1):
        llm = LLM(
            model=str(student_dir), dtype="float32", max_model_len=512, enforce_eager=True,
            max_num_batched_tokens=512, seed=0,
        )  # fmt: skip
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
        got = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    for prompt, g, e in zip(PROMPTS, got, expected, strict=True):
        # greedy = argmax at every step, float32 on both sides: the same tokens
        assert g == e, (prompt, tokenizer.decode(g), tokenizer.decode(e))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_todi_serve_vllm_student_is_the_next_stages_teacher(student_dir, tmp_path):
    """`todi serve --backend vllm --model <student>`: the student serves log-probs and a
    precompute job writes a shard set from it, equal to the student's own softmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    port, root = _free_port(), tmp_path / "storage"
    log = tmp_path / "serve.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TODI_API_KEY", None)
    cmd = [TODI, "serve", "--backend", "vllm", "--model", str(student_dir),
           "--port", str(port), "--storage-root", str(root), "--max-model-len", "256",
           "--max-top-k", str(TOP_K), "--log-level", "warning"]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        teacher = httpx.get(url + "/v1/teacher", timeout=30).json()
        assert teacher["model"] == student_dir.name and teacher["backend"] == "vllm"

        rows = [{"prompt": p, "response": " I am not sure, but I can try."} for p in PROMPTS]
        dataset = tmp_path / "next.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = subprocess.run(
            [TODI, "precompute", "--server", url, "--dataset", str(dataset), "--out", "next",
             "--top-k", str(TOP_K), "--no-progress"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["state"] == "succeeded"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    shard_set = open_shard_set(root / "next")
    assert shard_set.complete and shard_set.num_rows == len(PROMPTS)
    assert shard_set.signature.teacher_model == student_dir.name
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert shard_set.signature.vocab_size >= len(tok)
    for sample in shard_set:
        with torch.inference_mode():
            logits = model(torch.as_tensor(sample.input_ids[None].astype(np.int64))).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[sample.first_position : -1]
        top = torch.topk(lp, TOP_K, dim=-1)
        # the student's own top-1 (ties aside) and its log-probs, to the codec's 1/64 nat
        assert (sample.topk_ids[:, 0] == top.indices[:, 0].numpy()).mean() > 0.9
        mine = lp.gather(1, torch.as_tensor(sample.topk_ids, dtype=torch.long)).numpy()
        assert np.abs(mine - sample.topk_logprobs).max() < 0.02
