"""GGUF reader: config, tensors, dequantization and bad input, on the real SmolLM2 file, the
llama.cpp-made fixtures and small GGUFs written here with gguf.GGUFWriter."""
from __future__ import annotations

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
from dllama_mpi.readers import ModelError, ModelSource, TensorRef, TokenizerSpec, open_model
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


def test_unsupported_architecture(fixtures_dir):
    with pytest.raises(ModelError, match="unsupported architecture 'qwen2'"):
        open_model(fixtures_dir / "qwen2" / "qwen2-q4_0.gguf")


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


def write_gguf(path, *, arch="llama", shapes=None, types=None, tokenizer=True, extra=None, drop=()):
    """A tiny 1-layer llama GGUF (random F32 weights unless `types` says otherwise)."""
    hd = DIM // NH
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HID)
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
        "token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,),
        "blk.0.attn_norm.weight": (DIM,), "blk.0.ffn_norm.weight": (DIM,),
        "blk.0.attn_q.weight": (NH * hd, DIM), "blk.0.attn_k.weight": (NKV * hd, DIM),
        "blk.0.attn_v.weight": (NKV * hd, DIM), "blk.0.attn_output.weight": (DIM, NH * hd),
        "blk.0.ffn_gate.weight": (HID, DIM), "blk.0.ffn_up.weight": (HID, DIM),
        "blk.0.ffn_down.weight": (DIM, HID),
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
                np.zeros(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
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
    p = tmp_path / "q6k.gguf"
    write_gguf(p, shapes={"blk.0.ffn_down.weight": (DIM, 256)}, types={"blk.0.ffn_down.weight": T.Q6_K})
    with pytest.raises(ModelError, match=r"blk\.0\.ffn_down\.weight.*Q6_K"):
        open_gguf(p)


def test_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    write_gguf(p, drop=("blk.0.attn_v.weight",))
    with pytest.raises(ModelError, match=r"missing tensors layers\.0\.wv"):
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
