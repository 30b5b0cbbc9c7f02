"""Which part of every layer each rank owns. Pure functions: no MPI, no files.

Attention: rank r owns a contiguous group of query heads (uneven splits allowed: 9 heads on
2 ranks = 5 + 4) and every KV head one of those queries reads, so a KV head may be computed
on several ranks. Wq/Wk/Wv are split by output rows, Wo by input columns over the same heads.
FFN: W1/W3 by output rows, W2 by input columns, in chunks of 32 so quant blocks never straddle
ranks (for MoE, every expert's FFN is split the same way). LM head: vocab rows. A rank may own
zero of anything and still takes part in the syncs.

Wo's input columns must also start on a 32-boundary, so when head_dim is not a multiple of 32
heads are handed out in groups (head_dim 16: pairs of heads); a rank may then own no heads.
"""
from __future__ import annotations

import dataclasses
import json
import math

from .config import ModelConfig

BLOCK = 32  # quant block size along a matrix's input dimension


@dataclasses.dataclass(frozen=True)
class RankSlice:
    rank: int
    heads: tuple[int, int]      # query heads [h0, h1)
    kv_heads: tuple[int, int]   # KV heads held [k0, k1)
    ffn: tuple[int, int]        # FFN hidden rows [f0, f1), multiples of BLOCK
    vocab: tuple[int, int]      # LM head rows [v0, v1)

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def kv_of_head(self, cfg: ModelConfig) -> list[int]:
        """Local KV index used by each local query head (GQA)."""
        group = cfg.n_heads // cfg.n_kv_heads
        return [h // group - self.kv_heads[0] for h in range(*self.heads)]


def split_even(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges, sizes differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def plan(cfg: ModelConfig, n: int) -> list[RankSlice]:
    if n < 1:
        raise ValueError(f"need at least one rank, got {n}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"{cfg.n_heads} query heads do not group evenly over {cfg.n_kv_heads} KV heads")
    if cfg.ffn_dim % BLOCK:
        raise ValueError(f"FFN width {cfg.ffn_dim} is not a multiple of {BLOCK}")
    group = cfg.n_heads // cfg.n_kv_heads
    unit = BLOCK // math.gcd(cfg.head_dim, BLOCK)  # heads per group so that groups start block-aligned
    heads = [(min(a * unit, cfg.n_heads), min(b * unit, cfg.n_heads))
             for a, b in split_even(-(-cfg.n_heads // unit), n)]
    ffn_chunks = split_even(cfg.ffn_dim // BLOCK, n)
    vocab = split_even(cfg.vocab_size, n)
    out = []
    for r in range(n):
        h0, h1 = heads[r]
        kv = (h0 // group, (h1 - 1) // group + 1) if h1 > h0 else (0, 0)
        f0, f1 = ffn_chunks[r]
        out.append(RankSlice(r, (h0, h1), kv, (f0 * BLOCK, f1 * BLOCK), vocab[r]))
    return out


def plan_to_json(slices: list[RankSlice]) -> str:
    return json.dumps([dataclasses.asdict(s) for s in slices])


def plan_from_json(text: str) -> list[RankSlice]:
    return [RankSlice(d["rank"], tuple(d["heads"]), tuple(d["kv_heads"]), tuple(d["ffn"]),
                      tuple(d["vocab"])) for d in json.loads(text)]
