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
from .quant import KV_BLOCK, kv_positions
from .buffers import Buffers
from .collectives import Collectives
from .slicefile import SliceFile

F32 = np.float32


class Activation:
    """An input batch x [B, n] and the buffers of its Q80 encoding (qx, dx, sx, xc: see
    kernels/matmul.py), which whoever makes x fills: a fused kernel (rmsnorm_q80,
    add_rmsnorm_q80, silu_mul_q80, rope_attention_q80) or quantize_q80. The forward makes
    those of h and att once and reuses them in every layer (the per-token path creates few
    Python objects)."""

    __slots__ = ("x", "q80", "bufs")

    def __init__(self, x: np.ndarray, bufs: Buffers, name: str):
        self.x, self.bufs = x, bufs
        self.q80 = bufs.q80(name + ".q80", *x.shape)


class Linear:
    """y_i = W_i x for this rank's parts of one or more matrices that share their input (wq, wk,
    wv; w1, w3): one kernel call per weight kind, over the tiles of all of them, so that small
    matrices still use every thread and a layer makes few calls."""

    def __init__(self, *mats):
        self.rows = [rows for _, rows, _, _ in mats]
        by_kind = {}   # kind -> (indices, kernel arguments: lists of arrays)
        for i, (kind, _, _, a) in enumerate(mats):
            if kind not in ("q40", "q41", "q80", "f32"):
                raise ValueError(f"unknown matrix kind {kind}")
            idx, args = by_kind.setdefault(kind, ([], {}))
            idx.append(i)
            for name, arr in a.items():
                if kind == "q80" and name == "wq":
                    arr = arr.view(np.uint16)   # how matmul_q80 reads the int8 weights
                args.setdefault(name, []).append(arr)
        # (kind, output indices or None for all of them in order, weight argument lists)
        self.calls = [(kind, None if idx == list(range(len(mats))) else idx,
                       [args[n] for n in {"q40": ("wq", "wd"), "q41": ("wq", "wd", "wm"),
                                          "q80": ("wq", "wd"), "f32": ("w",)}[kind]])
                      for kind, (idx, args) in by_kind.items()]

    def __call__(self, act: Activation, outs: list) -> list:
        """Writes W_i x into outs[i] ([B, rows_i] float32) and returns outs. Quantized kinds
        read act's Q80 encoding, which must be filled."""
        for kind, idx, w in self.calls:
            o = outs if idx is None else [outs[i] for i in idx]
            qx, dx, sx, xc = act.q80
            if kind == "q40":
                K.matmul_q40(w[0], w[1], xc, sx, dx, o)
            elif kind == "q41":
                K.matmul_q41(w[0], w[1], w[2], xc, sx, dx, o)
            elif kind == "q80":
                K.matmul_q80(w[0], w[1], qx, dx, o)
            else:
                K.matmul_f32(w[0], act.x, o)
        return outs


class FFN:
    """SwiGLU feed-forward over this rank's rows: W2 (silu(W1 h) * W3 h)."""

    def __init__(self, sf: SliceFile, prefix: str):
        self.w13 = Linear(sf.matrix(prefix + "w1"), sf.matrix(prefix + "w3"))
        self.w2 = Linear(sf.matrix(prefix + "w2"))
        self.hidden = self.w13.rows[0]

    def __call__(self, act: Activation, out: np.ndarray) -> np.ndarray:
        b, bufs = act.x.shape[0], act.bufs
        gate, up = self.w13(act, [bufs("gate", (b, self.hidden)), bufs("up", (b, self.hidden))])
        act = Activation(gate, bufs, "gate")
        K.silu_mul_q80(gate, up, *act.q80)
        return self.w2(act, [out])[0]


class Layer:
    def __init__(self, sf: SliceFile, l: int):
        cfg = sf.config
        p = f"layers.{l}."
        vec = lambda name: np.asarray(sf.vector(p + name))  # noqa: E731
        self.attn_norm, self.ffn_norm = vec("attn_norm"), vec("ffn_norm")
        self.qkv = Linear(*(sf.matrix(p + w) for w in ("wq", "wk", "wv")))
        self.wo = Linear(sf.matrix(p + "wo"))
        # Qwen2: q/k/v biases (this rank's rows); Qwen3: per-head RMSNorm of q and k
        self.bq, self.bk, self.bv = (vec(b) for b in ("bq", "bk", "bv")) if cfg.attn_bias else (None,) * 3
        self.q_norm, self.k_norm = (vec("q_norm"), vec("k_norm")) if cfg.qk_norm else (None, None)
        if cfg.n_experts:  # Qwen3-MoE: the router is on every rank, every expert is split like a dense FFN
            self.router = vec("router")
            self.experts = [FFN(sf, f"{p}experts.{e}.") for e in range(cfg.n_experts)]
        else:
            self.ffn = FFN(sf, p)


def kv_cache(n_layers: int, shape: tuple, storage: str, kv_dir, rank: int):
    """Per-layer K and V arrays, float32: V of `shape` [slots, kv heads, positions, head_dim]
    (positions a multiple of KV_BLOCK = 64), K [slots, kv heads, positions/64, head_dim, 64]
    (keys transposed per block of 64 positions: see kernels/ops.py attention).

    memory: np.zeros maps untouched pages lazily, so memory grows with the positions used.
    disk: all layers' K and V in one memory-mapped file in kv_dir (default $TMPDIR), so the
    page cache may evict it. The file is unlinked as soon as it is mapped: it takes disk space
    until the process ends (however it ends) and is never left behind."""
    per_layer = int(np.prod(shape))
    kshape = shape[:2] + (shape[2] // KV_BLOCK, shape[3], KV_BLOCK)
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
        return [k.reshape(kshape) for k in buf[0]], list(buf[1])
    if storage in ("memory", "disk"):
        return [np.zeros(kshape, F32) for _ in range(n_layers)], [np.zeros(shape, F32) for _ in range(n_layers)]
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
        self.output = Linear(sf.matrix("output"))
        self.bufs = Buffers()
        self.vocab_counts = [v1 - v0 for (v0, v1) in (r.vocab for r in sf.plan)]
        self.embedding = sf.embedding() if comm.rank == 0 else None
        angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * cfg.rope_inv_freq()[None, :]
        self.cos, self.sin = np.cos(angles).astype(F32), np.sin(angles).astype(F32)
        # KV cache of this rank's KV heads, per layer: [slot, kv head, position, head_dim]
        shape = (n_slots, self.nkv, kv_positions(max_seq_len), self.hd)
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
            x = np.ascontiguousarray(act.x[rows])
            ax = Activation(x, self.bufs, "expert")
            K.quantize_q80(x, *ax.q80)
            y = layer.experts[e](ax, np.empty_like(x))
            part[rows] += y * weight[rows, slot][:, None].astype(F32)
        return part

    def forward(self, tokens: np.ndarray, slots: np.ndarray, pos: np.ndarray, want: np.ndarray, topk: int = 0):
        """One batch of (token, sequence slot, position) entries; logits of the entries with
        want != 0 come back on the root ([n_want, vocab]), None elsewhere. topk > 0: only each
        rank's topk best logits travel; the others come back as -inf (enough for greedy and
        top-k sampling)."""
        cfg, comm, wire, bufs = self.cfg, self.comm, self.wire, self.bufs
        b = len(tokens)
        x = bufs("x", (b, cfg.dim))
        if comm.rank == 0:
            x[...] = self.embed(tokens)
        comm.bcast_x(x, wire)
        scale = F32(1.0 / math.sqrt(self.hd))
        eps = F32(cfg.norm_eps)
        h = Activation(bufs("h", (b, cfg.dim)), bufs, "h")   # the normed x, input of wq/wk/wv and w1/w3
        part = bufs("part", (b, cfg.dim))
        q, k, v = qkv = [bufs("q", (b, self.nh * self.hd)), bufs("k", (b, self.nkv * self.hd)), bufs("v", (b, self.nkv * self.hd))]
        q3, k3, v3 = q.reshape(b, self.nh, self.hd), k.reshape(b, self.nkv, self.hd), v.reshape(b, self.nkv, self.hd)
        att = Activation(bufs("att", (b, self.nh * self.hd)), bufs, "att")
        att3 = att.x.reshape(b, self.nh, self.hd)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            # attention: this rank's query heads and the KV heads they read
            K.rmsnorm_q80(x, layer.attn_norm, eps, h.x, *h.q80)
            layer.qkv(h, qkv)
            if cfg.attn_bias:
                q += layer.bq
                k += layer.bk
                v += layer.bv
            if self.nh:   # RoPE, KV-cache store, attention and the Q80 of its output: one call
                qh, kh = (self._head_norm(q3, layer.q_norm), self._head_norm(k3, layer.k_norm)) if cfg.qk_norm else (q3, k3)
                K.rope_attention_q80(qh, kh, v3, slots, pos, self.cos, self.sin, cfg.rope_interleaved, kc, vc,
                                     self.kv_of_head, scale, att3, *att.q80)
            layer.wo(att, [part])
            comm.allreduce_sum(part, wire, K)
            # feed-forward: this rank's FFN rows (SwiGLU), on x += the attention's output
            K.add_rmsnorm_q80(x, part, layer.ffn_norm, eps, h.x, *h.q80)
            if cfg.n_experts:
                part[...] = self._moe(layer, h)
            else:
                layer.ffn(h, part)
            comm.allreduce_sum(part, wire, K)
            x += part
        rows = np.flatnonzero(want)
        if len(rows) == 0:
            return None
        xs = np.ascontiguousarray(x[rows]) if len(rows) < b else x
        act = Activation(bufs("hs", xs.shape), bufs, "hs")
        K.rmsnorm_q80(xs, self.out_norm, eps, act.x, *act.q80)
        # a fresh array: the logits are the caller's to keep
        local = self.output(act, [np.empty((len(rows), self.output.rows[0]), F32)])[0]
        if not topk or comm.size == 1:
            return comm.gather_rows(local, self.vocab_counts)
        return self._gather_topk(local, topk)

    def _gather_topk(self, local: np.ndarray, k: int):
        v0 = sum(self.vocab_counts[: self.comm.rank])
        n = local.shape[0]
        k_here = min(k, local.shape[1])
        ids = self.bufs("topk.ids", (n, k), np.int32)
        vals = self.bufs("topk.vals", (n, k))
        ids[...] = 0
        vals[...] = -np.inf   # padding when this rank holds fewer than k rows
        if k_here:
            # greedy: argmax takes 3 us where argpartition took 0.23 ms (a 24,576-logit slice)
            idx = (np.argmax(local, axis=1)[:, None] if k_here == 1
                   else np.argpartition(-local, k_here - 1, axis=1)[:, :k_here])
            ids[:, :k_here] = idx + v0
            vals[:, :k_here] = np.take_along_axis(local, idx, axis=1)
        got = self.comm.gather_topk(vals, ids)
        if got is None:
            return None
        vals, ids = got
        out = np.full((n, self.cfg.vocab_size), -np.inf, F32)
        np.put_along_axis(out, ids, vals, axis=1)
        return out
