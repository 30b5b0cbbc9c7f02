"""GGUF reader: config, tensors, dequantization and bad input, on the real SmolLM2 file, the
llama.cpp-made fixtures and small GGUFs written here with gguf.GGUFWriter."""
from __future__ import annotations

import functools
import hashlib
import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from dllama_mpi.config import ModelConfig, llama3_freq_divisors
from dllama_mpi.readers import ModelError, ModelSource, TensorRef, TokenizerSpec, canonical_names, open_model
from dllama_mpi.readers.gguf import open_gguf


@pytest.fixture(scope="module")
def smol(smollm2_gguf) -> ModelSource:
    return open_model(smollm2_gguf)


@pytest.fixture(scope="module")
def llama31(fixtures_dir) -> ModelSource:
    return open_model(fixtures_dir / "llama31" / "llama31-f16.gguf")


@pytest.fixture(scope="module")
def tied(fixtures_dir) -> ModelSource:
    return open_model(fixtures_dir / "llama_tied" / "llama_tied-q4_0.gguf")


# ---- SmolLM2 (formats.md §4.5) ------------------------------------------------------------------
def test_smollm2_config(smol):
    c = smol.config
    assert isinstance(c, ModelConfig)
    assert smol.format == "gguf"
    assert (c.arch, c.n_layers, c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.context_length) == (49152, 8192)
    assert c.rope_theta == 100000.0
    assert c.norm_eps == float(np.float32(1e-5))  # the f32 value, kept as is
    assert c.rope_interleaved is True
    assert c.rope_freq_divisors is None
    assert c.tied_embeddings is True
    assert ModelConfig.from_json(c.to_json()) == c


def test_smollm2_tensor_names_types_shapes(smol):
    names = smol.names()
    assert len(names) == 1 + 30 * 9 + 1
    assert "output" not in names and "rope_freqs" not in names
    assert {"tok_embd", "out_norm", "layers.29.w3"} <= set(names)
    expect = {
        "tok_embd": (T.Q8_0, (49152, 576), (49152, 612)),
        "out_norm": (T.F32, (576,), (2304,)),
        "layers.0.attn_norm": (T.F32, (576,), (2304,)),
        "layers.0.ffn_norm": (T.F32, (576,), (2304,)),
        "layers.0.wq": (T.Q4_1, (576, 576), (576, 360)),
        "layers.0.wk": (T.Q4_1, (192, 576), (192, 360)),
        "layers.0.wv": (T.Q4_1, (192, 576), (192, 360)),
        "layers.0.wo": (T.Q4_1, (576, 576), (576, 360)),
        "layers.7.w1": (T.Q4_1, (1536, 576), (1536, 360)),
        "layers.7.w3": (T.Q4_1, (1536, 576), (1536, 360)),
        "layers.7.w2": (T.Q4_1, (576, 1536), (576, 960)),
    }
    for name, (qtype, shape, raw_shape) in expect.items():
        t = smol.tensor(name)
        assert isinstance(t, TensorRef)
        assert (t.name, t.ggml_type, t.shape, t.raw.shape, t.raw.dtype) == \
            (name, int(qtype), shape, raw_shape, np.uint8), name
    with pytest.raises(ModelError, match="output"):
        smol.tensor("output")
    with pytest.raises(ModelError):
        smol.tensor("layers.30.wq")


def test_smollm2_first_q4_1_block(smol):
    t = smol.tensor("layers.0.wq")
    assert bytes(t.raw[0, :6]) == bytes.fromhex("0f30d8b94587")
    y = t.float32(slice(0, 1))
    assert y.shape == (1, 576) and y.dtype == np.float32
    assert y[0, 0] == pytest.approx(-0.0963, abs=1e-4)
    assert y[0, 16] == pytest.approx(-0.2231, abs=1e-4)
    d, m = np.frombuffer(bytes(t.raw[0, :4]), dtype="<f2").astype(np.float32)
    assert y[0, 0] == d * 5 + m and y[0, 16] == d * 4 + m


def test_raw_is_a_view_of_the_mapped_file(smol):
    t = smol.tensor("layers.3.w2")
    assert isinstance(t.raw.base, np.ndarray) or t.raw.base is not None
    assert not t.raw.flags.owndata
    reader = GGUFReader(smol.path)
    ref = next(x for x in reader.tensors if x.name == "blk.3.ffn_down.weight")
    np.testing.assert_array_equal(t.raw, ref.data)


@pytest.mark.parametrize("name", ["tok_embd", "layers.0.wq", "layers.5.w2", "out_norm", "layers.2.attn_norm"])
def test_float32_equals_gguf_dequantize(smol, name):
    t = smol.tensor(name)
    full = t.float32()
    ref = dequantize(t.raw, T(t.ggml_type)).reshape(t.shape)
    assert full.shape == t.shape and full.dtype == np.float32
    np.testing.assert_array_equal(full, ref)
    rows = slice(3, 40)
    np.testing.assert_array_equal(t.float32(rows), ref[rows])
    full[...] = 0  # a fresh array: writing it must not touch the file view
    assert np.any(t.float32() != 0)


def test_digest(tied, fixtures_dir):
    sums = dict(line.split()[::-1] for line in (fixtures_dir / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert tied.digest() == sums["llama_tied/llama_tied-q4_0.gguf"]
    assert tied.digest() == hashlib.sha256(tied.path.read_bytes()).hexdigest()


def test_tokenizer_spec_json_round_trip(smol):
    spec = smol.tokenizer
    assert isinstance(spec, TokenizerSpec)
    again = TokenizerSpec.from_json(spec.to_json())
    assert again == spec
    json.loads(spec.to_json())


# ---- fixtures from llama.cpp's converter --------------------------------------------------------
def test_llama31_rope_freqs_and_untied_output(llama31):
    c = llama31.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (64, 128, 2, 4, 2, 16)
    assert c.rope_theta == 500000.0 and c.tied_embeddings is False
    reader = GGUFReader(llama31.path)
    stored = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert c.rope_freq_divisors == [float(x) for x in stored.data]
    want = llama3_freq_divisors(16, 500000.0, 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(c.rope_freq_divisors, want, rtol=1e-6)
    assert "rope_freqs" not in llama31.names() and "output" in llama31.names()
    out = llama31.tensor("output")
    assert (out.ggml_type, out.shape) == (int(T.F16), (49152, 64))
    np.testing.assert_array_equal(out.float32(slice(10, 12)), stored_output(reader)[10:12])
    assert not np.array_equal(out.float32(slice(0, 4)), llama31.tensor("tok_embd").float32(slice(0, 4)))


def stored_output(reader):
    t = next(t for t in reader.tensors if t.name == "output.weight")
    return np.asarray(t.data, dtype=np.float32)


def test_llama_tied_fixture(tied):
    c = tied.config
    assert c.tied_embeddings is True and "output" not in tied.names()
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == \
        (64, 128, 2, 4, 2, 16, 49152)
    assert c.rope_theta == 10000.0 and c.rope_freq_divisors is None
    assert tied.tensor("tok_embd").ggml_type == int(T.Q4_0)
    assert tied.tensor("layers.1.w2").shape == (64, 128)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "falcon.gguf"
    write_gguf(p, arch="falcon")
    with pytest.raises(ModelError, match=r"falcon\.gguf: unsupported architecture 'falcon'"):
        open_model(p)


# ---- qwen2 / qwen3 / qwen3moe fixtures (llama.cpp's converter) ---------------------------------------
@functools.lru_cache(maxsize=4)
def _reader_tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _stored(src, gguf_name):
    return _reader_tensors(src.path)[gguf_name]


def test_qwen2_fixture_biases(fixtures_dir):
    src = open_model(fixtures_dir / "qwen2" / "qwen2-q4_0.gguf")
    c = src.config
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("qwen2", 64, 128, 2, 4, 2, 16)
    assert (c.attn_bias, c.qk_norm, c.n_experts, c.tied_embeddings, c.rope_interleaved) == \
        (True, False, 0, True, False)
    assert c.rope_theta == 1e6 and c.norm_eps == float(np.float32(1e-6))
    assert sorted(src.names()) == sorted(canonical_names(c))
    for l in range(2):
        for short, gname, n in (("bq", "attn_q", 64), ("bk", "attn_k", 32), ("bv", "attn_v", 32)):
            t = src.tensor(f"layers.{l}.{short}")
            assert (t.shape, t.ggml_type) == ((n,), int(T.F32)) == (src.expected_shape(t.name), int(T.F32))
            np.testing.assert_array_equal(t.float32(), _stored(src, f"blk.{l}.{gname}.bias").data)
    t = src.tensor("layers.1.wq")
    assert t.ggml_type == int(T.Q4_0)
    np.testing.assert_array_equal(t.float32(), dequantize(_stored(src, "blk.1.attn_q.weight").data, T.Q4_0))


def test_qwen3_fixture_head_dim_and_norms(fixtures_dir):
    src = open_model(fixtures_dir / "qwen3" / "qwen3-f16.gguf")
    c = src.config
    assert (c.arch, c.head_dim, c.q_dim, c.kv_dim, c.qk_norm, c.attn_bias, c.rope_interleaved) == \
        ("qwen3", 32, 128, 64, True, False, False)
    assert c.tied_embeddings and c.rope_theta == 1e6
    assert sorted(src.names()) == sorted(canonical_names(c))
    for l in range(2):
        for short, gname in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            t = src.tensor(f"layers.{l}.{short}")
            assert t.shape == (32,)
            np.testing.assert_array_equal(t.float32(), _stored(src, f"blk.{l}.{gname}.weight").data)
    for name, gname in (("layers.0.wq", "blk.0.attn_q.weight"), ("layers.1.wo", "blk.1.attn_output.weight")):
        t = src.tensor(name)
        assert t.ggml_type == int(T.F16) and t.shape == src.expected_shape(name)
        np.testing.assert_array_equal(t.float32(), dequantize(_stored(src, gname).data, T.F16))
    assert src.tensor("layers.0.wq").shape == (128, 64) and src.tensor("layers.0.wo").shape == (64, 128)


def test_qwen3moe_fixture_experts(fixtures_dir):
    src = open_model(fixtures_dir / "qwen3moe" / "qwen3moe-f16.gguf")
    c = src.config
    assert (c.arch, c.n_experts, c.n_active_experts, c.moe_hidden_dim, c.hidden_dim, c.norm_topk_prob) == \
        ("qwen3moe", 4, 2, 64, 128, True)
    assert c.qk_norm and not c.rope_interleaved and c.head_dim == 32 and c.ffn_dim == 64
    names = src.names()
    assert sorted(names) == sorted(canonical_names(c))
    assert not any(n.endswith(("w1", "w2", "w3")) and ".experts." not in n for n in names)
    assert len([n for n in names if ".experts." in n]) == 2 * 4 * 3
    for l in range(2):
        router = src.tensor(f"layers.{l}.router")
        assert (router.shape, router.ggml_type) == ((4, 64), int(T.F32))
        np.testing.assert_array_equal(router.float32(), _stored(src, f"blk.{l}.ffn_gate_inp.weight").data)
        for short, gname in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            stored = _stored(src, f"blk.{l}.{gname}.weight")
            full = dequantize(stored.data, T(stored.tensor_type))  # [4, rows, cols]
            for e in range(4):
                t = src.tensor(f"layers.{l}.experts.{e}.{short}")
                assert t.shape == src.expected_shape(t.name) == full.shape[1:]
                assert t.ggml_type == int(T.F16) and not t.raw.flags.owndata and t.raw.flags.c_contiguous
                np.testing.assert_array_equal(t.raw, stored.data[e].view(np.uint8).reshape(t.raw.shape))
                np.testing.assert_array_equal(t.float32(), full[e])
                np.testing.assert_array_equal(t.float32(slice(5, 9)), full[e][5:9])
    with pytest.raises(ModelError):
        src.tensor("layers.0.experts.4.w1")
    with pytest.raises(ModelError):
        src.tensor("layers.0.ffn_gate_exps.weight")


def test_qwen3moe_missing_expert_tensor(fixtures_dir, tmp_path):
    """A qwen3moe GGUF rewritten without one layer's up experts."""
    reader = GGUFReader(fixtures_dir / "qwen3moe" / "qwen3moe-f16.gguf")
    p = tmp_path / "noup.gguf"
    w = gguf.GGUFWriter(str(p), "qwen3moe")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up_exps.weight":
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=r"noup\.gguf: missing tensors blk\.1\.ffn_up_exps\.weight;"):
        open_model(p)


# ---- K-quants and other dequantizable types ------------------------------------------------------------
def test_k_quants_are_supported_types():
    from dllama_mpi.readers import SUPPORTED_GGML_TYPES
    for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        assert int(t) in SUPPORTED_GGML_TYPES, t.name
    assert int(T.F64) not in SUPPORTED_GGML_TYPES and int(T.I32) not in SUPPORTED_GGML_TYPES


def test_k_quant_tensors_read(tmp_path):
    p = tmp_path / "kq.gguf"
    types = {"blk.0.ffn_down.weight": T.Q6_K, "blk.0.ffn_up.weight": T.Q4_K, "blk.0.ffn_gate.weight": T.Q5_K,
             "blk.0.attn_q.weight": T.Q5_0, "token_embd.weight": T.Q3_K}
    write_gguf(p, dim=256, hid=512, types=types)
    src = open_gguf(p)
    assert (src.config.dim, src.config.hidden_dim) == (256, 512)
    reader = GGUFReader(p)
    for gname, qtype in types.items():
        canon = {"blk.0.ffn_down.weight": "layers.0.w2", "blk.0.ffn_up.weight": "layers.0.w3",
                 "blk.0.ffn_gate.weight": "layers.0.w1", "blk.0.attn_q.weight": "layers.0.wq",
                 "token_embd.weight": "tok_embd"}[gname]
        t = src.tensor(canon)
        stored = next(x for x in reader.tensors if x.name == gname)
        assert t.ggml_type == int(qtype) and t.shape == src.expected_shape(canon)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert t.raw.shape == (t.shape[0], t.shape[1] // block * size)
        ref = dequantize(stored.data, qtype)
        got = t.float32()
        assert got.shape == t.shape and got.dtype == np.float32 and np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(t.float32(slice(2, 5)), ref[2:5])
    # one Q6_K value by the block formula (formats.md §1.2): element 0 of row 0
    t = src.tensor("layers.0.w2")
    blk = t.raw[0, :210]
    d = np.frombuffer(bytes(blk[208:210]), dtype="<f2").astype(np.float32)[0]
    q = (int(blk[0]) & 15) | ((int(blk[128]) & 3) << 4)
    scale = np.frombuffer(bytes(blk[192:193]), dtype=np.int8)[0]
    assert t.float32(slice(0, 1))[0, 0] == pytest.approx(d * scale * (q - 32), rel=1e-6)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01, 2000, 30, 5])
def test_truncated_file(fixtures_dir, tmp_path, keep):
    src = fixtures_dir / "llama_tied" / "llama_tied-q4_0.gguf"
    data = src.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ModelError) as e:
        open_model(bad)
    msg = str(e.value)
    assert "cut.gguf" in msg and "\n" not in msg
    if n > 4:
        assert "truncated" in msg


def test_data_cut_at_tensor_boundary(fixtures_dir, tmp_path):
    # Drop exactly the last tensor's bytes: the header still parses, the data is missing.
    src = fixtures_dir / "llama_tied" / "llama_tied-q4_0.gguf"
    reader = GGUFReader(src)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    bad = tmp_path / "short.gguf"
    bad.write_bytes(src.read_bytes()[:int(last.data_offset)])
    with pytest.raises(ModelError, match="truncated"):
        open_model(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelError, match="model.bin.*unknown model format"):
        open_model(bad)
    with pytest.raises(ModelError, match="no such file"):
        open_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelError, match="directory"):
        open_model(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError):
        open_model(empty)


# ---- small GGUFs written here ---------------------------------------------------------------------
DIM, HID, NH, NKV, VOCAB = 32, 64, 2, 1, 8


def random_blocks(shape, qtype, rng) -> np.ndarray:
    """Random bytes of a quantized tensor (the gguf package has no K-quant quantizer), with every
    f16 scale field set to a sane value so dequantized numbers are finite."""
    q = rng.integers(0, 256, gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = q.reshape(-1, size)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    fields = {T.Q6_K: [size - 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q2_K: [size - 4, size - 2],
              T.Q3_K: [size - 2], T.Q5_0: [0], T.Q5_1: [0, 2]}.get(qtype, [])
    for off in fields:
        blocks[:, off:off + 2] = scale
    return q


def write_gguf(path, *, arch="llama", shapes=None, types=None, tokenizer=True, extra=None, drop=(),
               dim=DIM, hid=HID):
    """A tiny 1-layer llama GGUF (random F32 weights unless `types` says otherwise)."""
    hd = dim // NH
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hid)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(20000.0)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "c"])
        w.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
        w.add_token_merges(["a b", "Ġ a"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    for key, fn in (extra or {}).items():
        fn(w)
    default = {
        "token_embd.weight": (VOCAB, dim), "output_norm.weight": (dim,),
        "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
        "blk.0.attn_q.weight": (NH * hd, dim), "blk.0.attn_k.weight": (NKV * hd, dim),
        "blk.0.attn_v.weight": (NKV * hd, dim), "blk.0.attn_output.weight": (dim, NH * hd),
        "blk.0.ffn_gate.weight": (hid, dim), "blk.0.ffn_up.weight": (hid, dim),
        "blk.0.ffn_down.weight": (dim, hid),
    }
    default.update(shapes or {})
    rng = np.random.default_rng(0)
    arrays = {}
    for name, shape in default.items():
        if name in drop:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, x)
        else:
            q = quantize(x, qtype) if qtype in (T.Q4_0, T.Q4_1, T.Q8_0, T.BF16) else \
                random_blocks(shape, qtype, rng)
            w.add_tensor(name, q, raw_dtype=qtype)
        arrays[name] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


def test_tiny_gguf_reads(tmp_path):
    p = tmp_path / "tiny.gguf"
    types = {"blk.0.attn_q.weight": T.Q4_0, "blk.0.ffn_up.weight": T.Q8_0,
             "blk.0.ffn_down.weight": T.BF16, "blk.0.ffn_gate.weight": T.Q4_1}
    arrays = write_gguf(p, types=types)
    src = open_gguf(p)
    c = src.config
    assert (c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (DIM, HID, NH, NKV, 16, VOCAB)
    assert c.rope_theta == 20000.0 and c.norm_eps == float(np.float32(1e-6)) and c.tied_embeddings
    np.testing.assert_array_equal(src.tensor("layers.0.wk").float32(), arrays["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(src.tensor("out_norm").float32(slice(2, 5)), arrays["output_norm.weight"][2:5])
    for gname, canon in (("blk.0.attn_q.weight", "layers.0.wq"), ("blk.0.ffn_up.weight", "layers.0.w3"),
                         ("blk.0.ffn_down.weight", "layers.0.w2"), ("blk.0.ffn_gate.weight", "layers.0.w1")):
        t = src.tensor(canon)
        assert t.ggml_type == int(types[gname])
        ref = dequantize(quantize(arrays[gname], types[gname]), types[gname])
        np.testing.assert_array_equal(t.float32(), ref)
        np.testing.assert_allclose(t.float32(), arrays[gname], atol=0.6)
    assert src.tokenizer.bos_id == 0 and src.tokenizer.eos_ids == [1]


def test_linear_rope_scaling_becomes_divisors(tmp_path):
    p = tmp_path / "linear.gguf"
    write_gguf(p, extra={"s": lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                         w.add_rope_scaling_factor(4.0))})
    assert open_gguf(p).config.rope_freq_divisors == [4.0] * 8


def test_yarn_rope_scaling_rejected(tmp_path):
    p = tmp_path / "yarn.gguf"
    write_gguf(p, extra={"s": lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                         w.add_rope_scaling_factor(4.0))})
    with pytest.raises(ModelError, match="yarn"):
        open_gguf(p)


def test_wrong_shape(tmp_path):
    p = tmp_path / "shape.gguf"
    write_gguf(p, shapes={"blk.0.ffn_up.weight": (HID + 32, DIM)})
    with pytest.raises(ModelError, match=r"shape\.gguf.*blk\.0\.ffn_up\.weight.*shape"):
        open_gguf(p)


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "i32.gguf"
    write_gguf(p, types={"blk.0.ffn_down.weight": T.I32})
    with pytest.raises(ModelError, match=r"i32\.gguf: tensor blk\.0\.ffn_down\.weight has type I32, which is not "
                                         "supported"):
        open_gguf(p)


def test_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    write_gguf(p, drop=("blk.0.attn_v.weight",))
    with pytest.raises(ModelError, match=r"missing tensors blk\.0\.attn_v\.weight"):
        open_gguf(p)


def test_missing_tokenizer(tmp_path):
    p = tmp_path / "notok.gguf"
    write_gguf(p, tokenizer=False, extra={"v": lambda w: w.add_vocab_size(VOCAB)})
    with pytest.raises(ModelError, match="tokenizer"):
        open_gguf(p)


def test_copy_of_fixture_opens_and_digest_differs_by_content(fixtures_dir, tmp_path):
    src = fixtures_dir / "llama_tied" / "llama_tied-q4_0.gguf"
    dst = tmp_path / "copy.gguf"
    shutil.copy(src, dst)
    a, b = open_model(src), open_model(dst)
    assert a.digest() == b.digest() and a.config == b.config
