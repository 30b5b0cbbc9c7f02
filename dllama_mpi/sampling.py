"""Choosing the next token from logits: greedy, temperature, top-k, top-p; seeded."""
from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if top_k < 0:
            raise ValueError("top-k must be >= 0")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def candidates(self) -> int:
        """How many best logits of each rank suffice to sample (0: all of them are needed)."""
        return 1 if self.greedy else self.top_k

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)
        if self.greedy:
            return int(np.argmax(logits))
        ids = np.arange(len(logits))
        if self.top_k and self.top_k < len(logits):
            ids = np.argpartition(-logits, self.top_k - 1)[: self.top_k]
        z = logits[ids] / self.temperature
        order = np.argsort(-z, kind="stable")
        ids, z = ids[order], z[order]
        p = np.exp(z - z[0])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            ids, p = ids[:keep], p[:keep] / p[:keep].sum()
        return int(ids[self.rng.choice(len(ids), p=p)])
