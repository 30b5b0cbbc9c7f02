"""Independent reference: Hugging Face transformers (float32, eager attention) loading the same
GGUF file. Nothing here shares code with dllama_mpi."""
from __future__ import annotations

import functools
import math
import pathlib

import numpy as np


@functools.lru_cache(maxsize=2)
def hf_model(gguf_path: str):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    p = pathlib.Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return model


@functools.lru_cache(maxsize=2)
def hf_tokenizer(gguf_path: str):
    from transformers import AutoTokenizer
    p = pathlib.Path(gguf_path)
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def all_logits(gguf_path, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = hf_model(str(gguf_path))(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def greedy(gguf_path, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation, re-running the whole sequence each step (no KV cache involved)."""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(np.argmax(all_logits(gguf_path, seq)[-1])))
    return seq[len(ids):]


def perplexity(gguf_path, ids: list[int]) -> float:
    logits = all_logits(gguf_path, ids).astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    nll = logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]
    return math.exp(nll.mean())
