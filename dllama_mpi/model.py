"""The forward pass of one rank's slice of the model, read top to bottom.

Every rank runs this same code on its own slice; the only differences are the sizes of its
parts (which may be zero) and that rank 0 looks up the embedding. Quantized matrices multiply
Q80-quantized activations, f32 matrices multiply f32 activations.
"""
from __future__ import annotations

import math
import gguf
import numpy as np

from . import kernels as K
from .collectives import Collectives
from .slicefile import SliceFile

F32 = np.float32


class Activation:
    """An input vector batch [B, n] with its Q80 encoding made once, on first use."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self._q80 = None

    def q80(self):
        if self._q80 is None:
            b, n = self.x.shape
            qx = np.empty((b, n // 32, 32), np.int8)
            dx = np.empty((b, n // 32), F32)
            sx = np.empty((b, n // 32), np.int32)
            K.quantize_q80(self.x, qx, dx, sx)
            self._q80 = (qx, dx, sx)
        return self._q80


class Linear:
    """y = W x for this rank's part of a matrix, in the kernel layout of its kind."""

    def __init__(self, kind: str, rows: int, cols: int, arrays: dict):
        self.kind, self.rows, self.cols, self.a = kind, rows, cols, arrays

    def __call__(self, act: Activation) -> np.ndarray:
        out = np.empty((act.x.shape[0], self.rows), F32)
        if self.rows == 0:
            return out
        if self.cols == 0:  # this rank holds no input columns: its partial sum is zero
            out.fill(0)
            return out
        a = self.a
        if self.kind == "f32":
            K.matmul_f32(a["w"], act.x, out)
            return out
        qx, dx, sx = act.q80()
        if self.kind == "q40":
            K.matmul_q40(a["wq"], a["wd"], qx, dx, out)
        elif self.kind == "q41":
            K.matmul_q41(a["wq"], a["wd"], a["wm"], qx, dx, sx, out)
        elif self.kind == "q80":
            K.matmul_q80(a["wq"], a["wd"], qx, dx, out)
        else:
            raise ValueError(f"unknown matrix kind {self.kind}")
        return out


class Layer:
    def __init__(self, sf: SliceFile, l: int):
        p = f"layers.{l}."
        self.attn_norm = np.asarray(sf.norm(p + "attn_norm"))
        self.ffn_norm = np.asarray(sf.norm(p + "ffn_norm"))
        for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            setattr(self, w, Linear(*sf.matrix(p + w)))


class RankModel:
    def __init__(self, sf: SliceFile, comm: Collectives, max_seq_len: int, wire: str, n_slots: int = 1):
        cfg = self.cfg = sf.config
        s = sf.slice
        self.comm, self.wire, self.max_seq_len = comm, wire, max_seq_len
        self.nh, self.nkv, self.hd = s.n_heads, s.n_kv_heads, cfg.head_dim
        self.kv_of_head = np.asarray(s.kv_of_head(cfg), np.int32)
        self.layers = [Layer(sf, l) for l in range(cfg.n_layers)]
        self.out_norm = np.asarray(sf.norm("out_norm"))
        self.output = Linear(*sf.matrix("output"))
        self.vocab_counts = [v1 - v0 for (v0, v1) in (r.vocab for r in sf.plan)]
        self.embedding = sf.embedding() if comm.rank == 0 else None
        angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * cfg.rope_inv_freq()[None, :]
        self.cos, self.sin = np.cos(angles).astype(F32), np.sin(angles).astype(F32)
        # KV cache of this rank's KV heads, per layer: [slot, kv head, position, head_dim].
        # np.zeros maps untouched pages lazily, so memory grows with the positions used.
        shape = (n_slots, self.nkv, max_seq_len, self.hd)
        self.k_cache = [np.zeros(shape, F32) for _ in self.layers]
        self.v_cache = [np.zeros(shape, F32) for _ in self.layers]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        ggml_type, raw = self.embedding
        rows = np.asarray(raw[tokens])
        return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(ggml_type)).astype(F32).reshape(len(tokens), -1)

    def forward(self, tokens: np.ndarray, slots: np.ndarray, pos: np.ndarray, want: np.ndarray):
        """One batch of (token, sequence slot, position) entries; logits of the entries with
        want != 0 come back on the root ([n_want, vocab]), None elsewhere."""
        cfg, comm, wire = self.cfg, self.comm, self.wire
        b = len(tokens)
        x = self.embed(tokens) if comm.rank == 0 else np.empty((b, cfg.dim), F32)
        comm.bcast_array(x)
        scale = F32(1.0 / math.sqrt(self.hd))
        h = np.empty_like(x)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            # attention: this rank's query heads and the KV heads they read
            K.rmsnorm(x, layer.attn_norm, F32(cfg.norm_eps), h)
            act = Activation(h)
            q = layer.wq(act).reshape(b, self.nh, self.hd)
            k = layer.wk(act).reshape(b, self.nkv, self.hd)
            v = layer.wv(act).reshape(b, self.nkv, self.hd)
            att = np.zeros((b, self.nh, self.hd), F32)
            if self.nh:
                K.rope(q, pos, self.cos, self.sin, cfg.rope_interleaved)
                K.rope(k, pos, self.cos, self.sin, cfg.rope_interleaved)
                kc[slots, :, pos] = k
                vc[slots, :, pos] = v
                K.attention(q, kc, vc, slots, pos, self.kv_of_head, scale, att)
            part = layer.wo(Activation(att.reshape(b, self.nh * self.hd)))
            comm.allreduce_sum(part, wire, K)
            x += part
            # feed-forward: this rank's FFN rows (SwiGLU)
            K.rmsnorm(x, layer.ffn_norm, F32(cfg.norm_eps), h)
            act = Activation(h)
            gate = layer.w1(act)
            K.silu_mul(gate, layer.w3(act))
            part = layer.w2(Activation(gate))
            comm.allreduce_sum(part, wire, K)
            x += part
        rows = np.flatnonzero(want)
        if len(rows) == 0:
            return None
        xs = np.ascontiguousarray(x[rows])
        hs = np.empty_like(xs)
        K.rmsnorm(xs, self.out_norm, F32(cfg.norm_eps), hs)
        return comm.gather_rows(self.output(Activation(hs)), self.vocab_counts)
