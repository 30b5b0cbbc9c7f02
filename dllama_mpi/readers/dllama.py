"""distributed-llama model (.m) and tokenizer (.t) reader (formats.md §2 and §3).

`.m`: int32 header of (key, value) pairs, then the tensors back to back in the converter's order
(`_plan`), embedding/norms/router F32, the other matrices in the file's weights_float_type
(F32, F16, Q40 = GGML Q4_0 bytes, Q80 = GGML Q8_0 bytes). The LM head is always written (a copy of
the embedding when the HF model was tied), so it is exposed as `output` and `tied_embeddings` is
False. LLAMA files hold Q/K rows permuted for interleaved RoPE (`rope_interleaved=True`); QWEN3 and
QWEN3_MOE are unpermuted and dllama forces ROPE_FALCON (half-split) for them.

`.t`: vocabulary of raw token bytes with scores, bos id, eos ids, chat template. It becomes a
`tokenizers` byte-level BPE that encodes like dllama's algorithm (greedy merges by score over the
whole text, no regex pre-tokenization): merges are generated from the vocabulary (every split of a
token into two vocabulary tokens is a merge, ranked by the token's score). Unlike dllama (which
treats every id >= bos_id as special), only real control tokens are special: bos, the eos ids and
the `<...>` / `<|...|>` tokens in the contiguous runs around them, at either end of the vocabulary,
or written in the chat template. So chat-template tokens encode as single ids and ordinary text
never produces control ids.
"""
from __future__ import annotations

import hashlib
import pathlib
import re
import struct

import numpy as np

from ..config import ModelConfig, llama3_freq_divisors
from . import (DLLAMA_MODEL_MAGIC, DLLAMA_TOKENIZER_MAGIC, ModelError, ModelSource, TensorRef, TokenizerSpec,
               check_tensors, check_vocab)
from .gguf import END_TOKENS

ARCH_TYPES = {0xABCD00: "llama", 0xABCD01: "qwen3", 0xABCD02: "qwen3moe"}
ARCH_NAMES = {0xABCD00: "LLAMA", 0xABCD01: "QWEN3", 0xABCD02: "QWEN3_MOE"}
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2

# header keys (LlmHeaderKey in src/llm.hpp)
K_VERSION, K_ARCH, K_DIM, K_HIDDEN, K_LAYERS, K_HEADS, K_KV_HEADS, K_EXPERTS, K_ACTIVE, K_VOCAB, K_SEQ, \
    K_ACT, K_THETA, K_WTYPE, K_SCALE, K_LOW, K_HIGH, K_ORIG, K_ROPE_TYPE, K_HEAD_DIM, K_EPS, K_MOE_HIDDEN = range(22)

# .m weights_float_type -> (ggml type name, elements per block, bytes per block)
FLOAT_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q8_0", 32, 34)}
FLOAT_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q40", 3: "Q80"}
NORM_EPS = {5: 1e-5, 6: 1e-6}

# .t header keys (TokenizerHeaderKey in src/tokenizer.hpp)
T_VERSION, T_VOCAB, T_MAX_LEN, T_BOS, T_EOS, T_PAD, T_CHAT_EOS, T_TEMPLATE, T_CHAT_STOP, T_N_EOS, T_ADD_BOS = range(11)


def _fail(path, msg) -> ModelError:
    return ModelError(f"{path}: {msg}")


def open_dllama(path, tokenizer=None) -> "DllamaSource":
    path = pathlib.Path(path)
    if tokenizer is None:
        raise _fail(path, "a distributed-llama .m model needs --tokenizer FILE.t (its tokenizer file)")
    return DllamaSource(path, pathlib.Path(tokenizer))


def read_header(path: pathlib.Path, data: np.ndarray) -> tuple[int, dict[int, int]]:
    """(header size, {key: value}) of a .m file."""
    size = len(data)
    if size < 8:
        raise _fail(path, "truncated or not a .m file (shorter than its header)")
    magic, header_size = struct.unpack("<ii", bytes(data[:8]))
    if magic in (0xABCD00, 0xABCD01):
        raise _fail(path, "is an old distributed-llama model format; re-convert it with distributed-llama's "
                          "current converter/convert-hf.py")
    if magic != DLLAMA_MODEL_MAGIC:
        raise _fail(path, f"not a .m file (magic {magic:#x})")
    if header_size < 8 or (header_size - 8) % 8 or header_size > size:
        raise _fail(path, f"truncated or not a .m file (header size {header_size}, file size {size})")
    kv = np.frombuffer(bytes(data[8:header_size]), dtype="<i4").reshape(-1, 2)
    header = {}
    for key, value in kv.tolist():
        if not 0 <= key <= K_MOE_HIDDEN:
            raise _fail(path, f"unknown header key {key}; the file is corrupt or from a newer distributed-llama")
        header[key] = value
    return header_size, header


class DllamaSource(ModelSource):
    format = "dllama"

    def __init__(self, path: pathlib.Path, tokenizer_path: pathlib.Path):
        self.path = path = pathlib.Path(path)
        self.tokenizer_path = tokenizer_path = pathlib.Path(tokenizer_path)
        self._digest = None
        if not tokenizer_path.is_file():
            raise _fail(tokenizer_path, "no such tokenizer file; check the --tokenizer path")
        size = path.stat().st_size
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        header_size, h = read_header(path, self._map)
        self.header = h
        self.config = self._build_config(h)
        wtype = h[K_WTYPE]

        # Tensor table, in the converter's order; the sizes must add up to the file exactly.
        from gguf import GGMLQuantizationType as T
        self._refs: dict[str, tuple[int, tuple[int, ...], int, int]] = {}
        offset = header_size
        for name, shape, ftype in self._plan(wtype):
            tname, block, block_bytes = FLOAT_TYPES[ftype]
            n = int(np.prod(shape))
            if shape[-1] % block:
                raise _fail(path, f"tensor {name} has rows of {shape[-1]} values, not a multiple of the "
                                  f"{FLOAT_TYPE_NAMES[ftype]} block size {block}; the file is corrupt")
            nbytes = n // block * block_bytes
            self._refs[name] = (int(T[tname]), shape, offset, nbytes)
            offset += nbytes
        if offset != size:
            raise _fail(path, f"truncated or not a .m file: the header describes {offset} bytes of header and "
                              f"tensors but the file has {size} bytes; re-download or re-convert it")
        check_tensors(path, self.config, {n: (n, t, s) for n, (t, s, _, _) in self._refs.items()})
        self.tokenizer = read_tokenizer(tokenizer_path)
        check_vocab(tokenizer_path, self.tokenizer, self.config)

    def _build_config(self, h: dict[int, int]) -> ModelConfig:
        path = self.path
        for key, what in ((K_ARCH, "arch_type"), (K_DIM, "dim"), (K_HIDDEN, "hidden_dim"), (K_LAYERS, "n_layers"),
                          (K_HEADS, "n_heads"), (K_KV_HEADS, "n_kv_heads"), (K_VOCAB, "vocab_size"),
                          (K_SEQ, "max_seq_len"), (K_WTYPE, "weights_float_type")):
            if key not in h:
                raise _fail(path, f"header has no {what} (key {key}); the file is corrupt")
        arch_code = h[K_ARCH]
        arch = ARCH_TYPES.get(arch_code)
        if arch is None:
            raise _fail(path, f"unsupported architecture {arch_code:#x} (supported: LLAMA 0xabcd00, QWEN3 "
                              "0xabcd01, QWEN3_MOE 0xabcd02)")
        if h[K_WTYPE] not in FLOAT_TYPES:
            raise _fail(path, f"unsupported weights_float_type {h[K_WTYPE]} (supported: 0 F32, 1 F16, 2 Q40, 3 Q80)")
        if h.get(K_ACT, 1) != 1:
            raise _fail(path, f"hidden_act {h[K_ACT]} (gelu) is not supported (only silu)")
        dim, n_heads, n_kv = h[K_DIM], h[K_HEADS], h[K_KV_HEADS]
        if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv or dim <= 0:
            raise _fail(path, f"bad shape in the header: dim={dim} n_heads={n_heads} n_kv_heads={n_kv}")
        head_dim = h.get(K_HEAD_DIM, dim // n_heads)
        eps_code = h.get(K_EPS, 5)
        if eps_code not in NORM_EPS:
            raise _fail(path, f"unsupported norm_epsilon code {eps_code} (5 = 1e-5, 6 = 1e-6)")
        theta = float(h.get(K_THETA, 10000))
        rope_type = h.get(K_ROPE_TYPE, ROPE_LLAMA)
        if rope_type not in (ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1):
            raise _fail(path, f"unsupported rope_type {rope_type}")
        if arch != "llama":
            rope_type = ROPE_FALCON  # loadLlmHeader forces half-split RoPE for QWEN3 / QWEN3_MOE
        divisors = None
        factor = h.get(K_SCALE, 1)
        if rope_type == ROPE_LLAMA3_1 and factor != 1:
            for key, what in ((K_LOW, "low_freq_factor"), (K_HIGH, "high_freq_factor"),
                              (K_ORIG, "orig_max_seq_len")):
                if key not in h:
                    raise _fail(path, f"llama3.1 rope scaling without rope_scaling_{what} (key {key})")
            divisors = llama3_freq_divisors(head_dim, theta, float(factor), float(h[K_LOW]), float(h[K_HIGH]),
                                            int(h[K_ORIG]))
        n_experts = h.get(K_EXPERTS, 0)
        n_active = h.get(K_ACTIVE, 0) if n_experts else 0
        moe_hidden = h.get(K_MOE_HIDDEN, 0) if n_experts else 0
        if arch == "qwen3moe" and n_experts <= 0:
            raise _fail(path, "QWEN3_MOE model with n_experts = 0; the file is corrupt")
        if n_experts and arch != "qwen3moe":
            raise _fail(path, f"{ARCH_NAMES[arch_code]} model with n_experts = {n_experts} is not supported")
        if n_experts and (moe_hidden <= 0 or not 0 < n_active <= n_experts):
            raise _fail(path, f"bad MoE header: n_experts={n_experts} n_active_experts={n_active} "
                              f"moe_hidden_dim={moe_hidden}")
        return ModelConfig(
            arch=arch, dim=dim, hidden_dim=h[K_HIDDEN], n_layers=h[K_LAYERS], n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, vocab_size=h[K_VOCAB], context_length=h[K_SEQ], norm_eps=NORM_EPS[eps_code],
            rope_theta=theta, rope_interleaved=rope_type != ROPE_FALCON, rope_freq_divisors=divisors,
            tied_embeddings=False, attn_bias=False, qk_norm=arch != "llama",
            n_experts=n_experts, n_active_experts=n_active, moe_hidden_dim=moe_hidden, norm_topk_prob=True,
        )

    def _plan(self, wt: int) -> list[tuple[str, tuple[int, ...], int]]:
        """(canonical name, shape, .m float type) in file order (`Processor.__preparePlan`)."""
        c = self.config
        F32 = 0
        plan = [("tok_embd", (c.vocab_size, c.dim), F32)]
        for l in range(c.n_layers):
            p = f"layers.{l}."
            plan += [(p + "wq", (c.q_dim, c.dim), wt), (p + "wk", (c.kv_dim, c.dim), wt),
                     (p + "wv", (c.kv_dim, c.dim), wt), (p + "wo", (c.dim, c.q_dim), wt)]
            if c.n_experts:
                m = c.moe_hidden_dim
                plan.append((p + "router", (c.n_experts, c.dim), F32))
                for e in range(c.n_experts):
                    q = f"{p}experts.{e}."
                    plan += [(q + "w1", (m, c.dim), wt), (q + "w2", (c.dim, m), wt), (q + "w3", (m, c.dim), wt)]
            else:
                plan += [(p + "w1", (c.hidden_dim, c.dim), wt), (p + "w2", (c.dim, c.hidden_dim), wt),
                         (p + "w3", (c.hidden_dim, c.dim), wt)]
            if c.qk_norm:
                plan += [(p + "q_norm", (c.head_dim,), F32), (p + "k_norm", (c.head_dim,), F32)]
            plan += [(p + "attn_norm", (c.dim,), F32), (p + "ffn_norm", (c.dim,), F32)]
        plan += [("out_norm", (c.dim,), F32), ("output", (c.vocab_size, c.dim), wt)]
        return plan

    # ---- interface ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._refs)

    def tensor(self, name: str) -> TensorRef:
        ref = self._refs.get(name)
        if ref is None:
            raise _fail(self.path, f"no tensor {name!r} in this model")
        qtype, shape, offset, nbytes = ref
        raw = self._map[offset:offset + nbytes]
        if len(shape) > 1:
            raw = raw.reshape(shape[0], nbytes // shape[0])
        return TensorRef(name=name, ggml_type=qtype, shape=shape, raw=raw)

    def tensor_offset(self, name: str) -> int:
        """Byte offset of a tensor's data in the .m file."""
        return self._refs[name][2]

    def digest(self) -> str:
        """sha256 of the .m file's bytes followed by the .t file's bytes."""
        if self._digest is None:
            h = hashlib.sha256()
            for p in (self.path, self.tokenizer_path):
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
            self._digest = h.hexdigest()
        return self._digest


# ---- tokenizer (.t) -----------------------------------------------------------------------------
class TFile:
    """The parsed content of a .t file."""

    def __init__(self, tokens, scores, bos_id, eos_ids, chat_template, add_bos, max_token_length):
        self.tokens: list[bytes] = tokens
        self.scores: list[float] = scores
        self.bos_id: int | None = bos_id
        self.eos_ids: list[int] = eos_ids
        self.chat_template: str | None = chat_template
        self.add_bos: bool = add_bos
        self.max_token_length: int = max_token_length


def parse_tokenizer_file(path: pathlib.Path) -> TFile:
    """Parse a .t file as `Tokenizer::Tokenizer` (src/tokenizer.cpp) reads it."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror})") from None
    pos = 0

    def take(n, what):
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise _fail(path, f"truncated .t file (reading {what} at byte {pos}); re-convert the tokenizer")
        b = data[pos:pos + n]
        pos += n
        return b

    magic = struct.unpack("<i", take(4, "magic"))[0]
    eos: list[int] = []
    template = None
    add_bos = True
    bos = -1
    if magic == 0x567123:  # old fixed header
        vocab_size, max_len, bos, eos_id, _pad = struct.unpack("<IIiii", take(20, "header"))
        eos.append(eos_id)
    elif magic == DLLAMA_TOKENIZER_MAGIC:
        header_size = struct.unpack("<i", take(4, "header size"))[0]
        if header_size < 8 or (header_size - 8) % 8:
            raise _fail(path, f"bad .t header size {header_size}; the file is corrupt")
        kv = struct.unpack(f"<{(header_size - 8) // 4}i", take(header_size - 8, "header"))
        version, vocab_size, max_len, template_len, n_eos = -1, -1, 0, -1, 0
        for key, value in zip(kv[::2], kv[1::2]):
            if key == T_VERSION:
                version = value
            elif key == T_VOCAB:
                vocab_size = value
            elif key == T_MAX_LEN:
                max_len = value
            elif key == T_BOS:
                bos = value
            elif key in (T_EOS, T_CHAT_EOS):
                eos.append(value)
            elif key == T_TEMPLATE:
                template_len = value
            elif key == T_CHAT_STOP:
                take(value, "chat_stop")
            elif key == T_PAD:
                pass
            elif key == T_N_EOS:
                n_eos = value
            elif key == T_ADD_BOS:
                add_bos = bool(value)
            else:
                raise _fail(path, f"unknown .t header key {key}; the file is corrupt")
        if version != 1:
            raise _fail(path, f"old .t tokenizer version {version}; re-convert the tokenizer with "
                              "distributed-llama's converter/convert-tokenizer-hf.py")
        if template_len > 0:
            try:
                template = take(template_len, "chat template").decode("utf-8")
            except UnicodeDecodeError:
                raise _fail(path, "the chat template is not valid UTF-8; the file is corrupt") from None
        if n_eos > 0:
            eos += list(struct.unpack(f"<{n_eos}i", take(4 * n_eos, "eos ids")))
    else:
        raise _fail(path, f"not a distributed-llama tokenizer (.t) file (magic {magic:#x})")
    if max_len < 1 or vocab_size <= 0:
        raise _fail(path, f"bad .t header (vocab_size {vocab_size}, max_token_length {max_len})")
    tokens, scores = [], []
    for i in range(vocab_size):
        score, n = struct.unpack("<fI", take(8, f"token {i}"))
        tokens.append(take(n, f"token {i}"))
        scores.append(score)
    eos_ids = []
    for i in eos:
        if not 0 <= i < vocab_size:
            raise _fail(path, f"eos id {i} is outside the vocabulary of {vocab_size} tokens")
        if i not in eos_ids:
            eos_ids.append(i)
    if bos >= vocab_size:
        raise _fail(path, f"bos id {bos} is outside the vocabulary of {vocab_size} tokens")
    return TFile(tokens, scores, bos if bos >= 0 else None, eos_ids, template, add_bos, max_len)


_SPECIAL_FORM = re.compile(r"^<[^\s<>]+>$")
_TEMPLATE_TOKEN = re.compile(r"<[^\s<>]+>")


def special_token_ids(t: TFile) -> list[int]:
    """Ids treated as control tokens (see the module docstring)."""
    def text(i):
        try:
            return t.tokens[i].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def form(i):
        s = text(i)
        return s is not None and bool(_SPECIAL_FORM.match(s))

    n = len(t.tokens)
    anchors = [i for i in [t.bos_id, *t.eos_ids] if i is not None and text(i)]
    anchors += [i for i in (0, n - 1) if form(i)]
    if t.chat_template:
        index = {}
        wanted = set(_TEMPLATE_TOKEN.findall(t.chat_template))
        for i, b in enumerate(t.tokens):
            if b[:1] == b"<" and (s := text(i)) in wanted:
                index.setdefault(s, i)
        anchors += list(index.values())
    special = set(anchors)
    for a in anchors:
        for step in (-1, 1):
            i = a + step
            while 0 <= i < n and i not in special and form(i):
                special.add(i)
                i += step
    return sorted(special)


def build_tokenizer(t: TFile, path=None):
    """A `tokenizers.Tokenizer` that encodes like distributed-llama (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from ..tokenizer import _bytes_to_unicode
    table = _bytes_to_unicode()
    special = special_token_ids(t)
    special_set = set(special)
    strings = []
    for i, b in enumerate(t.tokens):
        strings.append(b.decode("utf-8") if i in special_set else "".join(table[x] for x in b))
    vocab: dict[str, int] = {}
    for i, s in enumerate(strings):
        vocab[s] = i   # duplicate byte strings (SentencePiece <0xXX> vs a plain piece): the last id wins
    regular = {s: i for s, i in vocab.items() if i not in special_set}
    merges = []
    for s, i in regular.items():
        for k in range(1, len(s)):
            if s[:k] in regular and s[k:] in regular:
                merges.append((-t.scores[i], i, k, s[:k], s[k:]))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if special:
        tok.add_special_tokens([AddedToken(strings[i], special=True, normalized=False) for i in special])
    for i in special:
        if tok.token_to_id(strings[i]) != i:
            raise _fail(path, f"special token {strings[i]!r} does not map onto id {i}; the tokenizer is corrupt")
    return tok


def read_tokenizer(path) -> TokenizerSpec:
    """A TokenizerSpec from a .t file."""
    t = parse_tokenizer_file(pathlib.Path(path))
    tok = build_tokenizer(t, path)
    eos_ids = list(t.eos_ids)
    specials = {t.tokens[i]: i for i in special_token_ids(t)}
    for name in END_TOKENS:  # as the GGUF reader: other end-of-turn/text control tokens also stop
        i = specials.get(name.encode())
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    return TokenizerSpec(tokenizer_json=tok.to_str(), chat_template=t.chat_template, bos_id=t.bos_id,
                         eos_ids=eos_ids, add_bos=t.add_bos and t.bos_id is not None)
