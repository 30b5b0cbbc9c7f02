"""ModelConfig: the shape and numerics of a model, independent of the file it came from."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np


@dataclasses.dataclass
class ModelConfig:
    arch: str                 # "llama" (this covers Llama 2/3, SmolLM, Mistral)
    dim: int
    hidden_dim: int           # FFN width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int       # the model's trained context (max positions)
    norm_eps: float
    rope_theta: float
    # True: rotate adjacent pairs (2j, 2j+1) -- Q/K rows as llama.cpp's converter permutes them.
    # False: rotate (j, j + head_dim/2) -- Hugging Face "rotate_half" on unpermuted rows.
    rope_interleaved: bool
    # Per-frequency divisors (llama 3.1 scaling), len head_dim/2, or None for no scaling.
    rope_freq_divisors: list[float] | None = None
    tied_embeddings: bool = False

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))

    def rope_inv_freq(self) -> np.ndarray:
        """inv_freq_j = theta^(-2j/hd) / divisor_j, in float64 (cast by the caller)."""
        hd = self.head_dim
        inv = self.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        if self.rope_freq_divisors is not None:
            inv = inv / np.asarray(self.rope_freq_divisors, dtype=np.float64)
        return inv


def llama3_freq_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         original_context: int) -> list[float]:
    """Llama 3.1 rope scaling expressed as divisors of inv_freq (what GGUF's rope_freqs holds)."""
    out = []
    for j in range(head_dim // 2):
        f = theta ** (-2 * j / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < original_context / high:
            out.append(1.0)
        elif wavelen > original_context / low:
            out.append(float(factor))
        else:
            s = (original_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return out
