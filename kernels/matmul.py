"""Quantized / f32 matrix-vector kernels (pythran source; also runs, slowly, as plain Python).

Weight layout ("tiled"): 64 output rows are interleaved per tile so the innermost loop runs over
the 64 rows of a tile with unit stride (vectorizes to AVX-512).

  q40: wq uint8[ntile, nb, 16, 64] (GGML nibble order: low nibble = element j, high = j+16),
       wd float32[ntile, nb, 64];                       value = d*(q-8)
  q41: same wq, wd and wm float32[ntile, nb, 64];      value = d*q + m
  q80: wq int8[ntile, nb, 32, 64], wd float32[ntile, nb, 64]; value = d*q
  f32: w float32[ntile, cols, 64]

Activations for quantized weights are Q80-quantized: qx int8[B, nb, 32], dx float32[B, nb],
sx int32[B, nb] (sum of the 32 q's of each block), as produced by quantize_q80 (|q| <= 127;
the int16 partial sums below rely on it for q80 weights).

Integer block dots are exact; partial sums use int16 where provably in range (twice the int16
lanes per AVX-512 register as int32: ~17-19 GB/s of q40 weights on one core instead of ~10).
Pass C-contiguous base arrays: pythran accepts contiguous slices such as qx[:1] but runs the
kernels on them 2x slower (it rejects strided views with TypeError).

Float arithmetic order (reproduced bit for bit by dllama_mpi.quant.*_ref; the extension is built
with -ffp-contract=off so no FMA contraction changes the rounding):
  q40/q80: acc += float32(idot) * (wd * dx)
  q41:     acc += float32(idot) * (wd * dx) + wm * (dx * float32(sx))
with acc a float32 accumulator starting at 0, blocks in increasing order.

Outputs are preallocated by the caller; kernels write into them and return None.
"""
import numpy as np

#pythran export quantize_q80(float32[:,:], int8[:,:,:], float32[:,:], int32[:,:])
#pythran export matmul_q40(uint8[:,:,:,:], float32[:,:,:], int8[:,:,:], float32[:,:], float32[:,:])
#pythran export matmul_q41(uint8[:,:,:,:], float32[:,:,:], float32[:,:,:], int8[:,:,:], float32[:,:], int32[:,:], float32[:,:])
#pythran export matmul_q80(int8[:,:,:,:], float32[:,:,:], int8[:,:,:], float32[:,:], float32[:,:])
#pythran export matmul_f32(float32[:,:,:], float32[:,:], float32[:,:])
#pythran export dequant_sum_q80(int8[:,:,:,:], float32[:,:,:], float32[:,:])


def quantize_q80(x, qx, dx, sx):
    """x float32[B, n] -> qx int8[B, n/32, 32], dx float32[B, n/32], sx int32[B, n/32].

    d = amax/127 (float32), id = 1/d (0 if d == 0), q = round-half-away-from-zero(x*id)."""
    B = x.shape[0]
    nb = x.shape[1] // 32
    zero = np.float32(0.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    c127 = np.float32(127.0)
    for b in range(B):
        for k in range(nb):
            amax = zero
            for j in range(32):
                v = abs(x[b, k * 32 + j])
                if v > amax:
                    amax = v
            d = amax / c127
            idd = zero
            if d != zero:
                idd = one / d
            dx[b, k] = d
            s = np.int32(0)
            for j in range(32):
                v = x[b, k * 32 + j] * idd
                a = abs(v)
                iq = np.int32(a)              # trunc == floor for a >= 0
                if a - np.float32(iq) >= half:  # exact for |a| < 2**23
                    iq += np.int32(1)
                if v < zero:
                    iq = -iq
                qx[b, k, j] = np.int8(iq)
                s += iq
            sx[b, k] = s


def matmul_q40(wq, wd, qx, dx, out):
    """out[b, r] = sum_c W[r, c] x[b, c] for r < out.shape[1].

    Block dot = sum_j (q_j - 8) x_j = (p0 + p1) - 8 * sum_j x_j, exact in int32."""
    ntile = wq.shape[0]
    nb = wq.shape[1]
    B = qx.shape[0]
    rows = out.shape[1]
    #omp parallel for schedule(static)
    for t in range(ntile):
        c8 = np.int32(8)
        acc = np.zeros((B, 64), np.float32)
        p0 = np.zeros(64, np.int16)
        p1 = np.zeros(64, np.int16)
        for k in range(nb):
            for b in range(B):
                xs = np.int32(0)
                for j in range(32):
                    xs += np.int32(qx[b, k, j])
                xs = xs * c8
                # p0[r] (j = 0..7), p1[r] (j = 8..15) = sum_j lo*x[j] + hi*x[j+16] over the unsigned
                # nibbles; int16 is exact: |p| <= 8 * 2 * 15 * 127 = 30480 (2x faster than int32)
                m15 = np.int16(15)
                s4 = np.int16(4)
                x0 = np.int16(qx[b, k, 0])
                x1 = np.int16(qx[b, k, 16])
                x2 = np.int16(qx[b, k, 1])
                x3 = np.int16(qx[b, k, 17])
                for r in range(64):
                    v = np.int16(wq[t, k, 0, r])
                    u = np.int16(wq[t, k, 1, r])
                    p0[r] = (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                x0 = np.int16(qx[b, k, 8])
                x1 = np.int16(qx[b, k, 24])
                x2 = np.int16(qx[b, k, 9])
                x3 = np.int16(qx[b, k, 25])
                for r in range(64):
                    v = np.int16(wq[t, k, 8, r])
                    u = np.int16(wq[t, k, 9, r])
                    p1[r] = (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                for j in range(2, 8, 2):
                    x0 = np.int16(qx[b, k, j])
                    x1 = np.int16(qx[b, k, j + 16])
                    x2 = np.int16(qx[b, k, j + 1])
                    x3 = np.int16(qx[b, k, j + 17])
                    for r in range(64):
                        v = np.int16(wq[t, k, j, r])
                        u = np.int16(wq[t, k, j + 1, r])
                        p0[r] += (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                for j in range(10, 16, 2):
                    x0 = np.int16(qx[b, k, j])
                    x1 = np.int16(qx[b, k, j + 16])
                    x2 = np.int16(qx[b, k, j + 1])
                    x3 = np.int16(qx[b, k, j + 17])
                    for r in range(64):
                        v = np.int16(wq[t, k, j, r])
                        u = np.int16(wq[t, k, j + 1, r])
                        p1[r] += (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                s = dx[b, k]
                for r in range(64):
                    acc[b, r] += np.float32(np.int32(p0[r]) + np.int32(p1[r]) - xs) * (wd[t, k, r] * s)
        r0 = t * 64
        n = min(64, rows - r0)
        for b in range(B):
            for r in range(n):
                out[b, r0 + r] = acc[b, r]


# matmul_q41 repeats matmul_q40's nibble dot products on purpose: moved into a shared helper
# function they ran ~10% slower (measured A/B on 2048x2048 and 8192x2048, B = 1 and 16).
def matmul_q41(wq, wd, wm, qx, dx, sx, out):
    """Block term = float32(dot) * (d * dx) + m * (dx * float32(sx)), dot = sum_j q_j x_j."""
    ntile = wq.shape[0]
    nb = wq.shape[1]
    B = qx.shape[0]
    rows = out.shape[1]
    #omp parallel for schedule(static)
    for t in range(ntile):
        acc = np.zeros((B, 64), np.float32)
        p0 = np.zeros(64, np.int16)
        p1 = np.zeros(64, np.int16)
        for k in range(nb):
            for b in range(B):
                # p0[r] (j = 0..7), p1[r] (j = 8..15) = sum_j lo*x[j] + hi*x[j+16] over the unsigned
                # nibbles; int16 is exact: |p| <= 8 * 2 * 15 * 127 = 30480 (2x faster than int32)
                m15 = np.int16(15)
                s4 = np.int16(4)
                x0 = np.int16(qx[b, k, 0])
                x1 = np.int16(qx[b, k, 16])
                x2 = np.int16(qx[b, k, 1])
                x3 = np.int16(qx[b, k, 17])
                for r in range(64):
                    v = np.int16(wq[t, k, 0, r])
                    u = np.int16(wq[t, k, 1, r])
                    p0[r] = (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                x0 = np.int16(qx[b, k, 8])
                x1 = np.int16(qx[b, k, 24])
                x2 = np.int16(qx[b, k, 9])
                x3 = np.int16(qx[b, k, 25])
                for r in range(64):
                    v = np.int16(wq[t, k, 8, r])
                    u = np.int16(wq[t, k, 9, r])
                    p1[r] = (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                for j in range(2, 8, 2):
                    x0 = np.int16(qx[b, k, j])
                    x1 = np.int16(qx[b, k, j + 16])
                    x2 = np.int16(qx[b, k, j + 1])
                    x3 = np.int16(qx[b, k, j + 17])
                    for r in range(64):
                        v = np.int16(wq[t, k, j, r])
                        u = np.int16(wq[t, k, j + 1, r])
                        p0[r] += (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                for j in range(10, 16, 2):
                    x0 = np.int16(qx[b, k, j])
                    x1 = np.int16(qx[b, k, j + 16])
                    x2 = np.int16(qx[b, k, j + 1])
                    x3 = np.int16(qx[b, k, j + 17])
                    for r in range(64):
                        v = np.int16(wq[t, k, j, r])
                        u = np.int16(wq[t, k, j + 1, r])
                        p1[r] += (v & m15) * x0 + (v >> s4) * x1 + (u & m15) * x2 + (u >> s4) * x3
                s = dx[b, k]
                ms = s * np.float32(sx[b, k])
                for r in range(64):
                    acc[b, r] += (np.float32(np.int32(p0[r]) + np.int32(p1[r])) * (wd[t, k, r] * s)
                                  + wm[t, k, r] * ms)
        r0 = t * 64
        n = min(64, rows - r0)
        for b in range(B):
            for r in range(n):
                out[b, r0 + r] = acc[b, r]


def matmul_q80(wq, wd, qx, dx, out):
    """Pairs of products summed in int16 (|w0 x0 + w1 x1| <= 2 * 128 * 127 = 32512), then int32."""
    ntile = wq.shape[0]
    nb = wq.shape[1]
    B = qx.shape[0]
    rows = out.shape[1]
    #omp parallel for schedule(static)
    for t in range(ntile):
        acc = np.zeros((B, 64), np.float32)
        idot = np.zeros(64, np.int32)
        for k in range(nb):
            for b in range(B):
                for r in range(64):
                    idot[r] = np.int32(0)
                for j in range(0, 32, 2):
                    x0 = np.int16(qx[b, k, j])
                    x1 = np.int16(qx[b, k, j + 1])
                    for r in range(64):
                        idot[r] += np.int32(np.int16(np.int16(wq[t, k, j, r]) * x0
                                                     + np.int16(wq[t, k, j + 1, r]) * x1))
                s = dx[b, k]
                for r in range(64):
                    acc[b, r] += np.float32(idot[r]) * (wd[t, k, r] * s)
        r0 = t * 64
        n = min(64, rows - r0)
        for b in range(B):
            for r in range(n):
                out[b, r0 + r] = acc[b, r]


def matmul_f32(w, x, out):
    """w float32[ntile, cols, 64], x float32[B, cols]; acc += w*x over cols in order."""
    ntile = w.shape[0]
    cols = w.shape[1]
    B = x.shape[0]
    rows = out.shape[1]
    #omp parallel for schedule(static)
    for t in range(ntile):
        acc = np.zeros((B, 64), np.float32)
        for c in range(cols):
            for b in range(B):
                xv = x[b, c]
                for r in range(64):
                    acc[b, r] += w[t, c, r] * xv
        r0 = t * 64
        n = min(64, rows - r0)
        for b in range(B):
            for r in range(n):
                out[b, r0 + r] = acc[b, r]


def dequant_sum_q80(qx, dx, out):
    """qx int8[N, B, nb, 32], dx float32[N, B, nb] -> out[b, k*32+j] = sum_n float32(q)*d, n in order."""
    N = qx.shape[0]
    B = qx.shape[1]
    nb = qx.shape[2]
    for b in range(B):
        for k in range(nb):
            for j in range(32):
                out[b, k * 32 + j] = np.float32(0.0)
            for n in range(N):
                d = dx[n, b, k]
                for j in range(32):
                    out[b, k * 32 + j] += np.float32(qx[n, b, k, j]) * d
