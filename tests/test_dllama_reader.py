"""distributed-llama .m/.t reader: the fixture files made by distributed-llama's own converters
(llama31, qwen3), small .m/.t files written here (MoE, F32/F16/Q80, bad input), and the tokenizer
rebuilt from the .t vocabulary."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from dllama_mpi.config import llama3_freq_divisors
from dllama_mpi.readers import ModelError, TokenizerSpec, canonical_names, open_model
from dllama_mpi.readers.dllama import parse_tokenizer_file, special_token_ids
from dllama_mpi.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "12345",
    "def f(x):\n    return x ** 2  # square\n", "emoji 😀🦙👍🏽 and CJK 日本語のテキスト 中文 한국어",
    "Ünïcödé çàfé naïve — “quotes” …", "   leading spaces, trailing   ", "tabs\t\tand\n\n\nnewlines\r\n  \n",
    "", " ", "<p>html</p> <div class='x'> a < b > c", "text <|im_start|> and <|endoftext|> inside",
]


@pytest.fixture(scope="module")
def llama31(fixtures_dir):
    d = fixtures_dir / "llama31"
    return open_model(d / "dllama_model_llama31_q40.m", tokenizer=d / "dllama_tokenizer_llama31.t")


@pytest.fixture(scope="module")
def qwen3(fixtures_dir):
    d = fixtures_dir / "qwen3"
    return open_model(d / "dllama_model_qwen3_q40.m", tokenizer=d / "dllama_tokenizer_qwen3.t")


@pytest.fixture(scope="module")
def tok(qwen3) -> Tokenizer:
    return Tokenizer(TokenizerSpec.from_json(qwen3.tokenizer.to_json()))


def _header(path):
    data = path.read_bytes()
    size = struct.unpack("<i", data[4:8])[0]
    kv = struct.unpack(f"<{(size - 8) // 4}i", data[8:size])
    return size, dict(zip(kv[::2], kv[1::2]))


# ---- fixture models -------------------------------------------------------------------------------
def test_llama31_config(llama31):
    c = llama31.config
    assert llama31.format == "dllama"
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("llama", 64, 128, 2, 4, 2, 16)
    assert (c.vocab_size, c.context_length, c.norm_eps, c.rope_theta) == (49152, 256, 1e-5, 500000.0)
    assert c.rope_interleaved is True
    assert c.rope_freq_divisors == llama3_freq_divisors(16, 500000.0, 8.0, 1.0, 4.0, 64)
    assert c.tied_embeddings is False
    assert (c.attn_bias, c.qk_norm, c.n_experts) == (False, False, 0)


def test_qwen3_config(qwen3):
    c = qwen3.config
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("qwen3", 64, 128, 2, 4, 2, 32)
    assert (c.norm_eps, c.rope_theta, c.rope_interleaved, c.rope_freq_divisors) == (1e-6, 1e6, False, None)
    assert c.qk_norm is True and c.attn_bias is False and c.tied_embeddings is False


@pytest.mark.parametrize("which,count", [("llama31", 1 + 2 * 9 + 2), ("qwen3", 1 + 2 * 11 + 2)])
def test_tensor_table(request, which, count):
    src = request.getfixturevalue(which)
    names = src.names()
    assert len(names) == count and sorted(names) == sorted(canonical_names(src.config))
    for n in names:
        t = src.tensor(n)
        assert t.shape == src.expected_shape(n)
        assert t.raw.dtype == np.uint8 and not t.raw.flags.owndata
        if n == "tok_embd" or len(t.shape) == 1:
            assert t.ggml_type == int(T.F32), n
        else:
            assert t.ggml_type == int(T.Q4_0), n
            assert t.raw.shape == (t.shape[0], t.shape[1] // 32 * 18)
    total = sum(src.tensor(n).raw.nbytes for n in names)
    assert _header(src.path)[0] + total == src.path.stat().st_size


def test_first_q40_block_is_the_file_bytes(llama31):
    hsize, h = _header(llama31.path)
    vocab, dim = h[9], h[2]
    offset = hsize + vocab * dim * 4  # the F32 embedding comes first, then layer 0's q_proj
    with open(llama31.path, "rb") as f:
        f.seek(offset)
        block = f.read(18)
    t = llama31.tensor("layers.0.wq")
    assert bytes(t.raw[0, :18]) == block
    d = np.frombuffer(block[:2], dtype="<f2").astype(np.float32)[0]
    q = np.frombuffer(block[2:], dtype=np.uint8)
    want = d * (np.concatenate([q & 15, q >> 4]).astype(np.float32) - 8)
    np.testing.assert_array_equal(t.float32(slice(0, 1))[0, :32], want)
    np.testing.assert_array_equal(t.float32(), dequantize(t.raw, T.Q4_0).reshape(t.shape))


@pytest.mark.parametrize("which,gguf_file", [("llama31", "llama31/llama31-f16.gguf"),
                                             ("qwen3", "qwen3/qwen3-f16.gguf")])
def test_same_weights_as_the_llama_cpp_gguf(request, fixtures_dir, which, gguf_file):
    """The .m (Q40, LLAMA q/k permuted like llama.cpp does) holds the weights of the f16 GGUF."""
    src = request.getfixturevalue(which)
    g = open_model(fixtures_dir / gguf_file)
    for n in src.names():
        other = "tok_embd" if n == "output" and g.config.tied_embeddings else n
        a, b = src.tensor(n).float32(), g.tensor(other).float32()
        if len(a.shape) == 1:
            np.testing.assert_array_equal(a, b, err_msg=n)  # norms: F32 in both
        else:
            assert np.abs(a - b).max() < 0.25 * np.abs(b).max() + 1e-3, n


# ---- tokenizer --------------------------------------------------------------------------------------
def test_tokenizer_values(qwen3, llama31, fixtures_dir):
    spec = qwen3.tokenizer
    assert spec.bos_id == 1 and spec.add_bos is False
    assert spec.eos_ids == [2, 0]  # the file's eos (<|im_end|>), then <|endoftext|> as the GGUF reader does
    g = open_model(fixtures_dir / "qwen3" / "qwen3-f16.gguf").tokenizer
    assert spec.chat_template == g.chat_template and spec.eos_ids == g.eos_ids
    assert llama31.tokenizer == spec  # the two .t files are the same bytes
    t = parse_tokenizer_file(qwen3.tokenizer_path)
    assert special_token_ids(t) == list(range(17))  # SmolLM2's 17 control tokens, not every id >= bos


@pytest.mark.parametrize("folder", ["llama31", "qwen3"])
def test_reference_prompt(fixtures_dir, folder, request):
    src = request.getfixturevalue(folder)
    ref = json.loads((fixtures_dir / folder / "reference.json").read_text())
    t = Tokenizer(src.tokenizer)
    ids = t.encode(ref["prompt_text"])
    assert ids == ref["prompt_ids"]  # identical to the HF tokenizer on this prompt
    assert t.decode(ids) == ref["prompt_text"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_no_control_ids_from_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    specials = set(range(17))
    literal = {"<|im_start|>": 1, "<|endoftext|>": 0}
    found = [i for i in ids if i in specials]
    assert found == [literal[s] for s in ("<|im_start|>", "<|endoftext|>") if s in text]


def test_chat_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    text = tok.render_chat([{"role": "user", "content": "Hello there"}])
    ids = tok.encode(text)
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids) == text
    s = tok.stream()
    assert "".join(s.push(i) for i in ids) + s.flush() == text


def test_close_to_the_hf_tokenizer(tok, fixtures_dir):
    """Greedy merges without regex pre-tokenization: mostly the same ids as HF; differences only
    where HF's regex splits whitespace runs."""
    hf = Tokenizer(open_model(fixtures_dir / "qwen3" / "qwen3-f16.gguf").tokenizer)
    same = [t for t in TEXTS if tok.encode(t) == hf.encode(t)]
    assert len(same) >= len(TEXTS) - 4
    assert "The quick brown fox jumps over the lazy dog." in same


# ---- files written here -----------------------------------------------------------------------------
def write_t(path, tokens: list[bytes], *, scores=None, bos=0, eos=(1,), template=None, add_bos=True,
            version=1, chat_stop=None):
    kv = [(3, bos), (0, version), (1, len(tokens)), (2, max(len(t) for t in tokens))]
    if template:
        kv.append((7, len(template.encode())))
    if chat_stop:
        kv.append((8, len(chat_stop)))
    kv += [(9, len(eos)), (10, int(add_bos))]
    out = struct.pack("<ii", 0x567124, 8 + 8 * len(kv)) + b"".join(struct.pack("<ii", k, v) for k, v in kv)
    if chat_stop:
        out += chat_stop
    if template:
        out += template.encode()
    out += b"".join(struct.pack("<i", e) for e in eos)
    for i, t in enumerate(tokens):
        out += struct.pack("<fI", -float(i) if scores is None else scores[i], len(t)) + t
    path.write_bytes(out)


SMALL_TOKENS = [b"<s>", b"</s>"] + [bytes([b]) for b in range(256)] + [b"ab", b"abc", b" a", b"<|im_start|>"]


def write_m(path, *, arch=0xABCD00, wtype=2, dim=64, hidden=128, layers=1, heads=4, kv_heads=2, head_dim=None,
            vocab=len(SMALL_TOKENS), experts=0, active=0, moe_hidden=0, eps=5, extra=(), seed=0):
    hd = head_dim or dim // heads
    kv = [(0, 0), (1, arch), (11, 1), (2, dim), (3, hidden), (4, layers), (5, heads), (6, kv_heads), (13, wtype),
          (10, 128), (9, vocab), (7, experts), (8, active), (12, 10000)]
    if head_dim:
        kv.append((19, head_dim))
    kv.append((20, eps))
    if moe_hidden:
        kv.append((21, moe_hidden))
    kv += list(extra)
    rng = np.random.default_rng(seed)
    qtype = {0: T.F32, 1: T.F16, 2: T.Q4_0, 3: T.Q8_0}.get(wtype, T.Q4_0)
    arrays = {}

    def add(name, shape, t):
        x = rng.standard_normal(shape).astype(np.float32)
        arrays[name] = x
        return x.tobytes() if t == T.F32 else quantize(x, t).tobytes()

    qwen = arch != 0xABCD00
    body = add("tok_embd", (vocab, dim), T.F32)
    for l in range(layers):
        p = f"layers.{l}."
        body += add(p + "wq", (heads * hd, dim), qtype) + add(p + "wk", (kv_heads * hd, dim), qtype)
        body += add(p + "wv", (kv_heads * hd, dim), qtype) + add(p + "wo", (dim, heads * hd), qtype)
        if experts:
            body += add(p + "router", (experts, dim), T.F32)
            for e in range(experts):
                q = f"{p}experts.{e}."
                body += add(q + "w1", (moe_hidden, dim), qtype) + add(q + "w2", (dim, moe_hidden), qtype)
                body += add(q + "w3", (moe_hidden, dim), qtype)
        else:
            body += add(p + "w1", (hidden, dim), qtype) + add(p + "w2", (dim, hidden), qtype)
            body += add(p + "w3", (hidden, dim), qtype)
        if qwen:
            body += add(p + "q_norm", (hd,), T.F32) + add(p + "k_norm", (hd,), T.F32)
        body += add(p + "attn_norm", (dim,), T.F32) + add(p + "ffn_norm", (dim,), T.F32)
    body += add("out_norm", (dim,), T.F32) + add("output", (vocab, dim), qtype)
    head = struct.pack("<ii", 0x0A00ABCD, 8 + 8 * len(kv)) + b"".join(struct.pack("<ii", k, v) for k, v in kv)
    path.write_bytes(head + body)
    return arrays, qtype


@pytest.fixture
def small_t(tmp_path):
    p = tmp_path / "small.t"
    write_t(p, SMALL_TOKENS, template="<|im_start|>{{ messages[0].content }}", chat_stop=b"STOP")
    return p


def test_qwen3_moe_m(tmp_path, small_t):
    m = tmp_path / "moe.m"
    arrays, qtype = write_m(m, arch=0xABCD02, wtype=3, layers=2, head_dim=32, experts=4, active=2, moe_hidden=32,
                            eps=6)
    src = open_model(m, tokenizer=small_t)
    c = src.config
    assert (c.arch, c.n_experts, c.n_active_experts, c.moe_hidden_dim, c.hidden_dim, c.head_dim) == \
        ("qwen3moe", 4, 2, 32, 128, 32)
    assert c.qk_norm and not c.rope_interleaved and c.norm_topk_prob and c.norm_eps == 1e-6
    assert sorted(src.names()) == sorted(canonical_names(c)) and "layers.0.w1" not in src.names()
    for name, x in arrays.items():
        t = src.tensor(name)
        want = x if t.ggml_type == int(T.F32) else dequantize(quantize(x, qtype), qtype)
        assert t.ggml_type == int(T.F32 if name == "tok_embd" or x.ndim == 1 or name.endswith("router") else T.Q8_0)
        np.testing.assert_array_equal(t.float32(), want, err_msg=name)


@pytest.mark.parametrize("wtype", [0, 1, 2, 3])
def test_weight_types(tmp_path, small_t, wtype):
    m = tmp_path / "w.m"
    arrays, qtype = write_m(m, wtype=wtype)
    src = open_model(m, tokenizer=small_t)
    t = src.tensor("layers.0.w2")
    assert t.ggml_type == int(qtype)
    want = arrays["layers.0.w2"] if wtype == 0 else dequantize(quantize(arrays["layers.0.w2"], qtype), qtype)
    np.testing.assert_array_equal(t.float32(), want)


def test_small_tokenizer(tmp_path, small_t):
    m = tmp_path / "w.m"
    write_m(m)
    spec = open_model(m, tokenizer=small_t).tokenizer
    assert spec.bos_id == 0 and spec.eos_ids == [1] and spec.add_bos is True
    assert spec.chat_template == "<|im_start|>{{ messages[0].content }}"  # after the skipped chat_stop bytes
    t = Tokenizer(spec)
    base = 258
    assert t.encode("abc") == [0, base + 1]
    assert t.encode("xab a", add_bos=False) == [2 + ord("x"), base, base + 2]
    assert t.encode("<s><|im_start|></s>", add_bos=False) == [0, base + 3, 1]
    assert t.decode(t.encode("héllo\n")) == "<s>héllo\n"


def test_duplicate_token_bytes(tmp_path):
    """SentencePiece-derived .t files hold the same bytes twice (<0x41> and "A"): the later id is used."""
    toks = [b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in range(256)] + [b"A", b" the", b"he", b" t"]
    p = tmp_path / "spm.t"
    write_t(p, toks, bos=1, eos=(2,))
    m = tmp_path / "w.m"
    write_m(m, vocab=len(toks))
    t = Tokenizer(open_model(m, tokenizer=p).tokenizer)
    assert t.vocab_size == len(toks)
    assert t.encode("A the", add_bos=False) == [259, 260]
    assert t.decode([3 + 65]) == ""  # the shadowed byte token has no string


# ---- bad input -----------------------------------------------------------------------------------------
def test_needs_tokenizer(llama31):
    with pytest.raises(ModelError, match=r"dllama_model_llama31_q40\.m.*needs --tokenizer FILE\.t") as e:
        open_model(llama31.path)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="tokenizer.*pass the .m"):
        open_model(llama31.tokenizer_path)


@pytest.mark.parametrize("cut", [-1, -18, 2000, 100, 6])
def test_truncated(tmp_path, llama31, cut):
    data = llama31.path.read_bytes()
    bad = tmp_path / "cut.m"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelError, match=r"cut\.m.*truncated or not a \.m file") as e:
        open_model(bad, tokenizer=llama31.tokenizer_path)
    assert "\n" not in str(e.value)


def test_extra_bytes(tmp_path, llama31):
    bad = tmp_path / "long.m"
    bad.write_bytes(llama31.path.read_bytes() + b"\0" * 32)
    with pytest.raises(ModelError, match="truncated or not a .m file"):
        open_model(bad, tokenizer=llama31.tokenizer_path)


def test_truncated_tokenizer(tmp_path, llama31):
    bad = tmp_path / "cut.t"
    bad.write_bytes(llama31.tokenizer_path.read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"cut\.t.*truncated"):
        open_model(llama31.path, tokenizer=bad)


@pytest.mark.parametrize("kw,message", [
    ({"arch": 0xABCD07}, "unsupported architecture 0xabcd07"),
    ({"wtype": 7}, "unsupported weights_float_type 7"),
    ({"eps": 4}, "unsupported norm_epsilon code 4"),
    ({"extra": [(30, 1)]}, "unknown header key 30"),
])
def test_bad_headers(tmp_path, small_t, kw, message):
    m = tmp_path / "bad.m"
    write_m(m, **kw)
    with pytest.raises(ModelError, match=message):
        open_model(m, tokenizer=small_t)


def test_tokenizer_larger_than_model(tmp_path, small_t):
    m = tmp_path / "small.m"
    write_m(m, vocab=100)
    with pytest.raises(ModelError, match=r"small\.t.*tokenizer has 262 tokens but the model's vocab_size is 100"):
        open_model(m, tokenizer=small_t)


def test_old_tokenizer_version(tmp_path):
    p = tmp_path / "old.t"
    write_t(p, SMALL_TOKENS, version=0)
    m = tmp_path / "w.m"
    write_m(m)
    with pytest.raises(ModelError, match="old .t tokenizer version"):
        open_model(m, tokenizer=p)


def test_digest_covers_model_and_tokenizer(llama31):
    h = hashlib.sha256(llama31.path.read_bytes() + llama31.tokenizer_path.read_bytes()).hexdigest()
    assert llama31.digest() == h
