"""Root-side text generation and perplexity on top of the engine (workers never run this)."""
from __future__ import annotations

import math
import time

import numpy as np

from .engine import Engine
from .plan import PREFILL_CHUNK
from .sampling import Sampler


class UsageError(Exception):
    """Bad user input found on the root after the job started; the job stops cleanly."""


def prefill(engine: Engine, ids: list[int], slot: int = 0, start: int = 0, chunk: int = PREFILL_CHUNK,
            all_logits: bool = False) -> np.ndarray:
    """Feed ids at positions start.. in chunks (one pair of syncs per layer per chunk).
    Returns the logits of the last position, or of every position with all_logits."""
    out = []
    for c0 in range(0, len(ids), chunk):
        part = ids[c0:c0 + chunk]
        n = len(part)
        want = np.ones(n, np.int32) if all_logits else (np.arange(n) == n - 1).astype(np.int32) * (c0 + n == len(ids))
        logits = engine.forward(part, [slot] * n, np.arange(start + c0, start + c0 + n), want, phase="prefill")
        if logits is not None:
            out.append(logits)
    return np.concatenate(out) if all_logits else out[-1][-1]


class Generation:
    """Streams the continuation of a prompt; records timings for the stats block."""

    def __init__(self, engine: Engine, tokenizer, sampler: Sampler):
        self.engine, self.tokenizer, self.sampler = engine, tokenizer, sampler
        self.prompt_tokens = self.new_tokens = 0
        self.prefill_seconds = self.decode_seconds = 0.0
        self.last_prompt_logits = None

    def run(self, ids: list[int], steps: int, emit, slot: int = 0) -> list[int]:
        if not ids:
            raise UsageError("the prompt is empty: give --prompt text or --prompt-ids")
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            raise UsageError(f"the prompt has {len(ids)} tokens but --max-seq-len is {limit}: raise --max-seq-len "
                             f"or shorten the prompt")
        t0 = time.perf_counter()
        logits = prefill(self.engine, ids, slot)
        self.prefill_seconds = time.perf_counter() - t0
        self.prompt_tokens = len(ids)
        self.last_prompt_logits = logits
        stream = self.tokenizer.stream()
        out, pos = [], len(ids)
        t0 = time.perf_counter()
        while len(out) < steps:
            token = self.sampler(logits)
            if token in self.tokenizer.eos_ids:
                break
            out.append(token)
            emit(stream.push(token))
            if len(out) == steps or pos >= limit:
                break
            logits = self.engine.forward([token], [slot], [pos], [1], phase="decode", topk=self.sampler.candidates)[0]
            pos += 1
        emit(stream.flush())
        self.decode_seconds = time.perf_counter() - t0
        self.new_tokens = len(out)
        return out


def perplexity(engine: Engine, ids: list[int], window: int) -> tuple[float, int]:
    """Teacher-forced perplexity: in windows of `window` tokens, token i is predicted from the
    tokens before it in its window (the first token of each window is context only)."""
    nll, count = 0.0, 0
    for w0 in range(0, len(ids), window):
        part = ids[w0:w0 + window]
        if len(part) < 2:
            break
        logits = prefill(engine, part, all_logits=True).astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))[:-1]
        target = np.asarray(part[1:])
        nll += float((logz - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    if count == 0:
        raise UsageError("the file has fewer than 2 tokens: nothing to predict")
    return math.exp(nll / count), count
