"""Elementwise, Q80-encoding and attention kernels (pythran source).

All arrays float32 unless noted; outputs preallocated by the caller or updated in place.
"""
import numpy as np

#pythran export rmsnorm(float32[:,:], float32[:], float32, float32[:,:])
#pythran export rmsnorm(float32[:,:], float32[:], float, float32[:,:])
#pythran export rope(float32[:,:,:], int32[:], float32[:,:], float32[:,:], bool)
#pythran export attention(float32[:,:,:], float32[:,:,:,:,:], float32[:,:,:,:], int32[:], int32[:], int32[:], float32, float32[:,:,:])
#pythran export attention(float32[:,:,:], float32[:,:,:,:,:], float32[:,:,:,:], int32[:], int32[:], int32[:], float, float32[:,:,:])
#pythran export silu_mul(float32[:,:], float32[:,:])
#pythran export quantize_q80(float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export rmsnorm_q80(float32[:,:], float32[:], float32, float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export silu_mul_q80(float32[:,:], float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export rope_store(float32[:,:,:], float32[:,:,:], float32[:,:,:], int32[:], int32[:], float32[:,:], float32[:,:], bool, float32[:,:,:,:,:], float32[:,:,:,:])
#pythran export kv_store(float32[:,:,:], float32[:,:,:], int32[:], int32[:], float32[:,:,:,:,:], float32[:,:,:,:])


def rmsnorm(x, w, eps, out):
    """out[b] = w * (x[b] * s), s = float32(1 / sqrt(mean(x[b]**2) + eps)).

    The sum of squares is accumulated in float64 (then mean + eps and 1/sqrt in float64, rounded
    once to float32)."""
    B = x.shape[0]
    n = x.shape[1]
    e = float(eps)
    for b in range(B):
        ss = 0.0
        for i in range(n):
            v = float(x[b, i])
            ss += v * v
        s = np.float32(1.0 / np.sqrt(ss / n + e))
        for i in range(n):
            out[b, i] = w[i] * (x[b, i] * s)


def rope(x, pos, cos, sin, interleaved):
    """In place on x[B, nheads, hd]; pairs (2j, 2j+1) if interleaved else (j, j + hd/2);
    (a, b) -> (a*c - b*s, a*s + b*c) with c = cos[pos[b], j], s = sin[pos[b], j]."""
    B = x.shape[0]
    nh = x.shape[1]
    half = x.shape[2] // 2
    for b in range(B):
        p = pos[b]
        for h in range(nh):
            if interleaved:
                for j in range(half):
                    c = cos[p, j]
                    s = sin[p, j]
                    a0 = x[b, h, 2 * j]
                    a1 = x[b, h, 2 * j + 1]
                    x[b, h, 2 * j] = a0 * c - a1 * s
                    x[b, h, 2 * j + 1] = a0 * s + a1 * c
            else:
                for j in range(half):
                    c = cos[p, j]
                    s = sin[p, j]
                    a0 = x[b, h, j]
                    a1 = x[b, h, j + half]
                    x[b, h, j] = a0 * c - a1 * s
                    x[b, h, j + half] = a0 * s + a1 * c


def kv_store(k, v, slot, pos, kc, vc):
    """Batch row b's k[b], v[b] [nkv, hd] into the caches at slot[b], position p = pos[b]:
    kc[slot, h, p // 64, :, p % 64] (keys transposed in blocks of 64 positions) and vc[slot, h, p, :]."""
    for b in range(k.shape[0]):
        p = pos[b]
        for h in range(k.shape[1]):
            for d in range(k.shape[2]):
                kc[slot[b], h, p // 64, d, p % 64] = k[b, h, d]
                vc[slot[b], h, p, d] = v[b, h, d]


def attention(q, kc, vc, slot, pos, kv_of_head, scale, out):
    """q[B, nh, hd]; kc[nslots, nkv, S/64, hd, 64] (keys transposed per block of 64 positions),
    vc[nslots, nkv, S, hd]; out[B, nh, hd].

    For batch row b and head h: keys/values of slot slot[b], kv head kv_of_head[h], positions
    0..pos[b]; softmax(scale * q.k) (max subtracted) weighted sum of values. float32 throughout.
    Keys are stored transposed so that the scores of 64 positions build up together, one
    dimension d at a time, with unit stride (vectorized over positions, no horizontal sums);
    in blocks of 64 positions so that a block is 16 KB of consecutive memory (a plain [hd, S]
    layout puts its rows S*4 bytes apart, in the same cache sets: measured ~20% slower at S = 4096).

    Speed: the loops that update an array in memory add 2 (scores) and 4 (acc) products per
    update, not 1, because such a loop is bound by the latency of each element's load-add-store.
    More at once ran clang's build faster still (8: another 1.2-1.4x) but gcc 12 stops
    vectorizing those loops (2x slower than the one-product loops); 2 and 4 are faster with both.
    The max and the sum go through 16 lanes, and exp runs over whole blocks, so that they
    vectorize (clang maps exp to glibc's vector expf: see meson.build). Measured against the
    one-product loops at 257 positions (B = 1 and 64, 1 and 2 threads): 1.3-1.6x with clang 19,
    1.1-1.5x with gcc 12. The summation order is not a plain loop's: the tests compare with a
    float64 reference."""
    B = q.shape[0]
    nh = q.shape[1]
    hd = q.shape[2]
    sc = np.float32(scale)
    lowest = np.float32(-3.0e38)
    #omp parallel for schedule(dynamic)
    for bh in range(B * nh):
        b = bh // nh
        h = bh - b * nh     # not bh % nh: pythran strength-reduces % in a loop into a counter
                            # declared outside it, which is shared (racy) under OpenMP
        sl = slot[b]
        kv = kv_of_head[h]
        n = pos[b] + 1
        nblk = (n + 63) // 64
        qs = np.empty(hd, np.float32)
        for d in range(hd):
            qs[d] = q[b, h, d] * sc
        scores = np.zeros(nblk * 64, np.float32)
        for tb in range(nblk):
            d = 0
            while d + 2 <= hd:
                q0 = qs[d]
                q1 = qs[d + 1]
                for l in range(64):
                    scores[tb * 64 + l] += q0 * kc[sl, kv, tb, d, l] + q1 * kc[sl, kv, tb, d + 1, l]
                d += 2
            if d < hd:
                qd = qs[d]
                for l in range(64):
                    scores[tb * 64 + l] += qd * kc[sl, kv, tb, d, l]
        for t in range(n, nblk * 64):   # positions past n: exp() of them is 0
            scores[t] = lowest
        lanes = np.full(16, lowest, np.float32)
        for c in range(nblk * 4):
            for l in range(16):
                lanes[l] = max(lanes[l], scores[c * 16 + l])
        mx = lowest
        for l in range(16):
            mx = max(mx, lanes[l])
        for t in range(nblk * 64):
            scores[t] = np.exp(scores[t] - mx)
        for l in range(16):
            lanes[l] = np.float32(0.0)
        for c in range(nblk * 4):
            for l in range(16):
                lanes[l] += scores[c * 16 + l]
        tot = np.float32(0.0)
        for l in range(16):
            tot += lanes[l]
        acc = np.zeros(hd, np.float32)
        t = 0
        while t + 4 <= n:
            a0 = scores[t]
            a1 = scores[t + 1]
            a2 = scores[t + 2]
            a3 = scores[t + 3]
            for d in range(hd):
                acc[d] += ((a0 * vc[sl, kv, t, d] + a1 * vc[sl, kv, t + 1, d])
                           + (a2 * vc[sl, kv, t + 2, d] + a3 * vc[sl, kv, t + 3, d]))
            t += 4
        while t < n:
            a = scores[t]
            for d in range(hd):
                acc[d] += a * vc[sl, kv, t, d]
            t += 1
        inv = np.float32(1.0) / tot
        for d in range(hd):
            out[b, h, d] = acc[d] * inv


def silu_mul(a, b):
    """In place: a = a / (1 + exp(-a)) * b.

    One thread: clang vectorizes exp here (meson.build) but not inside an OpenMP loop, and one
    thread's vectorized loop was 3x faster than two threads' scalar ones (measured, B = 64). A gcc
    build keeps the scalar expf, so there a batch takes ~1.8x as long as on two threads (~2% of
    a prefill)."""
    B = a.shape[0]
    n = a.shape[1]
    one = np.float32(1.0)
    for i in range(B):
        for j in range(n):
            v = a[i, j]
            a[i, j] = v / (one + np.exp(-v)) * b[i, j]


def quantize_q80(x, qx, dx, sx, xc):
    """x float32[B, n] -> qx int8[B, n/32, 32], dx float32[B, n/32], sx int32[B, n/32] and the
    4-bit kernels' coefficients xc int16[B, n/32, 8, 4] (see kernels/matmul.py's docstring).

    d = amax/127 (float32), id = 1/d (0 if d == 0), q = round-half-away-from-zero(x*id)."""
    B = x.shape[0]
    nb = x.shape[1] // 32
    zero = np.float32(0.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    c127 = np.float32(127.0)
    c16 = np.int16(16)
    # threads only for a batch (prefill): a single token's few blocks are not worth waking them
    #omp parallel for if(B > 1)
    for b in range(B):
        for k in range(nb):
            amax = zero
            for j in range(32):
                v = abs(x[b, k * 32 + j])
                if v > amax:
                    amax = v
            # np.float32(): pythran divides in double, and x * a double 1/d rounds differently
            # from the float32 steps of the reference in rare cases (seen: 87.499998 -> 88)
            d = np.float32(amax / c127)
            idd = zero
            if d != zero:
                idd = np.float32(one / d)
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
            for m in range(8):
                a0 = np.int16(qx[b, k, 2 * m])
                a1 = np.int16(qx[b, k, 2 * m + 16])
                a2 = np.int16(qx[b, k, 2 * m + 1])
                a3 = np.int16(qx[b, k, 2 * m + 17])
                xc[b, k, m, 0] = a0
                xc[b, k, m, 1] = a1 - c16 * a0
                xc[b, k, m, 2] = a2 - c16 * a1
                xc[b, k, m, 3] = a3 - c16 * a2


# Fused calls: each call of a pythran function costs ~2 us of argument checking and conversion,
# as much as the work of a small model's vector ops; these pairs always run back to back.

def rmsnorm_q80(x, w, eps, out, qx, dx, sx, xc):
    """rmsnorm(x, w, eps, out), then out's Q80 encoding (quantize_q80) for the next matmul."""
    rmsnorm(x, w, eps, out)
    quantize_q80(out, qx, dx, sx, xc)


def silu_mul_q80(a, b, qx, dx, sx, xc):
    """silu_mul(a, b), then a's Q80 encoding (quantize_q80) for the down projection."""
    silu_mul(a, b)
    quantize_q80(a, qx, dx, sx, xc)


def rope_store(q, k, v, slot, pos, cos, sin, interleaved, kc, vc):
    """RoPE on q and k in place, then k and v into the caches (kv_store)."""
    rope(q, pos, cos, sin, interleaved)
    rope(k, pos, cos, sin, interleaved)
    kv_store(k, v, slot, pos, kc, vc)


#pythran export read_sum(uint64[:])
def read_sum(a):
    """Sum of a large array: reads every byte once, so timing it measures memory read bandwidth
    (the baseline `dllama-mpi bench` reports weight streaming against).

    In chunks indexed from 0: clang vectorizes `for i in range(4096): t += a[c0 + i]` but not the
    same sum written as one loop, or as `for i in range(c0, c0 + 4096)` (measured: 27 vs 5 GB/s)."""
    n = a.shape[0]
    nc = n // 4096
    s = np.uint64(0)
    #omp parallel for reduction(+:s)
    for c in range(nc):
        t = np.uint64(0)
        c0 = c * 4096
        for i in range(4096):
            t += a[c0 + i]
        s += t
    for i in range(nc * 4096, n):
        s += a[i]
    return s
