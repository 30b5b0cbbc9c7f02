"""Compiled kernels vs their numpy references (dllama_mpi.quant), layouts vs gguf.quants.

Needs the installed, compiled package (`make install`); a missing compiled module is a failure.
Run from outside the source tree (e.g. `cd /tmp && python -m pytest /work/main/tests/test_kernels.py`)
so that `dllama_mpi` resolves to the installed package holding the extension modules.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from dllama_mpi import kernels as K  # noqa: E402  (ImportError here = failing test, by design)
from dllama_mpi import quant as Q

ROWS = [1, 63, 65, 192, 320]
COLS = [32, 96, 576, 1536]
BATCH = [1, 2, 7, 32]
GGML = {"q40": GGMLQuantizationType.Q4_0, "q41": GGMLQuantizationType.Q4_1,
        "q80": GGMLQuantizationType.Q8_0}


def rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def rand_mat(r, rows, cols):
    w = r.standard_normal((rows, cols)).astype(np.float32)
    w *= r.uniform(0.01, 2.0, size=(rows, 1)).astype(np.float32)
    if rows > 2 and cols >= 64:
        w[1, :32] = 0.0                         # an all-zero block (d == 0)
    return w


def rand_x(r, B, n):
    x = (r.standard_normal((B, n)) * r.uniform(0.1, 5.0)).astype(np.float32)
    if n >= 64:
        x[0, 32:64] = 0.0                       # an all-zero activation block
    return x


def q80(x):
    B, n = x.shape
    qx = np.empty((B, n // 32, 32), np.int8)
    dx = np.empty((B, n // 32), np.float32)
    sx = np.empty((B, n // 32), np.int32)
    xc = np.empty((B, n // 32, 8, 4), np.int16)
    K.quantize_q80(x, qx, dx, sx, xc)
    return qx, dx, sx, xc


def test_compiled_modules_are_extensions():
    import dllama_mpi._matmul as m
    import dllama_mpi._ops as o
    for mod in (m, o):
        assert mod.__file__.endswith(".so"), mod.__file__


# --------------------------------------------------------------------------- quantize_q80

@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("n", COLS)
def test_quantize_q80_exact(B, n):
    x = rand_x(rng("q", B, n), B, n)
    qx, dx, sx, xc = q80(x)
    rq, rd, rs = Q.quantize_q80_ref(x)
    np.testing.assert_array_equal(qx, rq)
    np.testing.assert_array_equal(dx, rd)
    np.testing.assert_array_equal(sx, rs)
    np.testing.assert_array_equal(sx, qx.astype(np.int32).sum(axis=2))
    np.testing.assert_array_equal(xc, Q.q4_coeffs_ref(qx))


def test_q4_coefficients_give_the_nibble_dot():
    """The identity the 4-bit kernels rest on: for a word w of nibbles n0..n3 (elements 2m,
    2m+16, 2m+1, 2m+17), sum_i (w >> 4i) * c_i == sum_i n_i x_i modulo 2^16, and the true value
    fits in int16."""
    r = rng("coef")
    x = rand_x(r, 3, 96)
    qx, _, _, xc = q80(x)
    w = r.integers(0, 1 << 16, size=(3, 3, 8), dtype=np.int64)
    got = sum(((w >> (4 * i)) * xc[..., i]) for i in range(4)) & 0xFFFF
    n = [(w >> (4 * i)) & 15 for i in range(4)]
    q = qx.astype(np.int64)
    want = n[0] * q[:, :, 0:16:2] + n[1] * q[:, :, 16::2] + n[2] * q[:, :, 1:16:2] + n[3] * q[:, :, 17::2]
    np.testing.assert_array_equal(got, want & 0xFFFF)


def test_quantize_q80_matches_ggml_q8_0():
    """Same q's as GGML Q8_0 (which differs only in storing d as f16)."""
    x = rand_x(rng("ggml8"), 16, 576)
    qx, dx, _, xc = q80(x)
    blocks = gq.quantize(x, GGMLQuantizationType.Q8_0).reshape(16, 18, 34)
    np.testing.assert_array_equal(qx, blocks[:, :, 2:].view(np.int8))
    np.testing.assert_array_equal(dx.astype(np.float16), blocks[:, :, :2].copy().view(np.float16)[..., 0])


def test_quantize_q80_ties_round_away_from_zero():
    # amax 127 -> d = 1, id = 1: x*id are exact half-integers
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [127.0, 0.5, -0.5, 1.5, -2.5, 2.5]
    qx, dx, sx, xc = q80(x)
    assert dx[0, 0] == 1.0
    assert list(qx[0, 0, :6]) == [127, 1, -1, 2, -3, 3]
    np.testing.assert_array_equal(qx, Q.quantize_q80_ref(x)[0])


def test_quantize_q80_scales_in_float32():
    """x * (1/d) is a float32 product, as in the reference: here it is 87.49999 (-> 87), while
    the same product with 1/d in double rounds to 87.5 (-> 88). A rare case (1 value in ~500,000
    random ones) that small random tests miss."""
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = [7.742231, 5.334214]
    qx, dx, sx, xc = q80(x)
    assert x[0, 1] * (np.float32(1.0) / dx[0, 0]) == np.float32(87.49999)
    assert qx[0, 0, 1] == 87
    np.testing.assert_array_equal(qx, Q.quantize_q80_ref(x)[0])


# --------------------------------------------------------------------------- quantized matmuls

def _kernel(qtype, group, x, outs):
    """One kernel call over a group of matrices (tuples of tiled arrays) sharing x."""
    qx, dx, sx, xc = q80(x)
    if qtype == "q40":
        K.matmul_q40([a[0] for a in group], [a[1] for a in group], xc, sx, dx, outs)
    elif qtype == "q41":
        K.matmul_q41([a[0] for a in group], [a[1] for a in group], [a[2] for a in group], xc, sx, dx, outs)
    else:
        K.matmul_q80([a[0].view(np.uint16) for a in group], [a[1] for a in group], qx, dx, outs)  # as model.Linear


def _reference(qtype, arrays, x, rows):
    qx, dx, sx, _ = q80(x)
    if qtype == "q40":
        return Q.matmul_q40_ref(arrays[0], arrays[1], qx, dx, rows)
    if qtype == "q41":
        return Q.matmul_q41_ref(arrays[0], arrays[1], arrays[2], qx, dx, sx, rows)
    return Q.matmul_q80_ref(arrays[0], arrays[1], qx, dx, rows)


def _run_matmul(qtype, arrays, x, rows):
    out = np.full((x.shape[0], rows), np.nan, np.float32)
    _kernel(qtype, [arrays], x, [out])
    return out, _reference(qtype, arrays, x, rows)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", COLS)
def test_matmul_quant_exact(qtype, rows, cols):
    r = rng(qtype, rows, cols)
    W = rand_mat(r, rows, cols)
    arrays = Q.tile_float(W, qtype)
    for B in BATCH:
        x = rand_x(r, B, cols)
        out, ref = _run_matmul(qtype, arrays, x, rows)
        np.testing.assert_array_equal(out, ref, err_msg=f"{qtype} rows={rows} cols={cols} B={B}")
        # and close to the float product of the dequantized operands
        Wd = Q.untile(arrays, qtype, rows).astype(np.float64)
        qx, dx, _, xc = q80(x)
        xd = (qx.astype(np.float64) * dx[:, :, None]).reshape(B, cols)
        exact = xd @ Wd.T
        scale = np.abs(xd).sum(axis=1)[:, None] * np.abs(Wd).max() + 1e-30
        assert np.all(np.abs(out - exact) <= 1e-5 * scale)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
def test_matmul_quant_multi_thread_deterministic(qtype):
    r = rng("mt", qtype)
    W = rand_mat(r, 1000, 1536)
    arrays = Q.tile_float(W, qtype)
    x = rand_x(r, 3, 1536)
    out1, ref = _run_matmul(qtype, arrays, x, 1000)
    out2, _ = _run_matmul(qtype, arrays, x, 1000)
    np.testing.assert_array_equal(out1, ref)
    np.testing.assert_array_equal(out1, out2)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80", "f32"])
def test_matmul_group_equals_separate_calls(qtype):
    """A group (e.g. wq, wk, wv) in one call, including a rank's empty part (0 rows), gives each
    matrix's own result bit for bit."""
    r = rng("group", qtype)
    rows = [200, 0, 65, 64]
    mats = [Q.tile_float(rand_mat(r, n, 576), qtype) if n else Q.tile_float(np.zeros((0, 576), np.float32), qtype)
            for n in rows]
    for B in (1, 7):
        x = rand_x(r, B, 576)
        outs = [np.full((B, n), np.nan, np.float32) for n in rows]
        if qtype == "f32":
            K.matmul_f32([m[0] for m in mats], x, outs)
        else:
            _kernel(qtype, mats, x, outs)
        for m, n, o in zip(mats, rows, outs):
            single = np.full((B, n), np.nan, np.float32)
            if qtype == "f32":
                K.matmul_f32([m[0]], x, [single])
            else:
                _kernel(qtype, [m], x, [single])
                np.testing.assert_array_equal(o, _reference(qtype, m, x, n))
            np.testing.assert_array_equal(o, single)


def test_matmul_writes_only_existing_rows():
    r = rng("rowsonly")
    W = rand_mat(r, 65, 96)
    wq, wd = Q.tile_float(W, "q40")
    x = rand_x(r, 2, 96)
    qx, dx, sx, xc = q80(x)
    big = np.full((2, 200), 7.0, np.float32)
    out = big[:, :65].copy()
    K.matmul_q40([wq], [wd], xc, sx, dx, [out])
    np.testing.assert_array_equal(out, Q.matmul_q40_ref(wq, wd, qx, dx, 65))
    # out narrower than ntile*T: fewer rows requested than tiled -> only those are written
    out3 = np.full((2, 10), 7.0, np.float32)
    K.matmul_q40([wq], [wd], xc, sx, dx, [out3])
    np.testing.assert_array_equal(out3, Q.matmul_q40_ref(wq, wd, qx, dx, 65)[:, :10])


def test_matmul_rejects_wrong_dtype_or_view():
    wq, wd = Q.tile_float(np.ones((64, 32), np.float32), "q40")
    qx, dx, sx, xc = q80(np.ones((1, 32), np.float32))
    with pytest.raises(TypeError):
        K.matmul_q40([wq], [wd], xc, sx, dx, [np.zeros((1, 64), np.float64)])
    with pytest.raises(TypeError):
        K.matmul_q40([wq], [wd], xc, sx, dx, [np.zeros((1, 128), np.float32)[:, ::2]])


# --------------------------------------------------------------------------- f32 matmul

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", COLS)
def test_matmul_f32(rows, cols):
    r = rng("f32", rows, cols)
    W = rand_mat(r, rows, cols)
    (w,) = Q.tile_float(W, "f32")
    np.testing.assert_array_equal(Q.untile((w,), "f32", rows), W)
    for B in BATCH:
        x = rand_x(r, B, cols)
        out = np.full((B, rows), np.nan, np.float32)
        K.matmul_f32([w], x, [out])
        ref = Q.matmul_f32_ref(w, x, rows)
        scale = np.abs(x).astype(np.float64) @ np.abs(W).T.astype(np.float64)
        assert np.all(np.abs(out - ref) <= 1e-5 * scale + 1e-30), (rows, cols, B)


# --------------------------------------------------------------------------- Q80 wire records

def records(qx, dx):
    """[B, nb, 32] int8 + [B, nb] float32 -> the wire's [B, nb * 36] bytes, built by numpy."""
    B, nb = dx.shape
    rec = np.empty((B, nb, 36), np.uint8)
    rec[:, :, :4] = dx.view(np.uint8).reshape(B, nb, 4)
    rec[:, :, 4:] = qx.view(np.uint8)
    return rec.reshape(B, nb * 36)


@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("n", [32, 576, 2048])
def test_quantize_q80_records_are_quantize_q80_packed(B, n):
    x = rand_x(rng("rec", B, n), B, n)
    qx, dx, _, _ = q80(x)
    rec = np.full((B, n // 32 * 36), 0xAA, np.uint8)
    K.quantize_q80_records(x, rec.view(np.float32), rec.view(np.int8))
    np.testing.assert_array_equal(rec, records(qx, dx))


@pytest.mark.parametrize("N", [1, 2, 3, 8])
@pytest.mark.parametrize("B", BATCH)
def test_sum_q80_records_exact(N, B):
    r = rng("ds", N, B)
    n = 576
    parts = [rand_x(r, B, n) for _ in range(N)]
    qx = np.empty((N, B, n // 32, 32), np.int8)
    dx = np.empty((N, B, n // 32), np.float32)
    for i, p in enumerate(parts):
        a, d, _, _ = q80(p)
        qx[i], dx[i] = a, d
    recs = np.stack([records(qx[i], dx[i]).ravel() for i in range(N)])
    out = np.full((B, n), np.nan, np.float32)
    K.sum_q80_records(recs.view(np.float32), recs.view(np.int8), out)
    np.testing.assert_array_equal(out, Q.dequant_sum_q80_ref(qx, dx))
    np.testing.assert_allclose(out, np.sum(parts, axis=0), rtol=0, atol=N * 0.01 * np.abs(parts).max())


# --------------------------------------------------------------------------- layout from raw GGML blocks

@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", [32, 96, 576])
def test_tiling_reproduces_gguf_dequantize(qtype, rows, cols):
    r = rng("tile", qtype, rows, cols)
    W = rand_mat(r, rows, cols)
    blocks = gq.quantize(W, GGML[qtype])
    assert blocks.dtype == np.uint8 and blocks.shape == (rows, cols // 32 * Q._BLOCK_BYTES[qtype])
    arrays = Q.tile_blocks(blocks, qtype)
    nt = (rows + Q.T - 1) // Q.T
    assert arrays[0].shape == (nt, cols // 32, 8 if qtype != "q80" else 32, Q.T)
    assert all(a.flags.c_contiguous for a in arrays)
    assert arrays[0].dtype == (np.int8 if qtype == "q80" else np.uint16)
    assert all(a.dtype == np.float32 for a in arrays[1:])
    ref = gq.dequantize(blocks, GGML[qtype])
    np.testing.assert_array_equal(Q.untile(arrays, qtype, rows), ref)
    # padding rows contribute exactly 0
    full = Q.untile(arrays, qtype, nt * Q.T)
    assert np.all(full[rows:] == 0)
    # 1-D raw block bytes + cols give the same layout
    arrays1 = Q.tile_blocks(blocks.reshape(-1), qtype, cols=cols)
    for a, b in zip(arrays, arrays1):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
def test_raw_block_bytes_match_layout(qtype):
    """Spot-check individual bytes of the tiled layout against the raw GGML block bytes."""
    r = rng("bytes", qtype)
    rows, cols = 130, 96
    blocks = gq.quantize(rand_mat(r, rows, cols), GGML[qtype])
    bb = Q._BLOCK_BYTES[qtype]
    arrays = Q.tile_blocks(blocks, qtype)
    for row in (0, 63, 64, 129):
        t, rr = divmod(row, Q.T)
        for b in range(cols // 32):
            blk = blocks[row, b * bb:(b + 1) * bb]
            assert arrays[1][t, b, rr] == np.float32(blk[0:2].view(np.float16)[0])
            if qtype == "q41":
                assert arrays[2][t, b, rr] == np.float32(blk[2:4].view(np.float16)[0])
            qs = blk[bb - (16 if qtype != "q80" else 32):]
            if qtype == "q80":
                np.testing.assert_array_equal(arrays[0][t, b, :, rr], qs.view(np.int8))
            else:  # 16-bit words of byte pairs (2m, 2m+1), little-endian
                np.testing.assert_array_equal(arrays[0][t, b, :, rr], qs[0::2].astype(np.uint16) | (qs[1::2].astype(np.uint16) << 8))


def test_requantize_q41_matches_gguf():
    W = rand_mat(rng("q41rq"), 7, 96)
    np.testing.assert_array_equal(Q.quantize_blocks(W, "q41"), gq.quantize(W, GGMLQuantizationType.Q4_1))


def test_worked_example_formats_1_3():
    x = ((np.arange(32, dtype=np.float32) - 10) * np.float32(0.1)).astype(np.float32).reshape(1, 32)
    b40 = Q.quantize_blocks(x, "q40")[0]
    assert bytes(b40) == bytes.fromhex("33b4" "6c5b5b5b4a4a3a39392828281717" "0606")
    b80 = Q.quantize_blocks(x, "q80")[0]
    assert bytes(b80[:15]) == bytes.fromhex("3c24c4cad0d6dce2e8eef4fa00060c")
    assert bytes(b80[-3:]) == bytes.fromhex("73797f")
    q = b80[2:].view(np.int8)
    assert q[0] == -60 and q[1] == -54 and q[21] == 67 and q[31] == 127
    # dequantized values quoted in the text
    y40 = gq.dequantize(b40.reshape(1, -1), GGMLQuantizationType.Q4_0)[0]
    assert abs(y40[0] - -1.0498) < 1e-4 and abs(y40[31] - 2.0996) < 1e-4
    # the runtime activation quantizer gives the same q's (d kept in float32)
    qx, dx, _, xc = q80(x)
    np.testing.assert_array_equal(qx[0, 0], q)
    # and the tiled layout of these blocks reproduces them
    wq, wd = Q.tile_q40(b40.reshape(1, -1))
    assert wd[0, 0, 0] == np.float32(np.float16(-0.26245))
    assert wq.dtype == np.uint16 and list(wq[0, 0, :, 0]) == list(b40[2:].view("<u2"))


# --------------------------------------------------------------------------- ops

def test_kv_store_writes_each_rows_key_and_value():
    r = rng("kvstore")
    B, nkv, hd, S, nslots = 3, 2, 64, 128, 2
    k = r.standard_normal((B, nkv, hd)).astype(np.float32)
    v = r.standard_normal((B, nkv, hd)).astype(np.float32)
    slot = np.array([1, 0, 1], np.int32)
    pos = np.array([4, 4, 70], np.int32)
    kc = np.zeros((nslots, nkv, 2, hd, 64), np.float32)
    vc = np.zeros((nslots, nkv, S, hd), np.float32)
    K.kv_store(k, v, slot, pos, kc, vc)
    want_k, want_v = np.zeros_like(kc), np.zeros_like(vc)
    for b in range(B):
        want_k[slot[b], :, pos[b] // 64, :, pos[b] % 64] = k[b]
        want_v[slot[b], :, pos[b]] = v[b]
    np.testing.assert_array_equal(kc, want_k)
    np.testing.assert_array_equal(vc, want_v)


@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("n", [32, 96, 576, 1536])
def test_rmsnorm(B, n):
    r = rng("rms", B, n)
    x = rand_x(r, B, n)
    w = r.standard_normal(n).astype(np.float32)
    for eps in (np.float32(1e-5), 1e-6):
        out = np.full_like(x, np.nan)
        K.rmsnorm(x, w, eps, out)
        np.testing.assert_allclose(out, Q.rmsnorm_ref(x, w, eps), rtol=1e-6, atol=1e-30)
    # in place
    xx = x.copy()
    K.rmsnorm(xx, w, np.float32(1e-5), xx)
    np.testing.assert_allclose(xx, Q.rmsnorm_ref(x, w, np.float32(1e-5)), rtol=1e-6)


def _rope_tables(max_pos, hd, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(max_pos, dtype=np.float64), inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("hd", [32, 64, 96])
def test_rope(interleaved, B, hd):
    r = rng("rope", interleaved, B, hd)
    nh = 5
    cos, sin = _rope_tables(300, hd)
    x = r.standard_normal((B, nh, hd)).astype(np.float32)
    pos = r.integers(0, 300, size=B).astype(np.int32)
    y = x.copy()
    K.rope(y, pos, cos, sin, interleaved)
    np.testing.assert_allclose(y, Q.rope_ref(x, pos, cos, sin, interleaved), rtol=1e-5, atol=1e-6)


def test_rope_position_zero_is_identity():
    cos, sin = _rope_tables(4, 64)
    x = rng("r0").standard_normal((2, 3, 64)).astype(np.float32)
    for inter in (False, True):
        y = x.copy()
        K.rope(y, np.zeros(2, np.int32), cos, sin, inter)
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("hd", [32, 33, 64, 72])   # 33: odd, the tail of the 2-dims-at-a-time loop
def test_attention(B, hd):
    r = rng("att", B, hd)
    nh, nkv, S, nslots = 6, 2, 70, 3
    q = r.standard_normal((B, nh, hd)).astype(np.float32)
    kc = r.standard_normal((nslots, nkv, 2, hd, 64)).astype(np.float32)   # keys transposed per 64 positions
    vc = r.standard_normal((nslots, nkv, S, hd)).astype(np.float32)
    slot = r.integers(0, nslots, size=B).astype(np.int32)
    pos = r.integers(0, S, size=B).astype(np.int32)
    pos[0] = 0
    if B > 1:
        pos[1] = S - 1
    kv_of_head = (np.arange(nh) // (nh // nkv)).astype(np.int32)
    scale = np.float32(1.0 / np.sqrt(hd))
    out = np.full((B, nh, hd), np.nan, np.float32)
    K.attention(q, kc, vc, slot, pos, kv_of_head, scale, out)
    ref = Q.attention_ref(q, kc, vc, slot, pos, kv_of_head, scale)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    # position 0 attends to a single value row
    np.testing.assert_allclose(out[0], vc[slot[0], kv_of_head, 0], rtol=1e-6)
    # python float scale accepted too
    out2 = np.empty_like(out)
    K.attention(q, kc, vc, slot, pos, kv_of_head, float(scale), out2)
    np.testing.assert_array_equal(out, out2)
    # OpenMP over batch*heads: repeated runs write every row identically (no shared loop state)
    for _ in range(5):
        out2[...] = np.nan
        K.attention(q, kc, vc, slot, pos, kv_of_head, scale, out2)
        np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("n", [32, 96, 576, 1536])
def test_silu_mul(B, n):
    r = rng("silu", B, n)
    a = (r.standard_normal((B, n)) * 4).astype(np.float32)
    b = r.standard_normal((B, n)).astype(np.float32)
    a[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    y = a.copy()
    K.silu_mul(y, b)
    np.testing.assert_allclose(y, Q.silu_mul_ref(a, b), rtol=1e-5, atol=1e-30)


def test_missing_compiled_module_is_a_clear_import_error():
    """No numpy fallback: without the extension modules, importing dllama_mpi.kernels fails."""
    import subprocess
    import sys
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('dllama_mpi._matmul', 'dllama_mpi._ops'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import dllama_mpi.kernels\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
        "else:\n"
        "    print('IMPORTED')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert "IMPORTERROR compiled kernels missing: run `make install`" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------- fused calls
@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("n", [32, 576, 1536])
def test_fused_rmsnorm_and_silu_mul_give_the_q80_of_their_output(B, n):
    """rmsnorm_q80 / add_rmsnorm_q80 / silu_mul_q80 = the plain kernels, then quantize_q80 of the
    output, bit for bit."""
    r = rng("fused", B, n)
    x, w, up = rand_x(r, B, n), r.standard_normal(n).astype(np.float32), rand_x(r, B, n)
    eps = np.float32(1e-5)
    h = np.full_like(x, np.nan)
    got = [np.full_like(a, 99) for a in q80(x)]
    K.rmsnorm_q80(x, w, eps, h, *got)
    want_h = np.empty_like(x)
    K.rmsnorm(x, w, eps, want_h)
    np.testing.assert_array_equal(h, want_h)
    for g, e in zip(got, q80(want_h)):
        np.testing.assert_array_equal(g, e)
    # add_rmsnorm_q80: x += part (as numpy adds float32), then rmsnorm_q80
    x1, part = x.copy(), rand_x(r, B, n)
    got = [np.full_like(a, 99) for a in q80(x)]
    K.add_rmsnorm_q80(x1, part, w, eps, h, *got)
    np.testing.assert_array_equal(x1, x + part)
    K.rmsnorm(x + part, w, eps, want_h)
    np.testing.assert_array_equal(h, want_h)
    for g, e in zip(got, q80(want_h)):
        np.testing.assert_array_equal(g, e)
    a = x.copy()
    got = [np.full_like(t, 99) for t in q80(x)]
    K.silu_mul_q80(a, up, *got)
    want_a = x.copy()
    K.silu_mul(want_a, up)
    np.testing.assert_array_equal(a, want_a)
    for g, e in zip(got, q80(want_a)):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("B", BATCH)
def test_rope_attention_q80_is_rope_kv_store_attention_then_q80(B, interleaved):
    """One call = RoPE of q and k, kv_store, attention, quantize_q80 of the output, bit for bit."""
    r = rng("rope_attention", B, interleaved)
    nh, nkv, hd, S, nslots = 6, 2, 64, 128, 2
    cos, sin = _rope_tables(S, hd)
    q = r.standard_normal((B, nh, hd)).astype(np.float32)
    k = r.standard_normal((B, nkv, hd)).astype(np.float32)
    v = r.standard_normal((B, nkv, hd)).astype(np.float32)
    slot = r.integers(0, nslots, size=B).astype(np.int32)
    pos = r.integers(0, S, size=B).astype(np.int32)
    kv_of_head = (np.arange(nh) // (nh // nkv)).astype(np.int32)
    scale = np.float32(1.0 / np.sqrt(hd))
    kc = r.standard_normal((nslots, nkv, 2, hd, 64)).astype(np.float32)   # earlier positions' keys
    vc = r.standard_normal((nslots, nkv, S, hd)).astype(np.float32)
    q1, k1, kc1, vc1 = q.copy(), k.copy(), kc.copy(), vc.copy()
    out1 = np.full((B, nh, hd), np.nan, np.float32)
    got = [np.full_like(a, 99) for a in q80(np.zeros((B, nh * hd), np.float32))]
    K.rope_attention_q80(q1, k1, v, slot, pos, cos, sin, interleaved, kc1, vc1, kv_of_head, scale, out1, *got)
    q2, k2, kc2, vc2 = q.copy(), k.copy(), kc.copy(), vc.copy()
    out2 = np.empty_like(out1)
    K.rope(q2, pos, cos, sin, interleaved)
    K.rope(k2, pos, cos, sin, interleaved)
    K.kv_store(k2, v, slot, pos, kc2, vc2)
    K.attention(q2, kc2, vc2, slot, pos, kv_of_head, scale, out2)
    assert not np.array_equal(q1, q) and not np.array_equal(kc1, kc)
    for a, e in ((q1, q2), (k1, k2), (kc1, kc2), (vc1, vc2), (out1, out2)):
        np.testing.assert_array_equal(a, e)
    for g, e in zip(got, q80(out2.reshape(B, nh * hd))):
        np.testing.assert_array_equal(g, e)
