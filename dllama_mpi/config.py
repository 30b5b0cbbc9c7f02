"""ModelConfig: the shape and numerics of a model, independent of the file it came from."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np


@dataclasses.dataclass
class ModelConfig:
    arch: str                 # "llama" (Llama 2/3, SmolLM, Mistral, DeepSeek-R1 Llama distills),
                              # "qwen2" (Qwen2/2.5), "qwen3", "qwen3moe"
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
    # Architecture differences from the Llama path (each one small and explicit):
    attn_bias: bool = False       # Qwen2: biases on q, k, v (canonical layers.L.bq / bk / bv)
    qk_norm: bool = False         # Qwen3: RMSNorm per head on q and k before RoPE (layers.L.q_norm / k_norm)
    n_experts: int = 0            # Qwen3-MoE: experts per layer (0 = dense FFN)
    n_active_experts: int = 0     # experts used per token (top-k of the router softmax)
    moe_hidden_dim: int = 0       # FFN width of each expert
    norm_topk_prob: bool = True   # renormalize the top-k router weights to sum to 1

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        """Width of the FFN that gets split across ranks (an expert's width for MoE)."""
        return self.moe_hidden_dim if self.n_experts else self.hidden_dim

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


def _shape(arch, dim, hidden, layers, heads, kv, head_dim, vocab, context, theta, tied, **extra) -> ModelConfig:
    return ModelConfig(arch=arch, dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                       head_dim=head_dim, vocab_size=vocab, context_length=context, norm_eps=1e-5 if arch == "llama"
                       else 1e-6, rope_theta=theta, rope_interleaved=arch == "llama", tied_embeddings=tied, **extra)


# Named shapes of real models (from their config.json), for `plan` and `bench` with random weights.
SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": _shape("llama", 576, 1536, 30, 9, 3, 64, 49152, 8192, 1e5, True),
    "llama3.2-1b": _shape("llama", 2048, 8192, 16, 32, 8, 64, 128256, 131072, 5e5, True),
    "llama3.2-3b": _shape("llama", 3072, 8192, 28, 24, 8, 128, 128256, 131072, 5e5, True),
    "llama3.1-8b": _shape("llama", 4096, 14336, 32, 32, 8, 128, 128256, 131072, 5e5, False),
    "llama3.1-70b": _shape("llama", 8192, 28672, 80, 64, 8, 128, 128256, 131072, 5e5, False),
    "llama3.1-405b": _shape("llama", 16384, 53248, 126, 128, 8, 128, 128256, 131072, 5e5, False),
    "qwen3-8b": _shape("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 40960, 1e6, False, qk_norm=True),
    "qwen3-14b": _shape("qwen3", 5120, 17408, 40, 40, 8, 128, 151936, 40960, 1e6, False, qk_norm=True),
    "qwen3-30b-a3b": _shape("qwen3moe", 2048, 6144, 48, 32, 4, 128, 151936, 40960, 1e6, False, qk_norm=True,
                            n_experts=128, n_active_experts=8, moe_hidden_dim=768),
}
