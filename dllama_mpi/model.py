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


class FFN:
    """SwiGLU feed-forward over this rank's rows: W2 (silu(W1 h) * W3 h)."""

    def __init__(self, sf: SliceFile, prefix: str):
        self.w1, self.w2, self.w3 = (Linear(*sf.matrix(prefix + w)) for w in ("w1", "w2", "w3"))

    def __call__(self, act: Activation) -> np.ndarray:
        gate = self.w1(act)
        K.silu_mul(gate, self.w3(act))
        return self.w2(Activation(gate))


class Layer:
    def __init__(self, sf: SliceFile, l: int):
        cfg = sf.config
        p = f"layers.{l}."
        vec = lambda name: np.asarray(sf.vector(p + name))  # noqa: E731
        self.attn_norm, self.ffn_norm = vec("attn_norm"), vec("ffn_norm")
        self.wq, self.wk, self.wv, self.wo = (Linear(*sf.matrix(p + w)) for w in ("wq", "wk", "wv", "wo"))
        # Qwen2: q/k/v biases (this rank's rows); Qwen3: per-head RMSNorm of q and k
        self.bq, self.bk, self.bv = (vec(b) for b in ("bq", "bk", "bv")) if cfg.attn_bias else (None,) * 3
        self.q_norm, self.k_norm = (vec("q_norm"), vec("k_norm")) if cfg.qk_norm else (None, None)
        if cfg.n_experts:  # Qwen3-MoE: the router is on every rank, every expert is split like a dense FFN
            self.router = vec("router")
            self.experts = [FFN(sf, f"{p}experts.{e}.") for e in range(cfg.n_experts)]
        else:
            self.ffn = FFN(sf, p)


def kv_cache(n_layers: int, shape: tuple, storage: str, kv_dir, rank: int):
    """Per-layer K and V arrays of `shape`, float32.

    memory: np.zeros maps untouched pages lazily, so memory grows with the positions used.
    disk: all layers' K and V in one memory-mapped file in kv_dir (default $TMPDIR), so the
    page cache may evict it. The file is unlinked as soon as it is mapped: it takes disk space
    until the process ends (however it ends) and is never left behind."""
    per_layer = int(np.prod(shape))
    if storage == "disk" and per_layer:
        import mmap
        import os
        import tempfile
        if kv_dir is not None and not os.path.isdir(kv_dir):
            raise OSError(2, f"--kv-cache-dir {kv_dir} is not a folder on this host")
        fd, path = tempfile.mkstemp(prefix=f"dllama-kv-rank{rank}-", suffix=".f32", dir=kv_dir)
        try:
            nbytes = 2 * n_layers * per_layer * 4
            try:
                os.posix_fallocate(fd, 0, nbytes)  # reserve the space now: a full disk is an error here,
            except OSError as e:                   # not a SIGBUS in the middle of a token
                raise OSError(e.errno, f"cannot reserve {nbytes / 2**20:.0f} MiB for the KV cache in "
                                       f"{os.path.dirname(path)}: {e.strerror}") from None
            buf = np.frombuffer(mmap.mmap(fd, nbytes), F32).reshape(2, n_layers, *shape)
        finally:
            os.close(fd)
            os.unlink(path)
        return list(buf[0]), list(buf[1])
    if storage in ("memory", "disk"):
        return [np.zeros(shape, F32) for _ in range(n_layers)], [np.zeros(shape, F32) for _ in range(n_layers)]
    raise ValueError(f"unknown KV cache storage {storage!r}: use memory or disk")


class RankModel:
    def __init__(self, sf: SliceFile, comm: Collectives, max_seq_len: int, wire: str, n_slots: int = 1,
                 kv_storage: str = "memory", kv_dir=None):
        cfg = self.cfg = sf.config
        s = sf.slice
        self.comm, self.wire, self.max_seq_len = comm, wire, max_seq_len
        self.nh, self.nkv, self.hd = s.n_heads, s.n_kv_heads, cfg.head_dim
        self.kv_of_head = np.asarray(s.kv_of_head(cfg), np.int32)
        self.layers = [Layer(sf, l) for l in range(cfg.n_layers)]
        self.out_norm = np.asarray(sf.vector("out_norm"))
        self.output = Linear(*sf.matrix("output"))
        self.vocab_counts = [v1 - v0 for (v0, v1) in (r.vocab for r in sf.plan)]
        self.embedding = sf.embedding() if comm.rank == 0 else None
        angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * cfg.rope_inv_freq()[None, :]
        self.cos, self.sin = np.cos(angles).astype(F32), np.sin(angles).astype(F32)
        # KV cache of this rank's KV heads, per layer: [slot, kv head, position, head_dim]
        shape = (n_slots, self.nkv, max_seq_len, self.hd)
        self.k_cache, self.v_cache = kv_cache(len(self.layers), shape, kv_storage, kv_dir, comm.rank)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        ggml_type, raw = self.embedding
        rows = np.asarray(raw[tokens])
        return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(ggml_type)).astype(F32).reshape(len(tokens), -1)

    def _head_norm(self, t: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm of every head vector of t [B, heads, hd] with the shared weight w [hd]."""
        b, heads, hd = t.shape
        out = np.empty((b * heads, hd), F32)
        K.rmsnorm(np.ascontiguousarray(t.reshape(b * heads, hd)), w, F32(self.cfg.norm_eps), out)
        return out.reshape(b, heads, hd)

    def _moe(self, layer: Layer, act: Activation) -> np.ndarray:
        """Mixture of experts: softmax router, top-k experts per token, weights renormalized
        (norm_topk_prob); each rank computes its rows of every chosen expert."""
        cfg = self.cfg
        logits = act.x @ layer.router.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True), dtype=np.float64)
        probs /= probs.sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, : cfg.n_active_experts]
        weight = np.take_along_axis(probs, top, axis=1)
        if cfg.norm_topk_prob:
            weight /= weight.sum(axis=1, keepdims=True)
        part = np.zeros_like(act.x)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            y = layer.experts[e](Activation(np.ascontiguousarray(act.x[rows])))
            part[rows] += y * weight[rows, slot][:, None].astype(F32)
        return part

    def forward(self, tokens: np.ndarray, slots: np.ndarray, pos: np.ndarray, want: np.ndarray, topk: int = 0):
        """One batch of (token, sequence slot, position) entries; logits of the entries with
        want != 0 come back on the root ([n_want, vocab]), None elsewhere. topk > 0: only each
        rank's topk best logits travel; the others come back as -inf (enough for greedy and
        top-k sampling)."""
        cfg, comm, wire = self.cfg, self.comm, self.wire
        b = len(tokens)
        x = self.embed(tokens) if comm.rank == 0 else np.empty((b, cfg.dim), F32)
        comm.bcast_x(x, wire)
        scale = F32(1.0 / math.sqrt(self.hd))
        h = np.empty_like(x)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            # attention: this rank's query heads and the KV heads they read
            K.rmsnorm(x, layer.attn_norm, F32(cfg.norm_eps), h)
            act = Activation(h)
            q, k, v = layer.wq(act), layer.wk(act), layer.wv(act)
            if cfg.attn_bias:
                q += layer.bq
                k += layer.bk
                v += layer.bv
            q = q.reshape(b, self.nh, self.hd)
            k = k.reshape(b, self.nkv, self.hd)
            v = v.reshape(b, self.nkv, self.hd)
            att = np.zeros((b, self.nh, self.hd), F32)
            if self.nh:
                if cfg.qk_norm:
                    q = self._head_norm(q, layer.q_norm)
                    k = self._head_norm(k, layer.k_norm)
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
            part = self._moe(layer, Activation(h)) if cfg.n_experts else layer.ffn(Activation(h))
            comm.allreduce_sum(part, wire, K)
            x += part
        rows = np.flatnonzero(want)
        if len(rows) == 0:
            return None
        xs = np.ascontiguousarray(x[rows])
        hs = np.empty_like(xs)
        K.rmsnorm(xs, self.out_norm, F32(cfg.norm_eps), hs)
        local = self.output(Activation(hs))
        if not topk or comm.size == 1:
            return comm.gather_rows(local, self.vocab_counts)
        return self._gather_topk(local, topk)

    def _gather_topk(self, local: np.ndarray, k: int):
        v0 = sum(self.vocab_counts[: self.comm.rank])
        n = local.shape[0]
        k_here = min(k, local.shape[1])
        ids = np.zeros((n, k), np.int32)
        vals = np.full((n, k), -np.inf, F32)  # padding when this rank holds fewer than k rows
        if k_here:
            idx = np.argpartition(-local, k_here - 1, axis=1)[:, :k_here]
            ids[:, :k_here] = idx + v0
            vals[:, :k_here] = np.take_along_axis(local, idx, axis=1)
        got = self.comm.gather_topk(vals, ids)
        if got is None:
            return None
        vals, ids = got
        out = np.full((n, self.cfg.vocab_size), -np.inf, F32)
        np.put_along_axis(out, ids, vals, axis=1)
        return out
