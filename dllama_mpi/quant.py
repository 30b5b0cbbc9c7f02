"""Weight layout conversion, GGML requantization and plain-numpy references of the kernels.

(a) Converting weight matrices into the kernels' "tiled" layout (128 output rows interleaved per
    tile, quant blocks of 32 along the input dimension), from raw GGML blocks (uint8, byte-identical
    to GGML Q4_0 / Q4_1 / Q8_0) or from float32; quantizing float32 to GGML blocks
    (`gguf.quants.quantize`, which implements the GGML reference quantizers).

      q40: wq uint16[ntile, nb, 8, T], wd float32[ntile, nb, T]         value = d*(q-8)
      q41: wq uint16[ntile, nb, 8, T], wd, wm float32[ntile, nb, T]     value = d*q + m
           (word m = GGML block bytes 2m, 2m+1 little-endian: see kernels/matmul.py)
      q80: wq int8[ntile, nb, 32, T],  wd float32[ntile, nb, T]         value = d*q
      f32: w float32[ntile, cols, T]                                     w[t, c, r] = W[T*t+r, c]

    Rows are padded up to a multiple of T with entries contributing exactly 0.

(b) `*_ref`: numpy oracles of every kernel in dllama_mpi.kernels. The quantized matmul references
    and `quantize_q80_ref` / `dequant_sum_q80_ref` are bit-exact (same integer dot per block, same
    float32 operation order); the others are float64 references for tolerance checks.

(The Q80 wire format between ranks lives in collectives.py, next to the MPI calls that use it.)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as _gq

T = 128          # output rows per tile (the kernels' loops are written for it: kernels/matmul.py)
KV_BLOCK = 64    # key-cache positions per block (kernels/ops.py attention and kv_store are written for it)
QK = 32          # elements per quant block

_BLOCK_BYTES = {"q40": 18, "q41": 20, "q80": 34}
_GGML_TYPE = {
    "q40": GGMLQuantizationType.Q4_0,
    "q41": GGMLQuantizationType.Q4_1,
    "q80": GGMLQuantizationType.Q8_0,
}
QTYPES = ("q40", "q41", "q80", "f32")


def kv_positions(max_seq_len: int) -> int:
    """Positions the KV cache holds for --max-seq-len: rounded up to whole key blocks."""
    return -(-max_seq_len // KV_BLOCK) * KV_BLOCK


def ntiles(rows: int) -> int:
    return (rows + T - 1) // T


# --------------------------------------------------------------------------------------------
# (a) GGML blocks <-> float32, tiling
# --------------------------------------------------------------------------------------------

def quantize_blocks(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, cols] -> raw GGML blocks uint8 [rows, cols/32 * bytes_per_block]
    (Q4_0 / Q4_1 / Q8_0 reference quantizers of gguf.quants, byte-identical to GGML)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK:
        raise ValueError(f"need a 2-D matrix with cols % 32 == 0, got shape {w.shape}")
    return _gq.quantize(w, _GGML_TYPE[qtype])


def quantize_q40_mse(w: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """float32 [rows, cols] -> Q4_0 blocks chosen for least squared error, byte layout as GGML.

    GGML's reference Q4_0 quantizer fixes d = max/-8. Requantizing already-quantized weights
    (e.g. Q4_1 -> Q4_0) with it loses a lot; like llama.cpp's make_qx_quants we try 19 scales
    around it per block, keep the levels with the best least-squares fit, and store that
    fit's scale. Costs 19 passes over the tensor, in row chunks to bound memory."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK:
        raise ValueError(f"need a 2-D matrix with cols % 32 == 0, got shape {w.shape}")
    rows, cols = w.shape
    out = np.empty((rows, cols // QK * 18), np.uint8)
    for r0 in range(0, rows, chunk_rows):
        x = w[r0:r0 + chunk_rows].reshape(-1, QK).astype(np.float64)
        amax_at = np.abs(x).argmax(axis=1)
        vmax = x[np.arange(len(x)), amax_at]
        safe = np.where(vmax == 0, 1.0, vmax)
        best_score = np.full(len(x), -1.0)
        best_l = np.zeros(x.shape, np.float64)
        for step in range(-9, 10):
            iscale = -(8 + 0.1 * step) / safe
            lv = np.clip(np.rint(x * iscale[:, None]), -8, 7)
            sumlx = (lv * x).sum(axis=1)
            suml2 = (lv * lv).sum(axis=1)
            score = np.where(suml2 > 0, sumlx * sumlx / np.where(suml2 > 0, suml2, 1), 0.0)
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_l[better] = lv[better]
        suml2 = (best_l * best_l).sum(axis=1)
        d = np.where(suml2 > 0, (best_l * x).sum(axis=1) / np.where(suml2 > 0, suml2, 1), 0.0)
        d16 = d.astype(np.float16)
        # re-round the levels against the stored (f16) scale
        d32 = d16.astype(np.float32).astype(np.float64)
        inv = np.where(d32 != 0, 1.0 / np.where(d32 != 0, d32, 1), 0.0)
        q = (np.clip(np.rint(x * inv[:, None]), -8, 7) + 8).astype(np.uint8)
        blk = out[r0:r0 + chunk_rows].reshape(-1, 18)
        blk[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
        blk[:, 2:18] = q[:, :16] | (q[:, 16:] << 4)
    return out


def requantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, cols] -> GGML blocks of qtype, with the best quantizer we have for it."""
    return quantize_q40_mse(w) if qtype == "q40" else quantize_blocks(w, qtype)


def dequantize_blocks(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """Raw GGML blocks uint8 [rows, nb*bytes] -> float32 [rows, nb*32] (gguf.quants.dequantize)."""
    return _gq.dequantize(np.asarray(blocks, dtype=np.uint8), _GGML_TYPE[qtype])


def _split_blocks(blocks: np.ndarray, qtype: str, cols: int | None):
    bb = _BLOCK_BYTES[qtype]
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8:
        blocks = blocks.view(np.uint8)
    if blocks.ndim == 1:
        if cols is None:
            raise ValueError("1-D block data needs cols")
        blocks = blocks.reshape(-1, cols // QK * bb)
    elif blocks.ndim > 2:
        blocks = blocks.reshape(blocks.shape[0], -1)
    rows, nbytes = blocks.shape
    if nbytes % bb:
        raise ValueError(f"{qtype}: row of {nbytes} bytes is not a whole number of {bb}-byte blocks")
    nb = nbytes // bb
    if cols is not None and cols != nb * QK:
        raise ValueError(f"{qtype}: cols={cols} but rows hold {nb * QK} elements")
    return blocks.reshape(rows, nb, bb), rows, nb


def _tile_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
    """a [rows, ...] -> [ntile, T, ...] padded with `fill`."""
    nt = ntiles(rows)
    out = np.empty((nt * T,) + a.shape[1:], dtype=a.dtype)
    out[:rows] = a
    out[rows:] = fill
    return out.reshape((nt, T) + a.shape[1:])


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] -> float32 [...]"""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _tile_scales(s: np.ndarray, rows: int) -> np.ndarray:
    # s [rows, nb] -> [ntile, nb, T]
    return np.ascontiguousarray(_tile_rows(s, rows, 0.0).transpose(0, 2, 1))


def _nibble_words(nibbles: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """Block nibble bytes uint8 [rows, nb, 16] -> uint16 [ntile, nb, 8, T]: word m of a row is
    bytes 2m (low) and 2m+1 (high)."""
    t = _tile_rows(nibbles, rows, fill)                      # [nt, T, nb, 16]
    pairs = t.reshape(t.shape[:3] + (8, 2)).transpose(0, 2, 3, 1, 4)  # [nt, nb, 8, T, 2]
    return np.ascontiguousarray(pairs).view("<u2")[..., 0].astype(np.uint16, copy=False)


def _word_bytes(wq: np.ndarray) -> np.ndarray:
    """uint16 [nt, nb, 8, T] words -> the block bytes uint8 [nt, nb, 16, T]."""
    nt, nb, _, r = wq.shape
    out = np.empty((nt, nb, 8, 2, r), np.uint8)
    out[:, :, :, 0] = wq & 0xFF
    out[:, :, :, 1] = wq >> 8
    return out.reshape(nt, nb, 16, r)


def tile_q40(blocks: np.ndarray, cols: int | None = None):
    """Raw Q4_0 blocks uint8 [rows, nb*18] -> (wq uint16[ntile, nb, 8, T], wd float32[ntile, nb, T])."""
    blk, rows, nb = _split_blocks(blocks, "q40", cols)
    wd = _tile_scales(_f16(blk[:, :, 0:2]), rows)
    return _nibble_words(blk[:, :, 2:18], rows, 0x88), wd


def tile_q41(blocks: np.ndarray, cols: int | None = None):
    """Raw Q4_1 blocks uint8 [rows, nb*20] -> (wq uint16[ntile, nb, 8, T], wd, wm float32[ntile, nb, T])."""
    blk, rows, nb = _split_blocks(blocks, "q41", cols)
    wd = _tile_scales(_f16(blk[:, :, 0:2]), rows)
    wm = _tile_scales(_f16(blk[:, :, 2:4]), rows)
    return _nibble_words(blk[:, :, 4:20], rows, 0), wd, wm


def tile_q80(blocks: np.ndarray, cols: int | None = None):
    """Raw Q8_0 blocks uint8 [rows, nb*34] -> (wq int8[ntile, nb, 32, T], wd float32[ntile, nb, T])."""
    blk, rows, nb = _split_blocks(blocks, "q80", cols)
    wd = _tile_scales(_f16(blk[:, :, 0:2]), rows)
    wq = np.ascontiguousarray(_tile_rows(blk[:, :, 2:34].view(np.int8), rows, 0).transpose(0, 2, 3, 1))
    return wq, wd


def tile_f32(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> float32 [ntile, cols, T]."""
    w = np.asarray(w, dtype=np.float32)
    rows = w.shape[0]
    return np.ascontiguousarray(_tile_rows(w, rows, 0.0).transpose(0, 2, 1))


def tile_blocks(blocks: np.ndarray, qtype: str, cols: int | None = None) -> tuple:
    """Dispatch: raw GGML blocks of `qtype` ('q40', 'q41', 'q80') -> tuple of tiled arrays."""
    if qtype == "q40":
        return tile_q40(blocks, cols)
    if qtype == "q41":
        return tile_q41(blocks, cols)
    if qtype == "q80":
        return tile_q80(blocks, cols)
    raise ValueError(f"unknown quant type {qtype!r}")


def tile_float(w: np.ndarray, qtype: str) -> tuple:
    """float32 [rows, cols] -> tiled arrays of `qtype` (quantizing with the GGML reference
    quantizer for q40/q41/q80). Always returns a tuple ((w,) for f32)."""
    if qtype == "f32":
        return (tile_f32(w),)
    return tile_blocks(quantize_blocks(w, qtype), qtype)


def untile(arrays: tuple, qtype: str, rows: int) -> np.ndarray:
    """Tiled arrays -> dequantized float32 [rows, cols] (value formulas exactly as GGML/gguf)."""
    if qtype == "f32":
        (w,) = arrays
        return np.ascontiguousarray(w.transpose(0, 2, 1).reshape(-1, w.shape[1])[:rows])
    if qtype in ("q40", "q41"):
        wq = _word_bytes(arrays[0])
        q = np.concatenate([wq & 0x0F, wq >> 4], axis=2)           # [nt, nb, 32, T]
        q = q.astype(np.int8)
        if qtype == "q40":
            q = q - np.int8(8)
    elif qtype == "q80":
        q = arrays[0]
    else:
        raise ValueError(f"unknown quant type {qtype!r}")
    wd = arrays[1]
    vals = q.astype(np.float32) * wd[:, :, None, :]
    if qtype == "q41":
        vals = vals + arrays[2][:, :, None, :]
    nt, nb = wd.shape[0], wd.shape[1]
    # [nt, nb, 32, T] -> [nt, T, nb, 32] -> [nt*T, nb*32]
    return np.ascontiguousarray(vals.transpose(0, 3, 1, 2).reshape(nt * T, nb * QK)[:rows])


def tiled_rows_capacity(arrays: tuple) -> int:
    return arrays[0].shape[0] * T


# --------------------------------------------------------------------------------------------
# (b) numpy references of the kernels
# --------------------------------------------------------------------------------------------

def _roundf(v: np.ndarray) -> np.ndarray:
    """Round half away from zero (C roundf), exact for float32."""
    a = np.abs(v)
    f = np.floor(a)
    r = f + (a - f >= np.float32(0.5)).astype(v.dtype)
    return np.where(v < 0, -r, r)


def q4_coeffs_ref(qx: np.ndarray) -> np.ndarray:
    """qx int8[B, nb, 32] -> the 4-bit kernels' coefficients int16[B, nb, 8, 4] (kernels/matmul.py)."""
    q = qx.astype(np.int16)
    e0, e1 = q[:, :, 0:16:2], q[:, :, 1:16:2]          # elements 2m, 2m+1
    f0, f1 = q[:, :, 16::2], q[:, :, 17::2]            # elements 2m+16, 2m+17
    return np.stack([e0, f0 - 16 * e0, e1 - 16 * f0, f1 - 16 * e1], axis=3)


def quantize_q80_ref(x: np.ndarray):
    """float32 [B, n] -> (qx int8[B, nb, 32], dx float32[B, nb], sx int32[B, nb])."""
    x = np.asarray(x, dtype=np.float32)
    B, n = x.shape
    xb = x.reshape(B, n // QK, QK)
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d == 0, np.float32(0.0), np.float32(1.0) / d).astype(np.float32)
    q = _roundf((xb * idd[:, :, None]).astype(np.float32)).astype(np.int8)
    sx = q.astype(np.int32).sum(axis=2, dtype=np.int32)
    return q, d, sx


def _idot_q4(wq: np.ndarray, qx: np.ndarray, offset: int) -> np.ndarray:
    """Integer block dots: [B, ntile, nb, T] of sum_j (q_w - offset) * q_x."""
    wq = _word_bytes(wq)
    lo = (wq & 0x0F).astype(np.int64) - offset
    hi = (wq >> 4).astype(np.int64) - offset
    qx = qx.astype(np.int64)
    return (np.einsum("tkjr,bkj->btkr", lo, qx[:, :, :16])
            + np.einsum("tkjr,bkj->btkr", hi, qx[:, :, 16:])).astype(np.int32)


def _accumulate(idot: np.ndarray, wd: np.ndarray, dx: np.ndarray, rows: int,
                wm: np.ndarray | None = None, sx: np.ndarray | None = None) -> np.ndarray:
    B, nt, nb, _ = idot.shape
    acc = np.zeros((B, nt, T), np.float32)
    for k in range(nb):
        s = dx[:, k][:, None, None]                                     # [B, 1, 1]
        term = idot[:, :, k, :].astype(np.float32) * (wd[None, :, k, :] * s)
        if wm is not None:
            ms = (dx[:, k] * sx[:, k].astype(np.float32))[:, None, None]
            term = term + wm[None, :, k, :] * ms
        acc = acc + term
    return acc.reshape(B, nt * T)[:, :rows].copy()


def matmul_q40_ref(wq, wd, qx, dx, rows: int) -> np.ndarray:
    return _accumulate(_idot_q4(wq, qx, 8), wd, dx, rows)


def matmul_q41_ref(wq, wd, wm, qx, dx, sx, rows: int) -> np.ndarray:
    return _accumulate(_idot_q4(wq, qx, 0), wd, dx, rows, wm, sx)


def matmul_q80_ref(wq, wd, qx, dx, rows: int) -> np.ndarray:
    idot = np.einsum("tkjr,bkj->btkr", wq.astype(np.int64), qx.astype(np.int64)).astype(np.int32)
    return _accumulate(idot, wd, dx, rows)


def matmul_f32_ref(w, x, rows: int) -> np.ndarray:
    """float64 reference (the kernel accumulates in float32 over cols in order)."""
    W = untile((w,), "f32", rows).astype(np.float64)
    return (np.asarray(x, np.float64) @ W.T).astype(np.float32)


def dequant_sum_q80_ref(qx, dx) -> np.ndarray:
    """qx int8[N, B, nb, 32], dx float32[N, B, nb] -> float32 [B, nb*32], summed over n in order
    (what sum_q80_records computes from the same values packed as wire records)."""
    N, B, nb, _ = qx.shape
    out = np.zeros((B, nb, QK), np.float32)
    for n in range(N):
        out = out + qx[n].astype(np.float32) * dx[n][:, :, None]
    return out.reshape(B, nb * QK)


def rmsnorm_ref(x, w, eps) -> np.ndarray:
    """w * (x * s), s = float32(1/sqrt(mean(x^2) + eps)), sum of squares in float64."""
    x = np.asarray(x, np.float32)
    ss = np.sum(x.astype(np.float64) ** 2, axis=1)
    s = (1.0 / np.sqrt(ss / x.shape[1] + float(eps))).astype(np.float32)
    return (w * (x * s[:, None])).astype(np.float32)


def rope_ref(x, pos, cos, sin, interleaved: bool) -> np.ndarray:
    """Returns the rotated copy of x [B, nheads, hd]."""
    x = np.array(x, np.float64)
    half = x.shape[2] // 2
    c = np.asarray(cos, np.float64)[pos][:, None, :]
    s = np.asarray(sin, np.float64)[pos][:, None, :]
    if interleaved:
        a, b = x[:, :, 0::2].copy(), x[:, :, 1::2].copy()
        x[:, :, 0::2] = a * c - b * s
        x[:, :, 1::2] = a * s + b * c
    else:
        a, b = x[:, :, :half].copy(), x[:, :, half:].copy()
        x[:, :, :half] = a * c - b * s
        x[:, :, half:] = a * s + b * c
    return x.astype(np.float32)


def attention_ref(q, kc, vc, slot, pos, kv_of_head, scale) -> np.ndarray:
    """kc [nslots, nkv, S/64, hd, 64] (keys transposed per block of 64 positions), vc [nslots, nkv, S, hd]."""
    ns, nkv, nblk, hd, _ = kc.shape
    kc = kc.transpose(0, 1, 2, 4, 3).reshape(ns, nkv, nblk * KV_BLOCK, hd)
    B, nh, hd = q.shape
    out = np.zeros((B, nh, hd), np.float64)
    for b in range(B):
        n = int(pos[b]) + 1
        for h in range(nh):
            k = kc[slot[b], kv_of_head[h], :n].astype(np.float64)
            v = vc[slot[b], kv_of_head[h], :n].astype(np.float64)
            sc = float(scale) * (k @ q[b, h].astype(np.float64))
            a = np.exp(sc - sc.max())
            out[b, h] = (a / a.sum()) @ v
    return out.astype(np.float32)


def silu_mul_ref(a, b) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return (a / (1.0 + np.exp(-a)) * b).astype(np.float32)

