"""Elementwise, Q80-encoding and attention kernels (pythran source, compiled with OpenMP).

All arrays float32 unless noted; outputs preallocated by the caller or updated in place.
"""
import numpy as np
import omp

#pythran export rmsnorm(float32[:,:], float32[:], float32, float32[:,:])
#pythran export rmsnorm(float32[:,:], float32[:], float, float32[:,:])
#pythran export rope(float32[:,:,:], int32[:], float32[:,:], float32[:,:], bool)
#pythran export attention(float32[:,:,:], float32[:,:,:,:,:], float32[:,:,:,:], int32[:], int32[:], int32[:], float32, float32[:,:,:])
#pythran export attention(float32[:,:,:], float32[:,:,:,:,:], float32[:,:,:,:], int32[:], int32[:], int32[:], float, float32[:,:,:])
#pythran export silu_mul(float32[:,:], float32[:,:])
#pythran export quantize_q80(float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export quantize_q80_records(float32[:,:], float32[:,:], int8[:,:])
#pythran export rmsnorm_q80(float32[:,:], float32[:], float32, float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export silu_mul_q80(float32[:,:], float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export add_rmsnorm_q80(float32[:,:], float32[:,:], float32[:], float32, float32[:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
#pythran export rope_attention_q80(float32[:,:,:], float32[:,:,:], float32[:,:,:], int32[:], int32[:], float32[:,:], float32[:,:], bool, float32[:,:,:,:,:], float32[:,:,:,:], int32[:], float32, float32[:,:,:], int8[:,:,:], float32[:,:], int32[:,:], int16[:,:,:,:])
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


def _rows4(x0r, x1r, x2r, x3r, y0, y1, y2, y3, o, w, c0r, c1r, c2r, c3r, i):
    """y0[o + l] += c0r[i] * x0r[l] + c0r[i + 1] * x1r[l] + c0r[i + 2] * x2r[l] + c0r[i + 3] * x3r[l]
    for l < w, and likewise y1 with the coefficients c1r[i .. i + 3], y2 with c2r, y3 with c3r:
    each x loaded serves 4 rows. The rows come in as arguments (no reference counting); the y
    rows must not overlap the x rows."""
    a0 = c0r[i]
    a1 = c0r[i + 1]
    a2 = c0r[i + 2]
    a3 = c0r[i + 3]
    b0 = c1r[i]
    b1 = c1r[i + 1]
    b2 = c1r[i + 2]
    b3 = c1r[i + 3]
    c0 = c2r[i]
    c1 = c2r[i + 1]
    c2 = c2r[i + 2]
    c3 = c2r[i + 3]
    e0 = c3r[i]
    e1 = c3r[i + 1]
    e2 = c3r[i + 2]
    e3 = c3r[i + 3]
    #omp simd
    for l in range(w):
        x0 = x0r[l]
        x1 = x1r[l]
        x2 = x2r[l]
        x3 = x3r[l]
        y0[o + l] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
        y1[o + l] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
        y2[o + l] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
        y3[o + l] += (e0 * x0 + e1 * x1) + (e2 * x2 + e3 * x3)


def attention(q, kc, vc, slot, pos, kv_of_head, scale, out):
    """q[B, nh, hd]; kc[nslots, nkv, S/64, hd, 64] (keys transposed per block of 64 positions),
    vc[nslots, nkv, S, hd]; out[B, nh, hd].

    For batch row b and head h: keys/values of slot slot[b], kv head kv_of_head[h], positions
    0..pos[b]; softmax(scale * q.k) (max subtracted) weighted sum of values. float32 throughout.
    Positions past pos[b] are never read from vc, and their keys' scores are never used (NaN
    garbage there does not leak). Summation order differs from a plain loop's: the tests compare
    with a float64 reference.

    Why it is fast:
    - A work item is batch row b x a group of up to 4 query heads reading the same kv head
      (grouped-query attention: 4 per kv head in Llama-3.2-1B). The 4 queries go together:
      every key or value vector loaded serves 4 accumulator rows and every update adds 4
      products (_rows4), i.e. 16 products per 8 loads and 4 stores, where one query at a time
      did 2-4 products per 3-5 loads and a store (and read each K/V vector once per head).
      The inner loops stay unit-stride: over the 64 positions of a key block for the scores,
      over hd for the values. Groups of 1-3 heads repeat a head in the unused row.
    - exp(score - max) is clamped to [-87, 0] (which holds anyway for positions < pos[b]):
      the masked positions (-3e38) of the last block sent libmvec's vector expf to its scalar
      fallback (xflowf, errno), ~25% of the old kernel's prefill time.
    - Last block: scores only for the 16-position chunks below pos[b] + 1. Max and sum go
      through 64 lanes per row (4 independent vector chains), out through a local view (stores
      through out[b, h, d] do not vectorize).
    - Pythran/compiler details that decided the speed: the rows reach _rows4 as arguments.
      Row views assigned to variables (k0 = kt[d]) make pythran own them: an atomic reference
      count update per view, as costly as the 256 products it serves (-20% with clang), while
      2-D indexing (kt[d + 1, l]) or kc[sl, kv, tb, d, l] stops gcc 12 from vectorizing (3x
      slower). `#omp simd` drops clang's runtime alias checks and gcc's limit of 10 of them
      (4 rows in + 4 rows out need 22). Scratch arrays come from np.zeros in the loop body:
      views of per-thread scratch, or np.empty, stopped clang from vectorizing (runtime checks).

    Measured (2 shared, noisy cores; medians of alternating old/new runs; old = the one-query
    kernel before it), Llama-3.2-1B prefill chunk B=128, nh=32, nkv=8, hd=64, 2 threads:
    4.4-5.2 -> 1.5-1.8 ms at positions 0..127, 7.3-8.2 -> 2.7 ms at 128..255; decode (B=1,
    positions 64..2000) 1.3-4.4x faster; built by gcc 12, 1.3-1.8x faster than the old kernel
    with gcc. SmolLM2 (3 query heads per KV head) computes a padded 4th row, and its decode
    has only 3 work items for 2 threads."""
    B = q.shape[0]
    nh = q.shape[1]
    hd = q.shape[2]
    nkv = kc.shape[1]
    sc = np.float32(scale)
    lowest = np.float32(-3.0e38)
    # work items: batch row b x a group of up to 4 heads reading the same kv head. Groups of
    # fewer than 4 (nh / nkv not a multiple of 4, or 1, 2, 3) repeat their first head in the
    # unused rows: those rows are computed and not written.
    gh = np.zeros((nh, 4), np.int64)
    gn = np.zeros(nh, np.int64)
    ng = 0
    for kv in range(nkv):
        for h in range(nh):
            if kv_of_head[h] == kv:
                if ng == 0 or gn[ng - 1] == 4 or kv_of_head[gh[ng - 1, 0]] != kv:
                    gh[ng, 0] = h
                    gn[ng] = 1
                    ng += 1
                else:
                    gh[ng - 1, gn[ng - 1]] = h
                    gn[ng - 1] += 1
    for g in range(ng):
        for j in range(gn[g], 4):
            gh[g, j] = gh[g, 0]
    # Work items round robin over the threads, which balances rows of growing length (a prefill
    # chunk), written out instead of `omp for`: libomp formats a string (vsnprintf, in perf) in
    # every __kmpc_dispatch_next of schedule(dynamic) and in every __kmpc_for_static_init, ~1 us
    # each, 10-25% of a decode call
    #omp parallel
    if 1:
        nth = omp.get_num_threads()
        th = omp.get_thread_num()
        for it in range(th, B * ng, nth):
            b = it // ng
            g = it - b * ng     # not it % ng: pythran strength-reduces % in a loop into a counter
                                # declared outside it, which is shared (racy) under OpenMP
            sl = int(slot[b])
            kv = int(kv_of_head[gh[g, 0]])
            n = pos[b] + 1
            nblk = (n + 63) // 64
            kb = kc[sl, kv]
            vb = vc[sl, kv]
            qs = np.zeros((4, hd), np.float32)
            for j in range(4):
                qj = q[b, gh[g, j]]
                qr = qs[j]
                #omp simd
                for d in range(hd):
                    qr[d] = qj[d] * sc
            q0 = qs[0]
            q1 = qs[1]
            q2 = qs[2]
            q3 = qs[3]
            # scores of the 4 rows, a block of 64 positions at a time, 4 dimensions per update:
            # each key vector loaded serves 4 queries (16 products per 8 loads and 4 stores)
            s = np.zeros((4, nblk * 64), np.float32)
            s0 = s[0]
            s1 = s[1]
            s2 = s[2]
            s3 = s[3]
            for tb in range(nblk):
                o = tb * 64
                kt = kb[tb]
                lw = min(64, (n - o + 15) // 16 * 16)   # last block: the 16-position chunks below n
                for d4 in range(hd // 4):
                    d = d4 * 4
                    if lw == 64:   # constant trip count: unrolled
                        _rows4(kt[d], kt[d + 1], kt[d + 2], kt[d + 3], s0, s1, s2, s3, o, 64, q0, q1, q2, q3, d)
                    else:
                        _rows4(kt[d], kt[d + 1], kt[d + 2], kt[d + 3], s0, s1, s2, s3, o, lw, q0, q1, q2, q3, d)
                for d in range(hd // 4 * 4, hd):
                    a0 = q0[d]
                    b0 = q1[d]
                    c0 = q2[d]
                    e0 = q3[d]
                    k0 = kb[tb, d]
                    #omp simd
                    for l in range(lw):
                        x0 = k0[l]
                        s0[o + l] += a0 * x0
                        s1[o + l] += b0 * x0
                        s2[o + l] += c0 * x0
                        s3[o + l] += e0 * x0
            # softmax of the 4 rows over positions < n, through 64 lanes per row (independent
            # chains that vectorize); the last block (ol..ol+63) is masked by selects
            ol = (nblk - 1) * 64
            m = np.zeros((4, 64), np.float32)
            for l in range(64):
                ok = ol + l < n
                m[0, l] = s0[ol + l] if ok else lowest
                m[1, l] = s1[ol + l] if ok else lowest
                m[2, l] = s2[ol + l] if ok else lowest
                m[3, l] = s3[ol + l] if ok else lowest
            for tb in range(nblk - 1):
                o = tb * 64
                for l in range(64):
                    m[0, l] = max(m[0, l], s0[o + l])
                    m[1, l] = max(m[1, l], s1[o + l])
                    m[2, l] = max(m[2, l], s2[o + l])
                    m[3, l] = max(m[3, l], s3[o + l])
            for j in range(4):
                for l in range(16):
                    m[j, l] = max(max(m[j, l], m[j, l + 16]), max(m[j, l + 32], m[j, l + 48]))
                for l in range(4):
                    m[j, l] = max(max(m[j, l], m[j, l + 4]), max(m[j, l + 8], m[j, l + 12]))
                mx = max(max(m[j, 0], m[j, 1]), max(m[j, 2], m[j, 3]))
                # exp(score - max) clamped to [-87, 0], which holds for every position < n anyway:
                # libmvec's vector expf takes a slow scalar path for lanes outside about +-87.3
                # (masked and far-below-max scores otherwise hit it)
                for t in range(ol):
                    s[j, t] = np.exp(min(max(s[j, t] - mx, np.float32(-87.0)), np.float32(0.0)))
                for l in range(64):
                    x = np.exp(min(max(s[j, ol + l] - mx, np.float32(-87.0)), np.float32(0.0)))
                    s[j, ol + l] = x if ol + l < n else np.float32(0.0)
            for l in range(64):
                m[0, l] = s0[ol + l]
                m[1, l] = s1[ol + l]
                m[2, l] = s2[ol + l]
                m[3, l] = s3[ol + l]
            for tb in range(nblk - 1):
                o = tb * 64
                for l in range(64):
                    m[0, l] += s0[o + l]
                    m[1, l] += s1[o + l]
                    m[2, l] += s2[o + l]
                    m[3, l] += s3[o + l]
            tot = np.zeros(4, np.float32)
            for j in range(4):
                for l in range(16):
                    m[j, l] = (m[j, l] + m[j, l + 16]) + (m[j, l + 32] + m[j, l + 48])
                for l in range(4):
                    m[j, l] = (m[j, l] + m[j, l + 4]) + (m[j, l + 8] + m[j, l + 12])
                tot[j] = (m[j, 0] + m[j, 1]) + (m[j, 2] + m[j, 3])
            # weighted sum of values: 4 positions per update, each value vector loaded serves the
            # 4 rows; positions >= n are never read
            acc = np.zeros((4, hd), np.float32)
            u0 = acc[0]
            u1 = acc[1]
            u2 = acc[2]
            u3 = acc[3]
            for t4 in range(n // 4):
                t = t4 * 4
                _rows4(vb[t], vb[t + 1], vb[t + 2], vb[t + 3], u0, u1, u2, u3, 0, hd, s0, s1, s2, s3, t)
            for t in range(n // 4 * 4, n):
                a0 = s0[t]
                b0 = s1[t]
                c0 = s2[t]
                e0 = s3[t]
                w0 = vb[t]
                #omp simd
                for d in range(hd):
                    v0 = w0[d]
                    u0[d] += a0 * v0
                    u1[d] += b0 * v0
                    u2[d] += c0 * v0
                    u3[d] += e0 * v0
            for j in range(gn[g]):
                inv = np.float32(1.0) / tot[j]
                oh = out[b, gh[g, j]]   # a local view: stores through out[b, h, d] do not vectorize
                ur = acc[j]
                #omp simd
                for d in range(hd):
                    oh[d] = ur[d] * inv


def _q80_bw(n):
    """32 (the block width), as a value clang sees only as 0 <= w <= 32 (see the module doc)."""
    nb = n // 32
    return min((n // nb if nb > 0 else 32) & 63, 32)


def _q80_amax(x, b, ta2, dx):
    """dx[b, k] = float32(amax_k / 127), amax_k = max |x| of block k (NaN ignored, like the
    reference's `if v > amax`). Two flat passes (4 values, then 8 partial maxima per block)
    instead of a reduction per block: a float max reduction does not vectorize without
    fast-math. max(0, a0, a1, ...) is pythran's std::max_element: a1 replaces the running max
    only if max < a1, so a NaN never enters and the result is the reference's, bit for bit
    (the maximum of non-negative values does not depend on the order)."""
    n = x.shape[1]
    xr = x[b]
    dr = dx[b]
    ta = ta2[0]
    for i in range(n // 4):
        ta[i] = max(np.float32(0.0), abs(xr[4 * i]), abs(xr[4 * i + 1]), abs(xr[4 * i + 2]), abs(xr[4 * i + 3]))
    for i in range(n // 32):
        dr[i] = np.float32(max(ta[8 * i], ta[8 * i + 1], ta[8 * i + 2], ta[8 * i + 3],
                               ta[8 * i + 4], ta[8 * i + 5], ta[8 * i + 6], ta[8 * i + 7]) / np.float32(127.0))


def _q80_quant(x, b, dx, sx, qxf):
    """qx and sx of row b, in one 16-lane pass per block: q = round-half-away-from-zero(x * id)
    exactly as the reference computes it (branch-free: the compare gives 0/1), stored straight
    as int8 (vpmovdb), and its int32 sum (the reference's s += iq; the vector sum adds the same
    int32 values in another order, which gives the same wrapped result)."""
    xr = x[b]
    dr = dx[b]
    sr = sx[b]
    qr = qxf[b]
    w = _q80_bw(x.shape[1])
    for k in range(x.shape[1] // 32):
        c0 = k * w
        d = dr[k]
        idd = np.float32(np.float32(1.0) / d) if d != np.float32(0.0) else np.float32(0.0)
        s = np.int32(0)
        #omp simd reduction(+:s)
        for j in range(w):
            v = xr[c0 + j] * idd
            a = abs(v)
            t = np.int32(a)                                         # trunc == floor for a >= 0
            r = t + np.int32(a - np.float32(t) >= np.float32(0.5))  # exact for a < 2**23
            r = -r if v < np.float32(0.0) else r
            qr[c0 + j] = np.int8(r)
            s += r
        sr[k] = s


def _q80_coef(qxf, b, xcf):
    """xc of row b from its int8 qx, as the reference: per block, m = 0..7,
    (a0, a1, a2, a3) = (q[2m], q[2m+16], q[2m+1], q[2m+17]) -> (a0, a1 - 16 a0, a2 - 16 a1,
    a3 - 16 a2). Written as 16 pairs t (lo = q[t], hi = q[t+16]):
    xc[2t] = lo - 16 * (q[t+15] if t odd else 0), xc[2t+1] = hi - 16 * lo,
    so one 16-lane pass per block (plain loads, one interleaved store)."""
    q = qxf[b]
    cr = xcf[b]
    w = _q80_bw(q.shape[0])
    hw = w // 2
    for k in range(q.shape[0] // 32):
        c0 = k * w
        #omp simd
        for t in range(hw):
            lo16 = np.int16(q[c0 + t])
            hi16 = np.int16(q[c0 + 16 + t])
            hp = np.int16(q[c0 + 15 + t]) * np.int16(t & 1)
            cr[c0 + 2 * t] = lo16 - np.int16(16) * hp
            cr[c0 + 2 * t + 1] = hi16 - np.int16(16) * lo16


def _q80_rows(x, qx, dx, sx, xc, lo, hi):
    """Rows lo..hi-1, with this thread's scratch (allocated once, not per row)."""
    B = x.shape[0]
    n = x.shape[1]
    m = (n // 32) * 32
    ta = np.empty((1, n // 4), np.float32)
    qxf = qx.reshape(B, m)          # (B, m), not ((B, m)): a tuple gives a slower shape type
    xcf = xc.reshape(B, m)
    for b in range(lo, hi):
        _q80_amax(x, b, ta, dx)
        _q80_quant(x, b, dx, sx, qxf)
        _q80_coef(qxf, b, xcf)


def quantize_q80(x, qx, dx, sx, xc):
    """x float32[B, n] -> qx int8[B, n/32, 32], dx float32[B, n/32], sx int32[B, n/32] and the
    4-bit kernels' coefficients xc int16[B, n/32, 8, 4] (see kernels/matmul.py's docstring).

    d = amax/127 (float32), id = 1/d (0 if d == 0), q = round-half-away-from-zero(x*id).

    Threads only for a batch: a single token's row runs on the calling thread, without even
    an OpenMP region (an `if(B > 1)` region still costs its serialized fork)."""
    B = x.shape[0]
    if B == 1:
        _q80_rows(x, qx, dx, sx, xc, 0, 1)
    else:
        #omp parallel
        if 1:
            nth = omp.get_num_threads()
            th = omp.get_thread_num()
            _q80_rows(x, qx, dx, sx, xc, B * th // nth, B * (th + 1) // nth)


def quantize_q80_records(x, recf, reci):
    """x float32[B, n] -> the Q80 records the syncs send: block k of row b is the 36 bytes at
    record b * n/32 + k of the caller's byte buffer, a float32 scale d then 32 int8 values q (the
    d and q of quantize_q80). Written through two views of that one buffer: recf its float32
    view [B, n/32 * 9], reci its int8 view [B, n/32 * 36] (one call instead of quantize_q80 and
    two numpy copies into the records)."""
    B = x.shape[0]
    if B == 1:
        _q80_record_rows(x, recf, reci, 0, 1)
    else:
        #omp parallel
        if 1:
            nth = omp.get_num_threads()
            th = omp.get_thread_num()
            _q80_record_rows(x, recf, reci, B * th // nth, B * (th + 1) // nth)


def _q80_record_rows(x, recf, reci, lo, hi):
    """Rows lo..hi-1 of quantize_q80_records: quantize_q80's amax and quantization passes only
    (the records carry no 4-bit coefficients), then d and q into each record."""
    nb = x.shape[1] // 32
    qx = np.empty((x.shape[0], nb * 32), np.int8)
    dx = np.empty((x.shape[0], nb), np.float32)
    sx = np.empty((x.shape[0], nb), np.int32)
    ta = np.empty((1, x.shape[1] // 4), np.float32)
    for b in range(lo, hi):
        _q80_amax(x, b, ta, dx)
        _q80_quant(x, b, dx, sx, qx)
        rf = recf[b]
        ri = reci[b]
        qb = qx[b]
        for k in range(nb):
            rf[k * 9] = dx[b, k]
            #omp simd
            for j in range(32):
                ri[k * 36 + 4 + j] = qb[k * 32 + j]


def _silu_rows(a, b, lo, hi):
    """Rows lo..hi-1, each through the same plain loop as the one-thread kernel: clang
    vectorizes exp there (glibc's 8-lane AVX2 expf, the same calls on the same elements, so the
    results are bit-identical whatever the thread count); inside an `omp parallel for` loop
    it does not."""
    one = np.float32(1.0)
    for i in range(lo, hi):
        ar = a[i]
        br = b[i]
        for j in range(a.shape[1]):
            v = ar[j]
            ar[j] = v / (one + np.exp(-v)) * br[j]


def silu_mul(a, b):
    """In place: a = a / (1 + exp(-a)) * b.

    A batch is split into contiguous row ranges, one per thread, each run by the plain
    vectorized loop (see _silu_rows); a single row stays on the calling thread."""
    B = a.shape[0]
    if B == 1:
        _silu_rows(a, b, 0, 1)
    else:
        #omp parallel
        if 1:
            nth = omp.get_num_threads()
            th = omp.get_thread_num()
            _silu_rows(a, b, B * th // nth, B * (th + 1) // nth)


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


def add_rmsnorm_q80(x, part, w, eps, out, qx, dx, sx, xc):
    """x += part (the residual), then rmsnorm_q80(x, w, eps, out, ...)."""
    for b in range(x.shape[0]):
        xb = x[b]
        pb = part[b]
        for i in range(x.shape[1]):
            xb[i] += pb[i]
    rmsnorm_q80(x, w, eps, out, qx, dx, sx, xc)


def rope_attention_q80(q, k, v, slot, pos, cos, sin, interleaved, kc, vc, kv_of_head, scale, out, qx, dx, sx, xc):
    """A layer's attention in one call: RoPE on q and k in place, k and v into the caches
    (kv_store), attention into out [B, nh, hd], then out's Q80 encoding (quantize_q80 of
    out as [B, nh * hd]) for the output projection."""
    rope(q, pos, cos, sin, interleaved)
    rope(k, pos, cos, sin, interleaved)
    kv_store(k, v, slot, pos, kc, vc)
    attention(q, kc, vc, slot, pos, kv_of_head, scale, out)
    B = out.shape[0]
    quantize_q80(out.reshape((B, out.shape[1] * out.shape[2])), qx, dx, sx, xc)


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
