"""Partition plan properties on real model shapes, N = 1..8."""
import pytest

from dllama_mpi.config import ModelConfig
from dllama_mpi.config import SHAPES as REGISTRY
from dllama_mpi.partition import BLOCK, plan, plan_from_json, plan_to_json


def shape(dim, hidden, layers, heads, kv, vocab, head_dim=None):
    return ModelConfig(arch="llama", dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, head_dim=head_dim or dim // heads, vocab_size=vocab, context_length=8192,
                       norm_eps=1e-5, rope_theta=1e4, rope_interleaved=True)


SHAPES = {
    "smollm2-135m": shape(576, 1536, 30, 9, 3, 49152),
    "llama3-8b": shape(4096, 14336, 32, 32, 8, 128256),
    "tiny-hd16": shape(64, 128, 2, 4, 2, 49152),             # the llama31 fixture: head_dim 16
    "tiny-hd8-odd": shape(56, 96, 2, 7, 7, 1000, head_dim=8),
    "qwen3-30b-a3b": REGISTRY["qwen3-30b-a3b"],               # MoE: experts of width 768
}


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("n", range(1, 9))
def test_every_unit_owned_exactly_once(name, n):
    cfg = SHAPES[name]
    slices = plan(cfg, n)
    assert [s.rank for s in slices] == list(range(n))
    heads = [h for s in slices for h in range(*s.heads)]
    assert heads == list(range(cfg.n_heads))
    ffn = [f for s in slices for f in range(*s.ffn)]
    assert ffn == list(range(cfg.ffn_dim))
    vocab = [v for s in slices for v in range(*s.vocab)]
    assert vocab == list(range(cfg.vocab_size))
    group = cfg.n_heads // cfg.n_kv_heads
    for s in slices:
        # every KV head one of my query heads reads is present, and no other
        needed = sorted({h // group for h in range(*s.heads)})
        assert list(range(*s.kv_heads)) == needed
        for h, local in zip(range(*s.heads), s.kv_of_head(cfg)):
            assert s.kv_heads[0] + local == h // group
        # quant blocks never straddle ranks: FFN rows, and Wo's input columns
        assert s.ffn[0] % BLOCK == 0 and s.ffn[1] % BLOCK == 0
        if s.n_heads:
            assert (s.heads[0] * cfg.head_dim) % BLOCK == 0
    # balanced: sizes differ by at most one group of heads (one head when head_dim % 32 == 0)
    unit = BLOCK // __import__("math").gcd(cfg.head_dim, BLOCK)
    sizes = [s.n_heads for s in slices]
    assert max(sizes) - min(sizes) <= unit
    assert plan_from_json(plan_to_json(slices)) == slices


def test_smollm2_two_ranks_share_a_kv_head():
    cfg = SHAPES["smollm2-135m"]
    a, b = plan(cfg, 2)
    assert a.heads == (0, 5) and b.heads == (5, 9)
    assert a.kv_heads == (0, 2) and b.kv_heads == (1, 3)  # KV head 1 lives on both ranks


def test_ranks_with_no_heads():
    cfg = SHAPES["smollm2-135m"]
    slices = plan(cfg, 12)
    empty = [s for s in slices if s.n_heads == 0]
    assert len(empty) == 3 and all(s.n_kv_heads == 0 for s in empty)
    assert sum(s.n_heads for s in slices) == 9


def test_small_head_dim_groups_heads_on_block_boundaries():
    cfg = SHAPES["tiny-hd16"]
    assert [s.heads for s in plan(cfg, 3)] == [(0, 2), (2, 4), (4, 4)]
    assert [s.kv_heads for s in plan(cfg, 3)] == [(0, 1), (1, 2), (0, 0)]
