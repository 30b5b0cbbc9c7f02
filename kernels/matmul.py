"""Quantized / f32 matrix-vector kernels (pythran source: compiled with OpenMP by meson at install).

Every matmul multiplies one activation batch by a *group* of matrices that share it (e.g. wq, wk,
wv; or w1, w3): one call, one OpenMP loop over the tiles of all of them, so small matrices still
spread over every thread and each layer makes few calls.

Weight layout ("tiled"): 128 output rows are interleaved per tile so the innermost loop runs over
the 128 rows of a tile with unit stride (vectorizes to AVX-512). 128 rather than 64: each inner
loop then does 4 vector iterations instead of 2, which amortizes its set-up (runtime alias checks,
index arithmetic): +30-50% on one thread (measured 2048x2048 .. 8192x2048, B = 1 and 64).

  q40: wq uint16[ntile, nb, 8, 128], wd float32[ntile, nb, 128];          value = d*(q-8)
  q41: same wq, wd and wm float32[ntile, nb, 128];                        value = d*q + m
       word m of a row packs the GGML block bytes 2m and 2m+1 (little-endian), i.e. four 4-bit
       values: bits 0-3 element 2m, 4-7 element 2m+16, 8-11 element 2m+1, 12-15 element 2m+17
  q80: wq int8[ntile, nb, 32, 128], wd float32[ntile, nb, 128];            value = d*q
       (matmul_q80 reads wq as uint16 [ntile, nb, 32, 64]: see its docstring)
  f32: w float32[ntile, cols, 128]

Activations for quantized weights are Q80-quantized by quantize_q80 (kernels/ops.py): qx int8[B, nb, 32],
dx float32[B, nb], sx int32[B, nb] (sum of the 32 q's of each block, |q| <= 127) and, for the
4-bit kernels, xc int16[B, nb, 8, 4]: per word m the coefficients
  c0 = x[2m], c1 = x[2m+16] - 16 x[2m], c2 = x[2m+1] - 16 x[2m+16], c3 = x[2m+17] - 16 x[2m+1].

Why the coefficients: with w a 16-bit word of nibbles n0..n3 and w_i = w >> 4i (logical),
n_i = w_i - 16 w_{i+1}, so sum_i n_i x_i = w_0 c0 + w_1 c1 + w_2 c2 + w_3 c3 (mod 2^16). The
4-bit dot product then needs no masks and no byte->word widening: 3 shifts, 4 multiplies and
4 adds per 32 rows x 4 values, in int16 lanes (32 per AVX-512 register). Every int16 sum may wrap;
the true partial sums over 16 values are |p| <= 16 * 15 * 127 = 30480 < 2^15, so the wrapped
result is exact. (Neither gcc 12 nor clang 19 emits VNNI dot-product instructions for this
vertical layout; two word rows per loop is what gcc vectorizes best: four did not vectorize at
all. The Makefile builds with clang 19 where it can: its code for these loops runs 1.2-1.5x
faster than gcc's, measured on B = 1 and 64.)

Integer block dots are exact. Pass C-contiguous base arrays: pythran accepts contiguous slices
such as qx[:1] but runs the kernels on them 2x slower (it rejects strided views with TypeError).

Float arithmetic order (reproduced bit for bit by dllama_mpi.quant.*_ref; the extension is built
with -ffp-contract=off so no FMA contraction changes the rounding):
  q40/q80: acc += float32(idot) * (wd * dx)
  q41:     acc += float32(idot) * (wd * dx) + wm * (dx * float32(sx))
with acc a float32 accumulator starting at 0, blocks in increasing order.

Outputs are preallocated by the caller; kernels write into them and return None.
"""
import numpy as np
import omp

#pythran export matmul_q40(uint16[:,:,:,:] list, float32[:,:,:] list, int16[:,:,:,:], int32[:,:], float32[:,:], float32[:,:] list)
#pythran export matmul_q41(uint16[:,:,:,:] list, float32[:,:,:] list, float32[:,:,:] list, int16[:,:,:,:], int32[:,:], float32[:,:], float32[:,:] list)
#pythran export matmul_q80(uint16[:,:,:,:] list, float32[:,:,:] list, int8[:,:,:], float32[:,:], float32[:,:] list)
#pythran export matmul_f32(float32[:,:,:] list, float32[:,:], float32[:,:] list)
#pythran export sum_q80_records(float32[:,:], int8[:,:], float32[:,:])


def _first_tiles(ws):
    """first[i] = index of matrix i's first tile in the group's tile sequence; first[-1] = total."""
    first = np.zeros(len(ws) + 1, np.int64)
    for i in range(len(ws)):
        first[i + 1] = first[i] + ws[i].shape[0]
    return first


def _my_tiles(n):
    """This thread's share [lo, hi) of n tiles, inside a parallel region: contiguous and balanced,
    like schedule(static), but known up front so each thread allocates its work arrays once
    instead of once per tile (measured 10-25% faster on SmolLM2's small matrices, B = 1)."""
    nth = omp.get_num_threads()
    th = omp.get_thread_num()
    return n * th // nth, n * (th + 1) // nth


def _tile_of(first, tt):
    """(matrix i, its tile t) of tile tt of the group's tile sequence."""
    i = 0
    while tt >= first[i + 1]:
        i += 1
    return i, tt - first[i]


def matmul_q40(wqs, wds, xc, sx, dx, outs):
    """outs[i][b, r] = sum_c W_i[r, c] x[b, c] for r < outs[i].shape[1].

    Block dot = sum_j (q_j - 8) x_j = (p0 + p1) - 8 * sx."""
    first = _first_tiles(wqs)
    nm = len(wqs)
    nb = xc.shape[1]
    B = xc.shape[0]
    #omp parallel
    if 1:
        lo, hi = _my_tiles(first[nm])
        acc = np.zeros((B, 128), np.float32)
        p0 = np.zeros(128, np.int16)
        p1 = np.zeros(128, np.int16)
        s4 = np.uint16(4)
        s8 = np.uint16(8)
        s12 = np.uint16(12)
        for tt in range(lo, hi):
            i, t = _tile_of(first, tt)
            wq = wqs[i]
            wd = wds[i]
            out = outs[i]
            for b in range(B):
                for r in range(128):
                    acc[b, r] = np.float32(0.0)
            for k in range(nb):
                for b in range(B):
                    # p0 = words 0-3 (16 values), p1 = words 4-7: each half's true sum fits int16, a
                    # whole block's (up to 32 * 15 * 127) would not. The four loops are written out:
                    # a loop over word pairs ran 10-25% slower at batch 64 (measured).
                    a0 = xc[b, k, 0, 0]
                    a1 = xc[b, k, 0, 1]
                    a2 = xc[b, k, 0, 2]
                    a3 = xc[b, k, 0, 3]
                    e0 = xc[b, k, 1, 0]
                    e1 = xc[b, k, 1, 1]
                    e2 = xc[b, k, 1, 2]
                    e3 = xc[b, k, 1, 3]
                    for r in range(128):
                        u = wq[t, k, 0, r]
                        v = wq[t, k, 1, r]
                        p0[r] = (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    a0 = xc[b, k, 2, 0]
                    a1 = xc[b, k, 2, 1]
                    a2 = xc[b, k, 2, 2]
                    a3 = xc[b, k, 2, 3]
                    e0 = xc[b, k, 3, 0]
                    e1 = xc[b, k, 3, 1]
                    e2 = xc[b, k, 3, 2]
                    e3 = xc[b, k, 3, 3]
                    for r in range(128):
                        u = wq[t, k, 2, r]
                        v = wq[t, k, 3, r]
                        p0[r] += (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    a0 = xc[b, k, 4, 0]
                    a1 = xc[b, k, 4, 1]
                    a2 = xc[b, k, 4, 2]
                    a3 = xc[b, k, 4, 3]
                    e0 = xc[b, k, 5, 0]
                    e1 = xc[b, k, 5, 1]
                    e2 = xc[b, k, 5, 2]
                    e3 = xc[b, k, 5, 3]
                    for r in range(128):
                        u = wq[t, k, 4, r]
                        v = wq[t, k, 5, r]
                        p1[r] = (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    a0 = xc[b, k, 6, 0]
                    a1 = xc[b, k, 6, 1]
                    a2 = xc[b, k, 6, 2]
                    a3 = xc[b, k, 6, 3]
                    e0 = xc[b, k, 7, 0]
                    e1 = xc[b, k, 7, 1]
                    e2 = xc[b, k, 7, 2]
                    e3 = xc[b, k, 7, 3]
                    for r in range(128):
                        u = wq[t, k, 6, r]
                        v = wq[t, k, 7, r]
                        p1[r] += (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    s = dx[b, k]
                    xs = sx[b, k] * np.int32(8)
                    for r in range(128):
                        acc[b, r] += np.float32(np.int32(p0[r]) + np.int32(p1[r]) - xs) * (wd[t, k, r] * s)
            r0 = t * 128
            n = min(128, out.shape[1] - r0)
            for b in range(B):
                for r in range(n):
                    out[b, r0 + r] = acc[b, r]


# matmul_q41 repeats matmul_q40's nibble dot products on purpose: moved into a shared helper
# function they ran ~10% slower (measured A/B on 2048x2048 and 8192x2048, B = 1 and 16).
def matmul_q41(wqs, wds, wms, xc, sx, dx, outs):
    """Block term = float32(dot) * (d * dx) + m * (dx * float32(sx)), dot = sum_j q_j x_j."""
    first = _first_tiles(wqs)
    nm = len(wqs)
    nb = xc.shape[1]
    B = xc.shape[0]
    #omp parallel
    if 1:
        lo, hi = _my_tiles(first[nm])
        acc = np.zeros((B, 128), np.float32)
        p0 = np.zeros(128, np.int16)
        p1 = np.zeros(128, np.int16)
        s4 = np.uint16(4)
        s8 = np.uint16(8)
        s12 = np.uint16(12)
        for tt in range(lo, hi):
            i, t = _tile_of(first, tt)
            wq = wqs[i]
            wd = wds[i]
            wm = wms[i]
            out = outs[i]
            for b in range(B):
                for r in range(128):
                    acc[b, r] = np.float32(0.0)
            for k in range(nb):
                for b in range(B):
                    # p0 = words 0-3 (16 values), p1 = words 4-7: each half's true sum fits int16, a
                    # whole block's (up to 32 * 15 * 127) would not. The four loops are written out:
                    # a loop over word pairs ran 10-25% slower at batch 64 (measured).
                    a0 = xc[b, k, 0, 0]
                    a1 = xc[b, k, 0, 1]
                    a2 = xc[b, k, 0, 2]
                    a3 = xc[b, k, 0, 3]
                    e0 = xc[b, k, 1, 0]
                    e1 = xc[b, k, 1, 1]
                    e2 = xc[b, k, 1, 2]
                    e3 = xc[b, k, 1, 3]
                    for r in range(128):
                        u = wq[t, k, 0, r]
                        v = wq[t, k, 1, r]
                        p0[r] = (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    a0 = xc[b, k, 2, 0]
                    a1 = xc[b, k, 2, 1]
                    a2 = xc[b, k, 2, 2]
                    a3 = xc[b, k, 2, 3]
                    e0 = xc[b, k, 3, 0]
                    e1 = xc[b, k, 3, 1]
                    e2 = xc[b, k, 3, 2]
                    e3 = xc[b, k, 3, 3]
                    for r in range(128):
                        u = wq[t, k, 2, r]
                        v = wq[t, k, 3, r]
                        p0[r] += (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    a0 = xc[b, k, 4, 0]
                    a1 = xc[b, k, 4, 1]
                    a2 = xc[b, k, 4, 2]
                    a3 = xc[b, k, 4, 3]
                    e0 = xc[b, k, 5, 0]
                    e1 = xc[b, k, 5, 1]
                    e2 = xc[b, k, 5, 2]
                    e3 = xc[b, k, 5, 3]
                    for r in range(128):
                        u = wq[t, k, 4, r]
                        v = wq[t, k, 5, r]
                        p1[r] = (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    a0 = xc[b, k, 6, 0]
                    a1 = xc[b, k, 6, 1]
                    a2 = xc[b, k, 6, 2]
                    a3 = xc[b, k, 6, 3]
                    e0 = xc[b, k, 7, 0]
                    e1 = xc[b, k, 7, 1]
                    e2 = xc[b, k, 7, 2]
                    e3 = xc[b, k, 7, 3]
                    for r in range(128):
                        u = wq[t, k, 6, r]
                        v = wq[t, k, 7, r]
                        p1[r] += (np.int16(u) * a0 + np.int16(u >> s4) * a1 + np.int16(u >> s8) * a2 + np.int16(u >> s12) * a3
                                  + np.int16(v) * e0 + np.int16(v >> s4) * e1 + np.int16(v >> s8) * e2 + np.int16(v >> s12) * e3)
                    s = dx[b, k]
                    ms = s * np.float32(sx[b, k])
                    for r in range(128):
                        acc[b, r] += (np.float32(np.int32(p0[r]) + np.int32(p1[r])) * (wd[t, k, r] * s)
                                      + wm[t, k, r] * ms)
            r0 = t * 128
            n = min(128, out.shape[1] - r0)
            for b in range(B):
                for r in range(n):
                    out[b, r0 + r] = acc[b, r]


def matmul_q80(wqs, wds, qx, dx, outs):
    """wqs: each tile's int8 weights read as uint16 words [ntile, nb, 32, 64] (model.Linear passes
    wq.view(np.uint16)): on a little-endian machine word m of value j holds row 2m in its low
    byte and row 2m + 1 in its high byte; an arithmetic right shift of the word as int16
    sign-extends each (the low byte after a left shift by 8). Pairs of products are summed in int16
    (|w0 x0 + w1 x1| <= 2 * 128 * 127 = 32512) and accumulated in int32 per block, even and odd
    rows apart.

    Why uint16 words: read as int8, no loop of this kernel vectorized (clang: "cannot identify
    array bounds"; scalar movsbl/imul in perf), 1.9 GB/s on the SmolLM2 LM head at one thread.
    This form runs 8-10x faster (B = 1 and 64; measured on 49152 x 576). The `#omp simd` on the
    int32 accumulations is needed: without it clang kept them scalar (reloading the array
    pointers after every store)."""
    first = _first_tiles(wqs)
    nm = len(wqs)
    nb = qx.shape[1]
    B = qx.shape[0]
    #omp parallel
    if 1:
        lo, hi = _my_tiles(first[nm])
        acc = np.zeros((B, 128), np.float32)
        ie = np.zeros(64, np.int32)
        io = np.zeros(64, np.int32)
        pe = np.zeros(64, np.int16)
        po = np.zeros(64, np.int16)
        s8 = np.int16(8)
        s8u = np.uint16(8)   # shifted left as unsigned: no left shift of a negative value
        for tt in range(lo, hi):
            i, t = _tile_of(first, tt)
            wq = wqs[i]
            wd = wds[i]
            out = outs[i]
            for b in range(B):
                for r in range(128):
                    acc[b, r] = np.float32(0.0)
            for k in range(nb):
                for b in range(B):
                    for m in range(64):
                        ie[m] = np.int32(0)
                        io[m] = np.int32(0)
                    for jj in range(16):
                        x0 = np.int16(qx[b, k, 2 * jj])
                        x1 = np.int16(qx[b, k, 2 * jj + 1])
                        for m in range(64):
                            u = wq[t, k, 2 * jj, m]
                            v = wq[t, k, 2 * jj + 1, m]
                            pe[m] = (np.int16(u << s8u) >> s8) * x0 + (np.int16(v << s8u) >> s8) * x1
                            po[m] = (np.int16(u) >> s8) * x0 + (np.int16(v) >> s8) * x1
                        #omp simd
                        for m in range(64):
                            ie[m] += np.int32(pe[m])
                        #omp simd
                        for m in range(64):
                            io[m] += np.int32(po[m])
                    s = dx[b, k]
                    for m in range(64):
                        acc[b, 2 * m] += np.float32(ie[m]) * (wd[t, k, 2 * m] * s)
                        acc[b, 2 * m + 1] += np.float32(io[m]) * (wd[t, k, 2 * m + 1] * s)
            r0 = t * 128
            n = min(128, out.shape[1] - r0)
            for b in range(B):
                for r in range(n):
                    out[b, r0 + r] = acc[b, r]


def matmul_f32(ws, x, outs):
    """w float32[ntile, cols, 128], x float32[B, cols]; acc += w*x over cols in order."""
    first = _first_tiles(ws)
    nm = len(ws)
    cols = x.shape[1]
    B = x.shape[0]
    #omp parallel
    if 1:
        lo, hi = _my_tiles(first[nm])
        acc = np.zeros((B, 128), np.float32)
        for tt in range(lo, hi):
            i, t = _tile_of(first, tt)
            w = ws[i]
            out = outs[i]
            for b in range(B):
                for r in range(128):
                    acc[b, r] = np.float32(0.0)
            for c in range(cols):
                for b in range(B):
                    xv = x[b, c]
                    for r in range(128):
                        acc[b, r] += w[t, c, r] * xv
            r0 = t * 128
            n = min(128, out.shape[1] - r0)
            for b in range(B):
                for r in range(n):
                    out[b, r0 + r] = acc[b, r]


def sum_q80_records(recf, reci, out):
    """The sum of N ranks' Q80 records (see ops.quantize_q80_records), dequantized:
    out[b, k*32 + j] = sum over n in order of float32(q) * d, (d, q) = record b * nb + k of rank n,
    nb = out.shape[1] / 32. recf / reci: the float32 [N, B * nb * 9] and int8 [N, B * nb * 36]
    views of the N ranks' record buffers, one row per rank."""
    N = recf.shape[0]
    B = out.shape[0]
    nb = out.shape[1] // 32
    for b in range(B):
        ob = out[b]
        for k in range(nb):
            r = b * nb + k
            for j in range(32):
                ob[k * 32 + j] = np.float32(0.0)
            for n in range(N):
                d = recf[n, r * 9]
                rn = reci[n]
                for j in range(32):
                    ob[k * 32 + j] += np.float32(rn[r * 36 + 4 + j]) * d
