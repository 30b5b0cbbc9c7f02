"""GGUF reader (llama.cpp's model format), built on the `gguf` package's `GGUFReader`.

Supported: `general.architecture` "llama" (Llama 2/3, SmolLM, Mistral-style dense models), "qwen2"
(q/k/v biases), "qwen3" (per-head q/k RMSNorm, head_dim from key_length) and "qwen3moe" (router
`ffn_gate_inp` + 3-D expert tensors `ffn_{gate,up,down}_exps`, exposed per expert as zero-copy 2-D
views `layers.L.experts.E.w1/w2/w3`). Tensor types: every type `gguf.quants.dequantize` handles
(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, ...), exposed with their real ggml type.
Tokenizers: "gpt2" (byte-level BPE) with the
pre-tokenizers in SUPPORTED_PRE, and "llama" (SentencePiece BPE with byte fallback, rebuilt the way
transformers' GGUF loader does: merges recovered from the scores, Metaspace pre-tokenizer).

Notes on what the file means (formats.md §4):
* Q/K rows of llama-arch GGUFs are permuted by llama.cpp's converter; we use them as stored and
  set `rope_interleaved=True` (rotate pairs 2j, 2j+1). qwen2/qwen3/qwen3moe are not permuted:
  `rope_interleaved=False` (half-split NeoX pairs).
* Llama 3.1 rope scaling is a `rope_freqs.weight` tensor of per-frequency divisors; it becomes
  `config.rope_freq_divisors` and is not listed among the tensors.
* `{arch}.rope.scaling.type == "linear"` (positions divided by a factor) is the same as dividing
  every frequency by the factor, so it also becomes `rope_freq_divisors`. yarn/longrope: ModelError.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from ..config import ModelConfig
from . import ModelError, ModelSource, TensorRef, TokenizerSpec, check_tensors, check_vocab

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")

_GLOBAL_NAMES = {"token_embd.weight": "tok_embd", "output.weight": "output", "output_norm.weight": "out_norm"}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "w1",
    "ffn_down.weight": "w2", "ffn_up.weight": "w3",
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm", "ffn_gate_inp.weight": "router",
}
# 3-D [n_expert, rows, cols] tensors, exposed per expert as layers.L.experts.E.<short>
_EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_down_exps.weight": "w2", "ffn_up_exps.weight": "w3"}


def _gguf_name(canon: str) -> str:
    """The GGUF tensor name of a canonical one (for messages)."""
    for table in (_GLOBAL_NAMES, _LAYER_NAMES):
        for gname, c in table.items():
            if c == canon:
                return gname
    m = re.fullmatch(r"layers\.(\d+)\.(?:experts\.\d+\.)?(\w+)", canon)
    if m:
        names = _EXPERT_NAMES if ".experts." in canon else _LAYER_NAMES
        for gname, c in names.items():
            if c == m.group(2):
                return f"blk.{m.group(1)}.{gname}"
    return canon
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+\.(?:weight|bias))$")

# GGUF TokenType values
_TT_CONTROL, _TT_USER_DEFINED = 3, 4

# Tokens that end a turn or a text, for the models we know; added to eos_ids when present as specials.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<|endoftext|>", "<|end|>", "<|return|>", "</s>")

# Pre-tokenizer regexes by tokenizer.ggml.pre (as in llama.cpp's llama-vocab.cpp and the models'
# own tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
# Llama 3's own tokenizer.json (and llama.cpp for these pre types) use a whole pre-token found in
# the vocabulary directly, without applying merges.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"}
SUPPORTED_PRE = ("smollm", "gpt2", "default", *_PRE_SPLITS)


def open_gguf(path) -> "GGUFSource":
    return GGUFSource(pathlib.Path(path))


def _fail(path, msg) -> ModelError:
    return ModelError(f"{path}: {msg}")


class GGUFSource(ModelSource):
    format = "gguf"

    def __init__(self, path: pathlib.Path):
        from gguf import GGUFReader

        self.path = path = pathlib.Path(path)
        self._digest = None
        size = path.stat().st_size
        try:
            reader = GGUFReader(path, "r")
        except OSError as e:
            raise _fail(path, f"cannot read ({e}); check the file") from None
        except Exception as e:  # the gguf parser raises assorted errors on corrupt input
            raise _fail(path, f"cannot parse the GGUF file, it is truncated or corrupt ({e}); "
                              "re-download or re-convert it") from None
        self._reader = reader
        self._meta = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self._meta[key] = field

        arch = self._str("general.architecture")
        if arch is None:
            raise _fail(path, "no general.architecture key; not a model GGUF")
        if arch not in SUPPORTED_ARCHS:
            raise _fail(path, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        # Tensors: map GGUF names to canonical names, check types and extents.
        self._tensors = {}
        self._experts = {}   # canonical "layers.L.experts.E.wK" -> (3-D ReaderTensor, E)
        rope_freqs = None
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise _fail(path, f"tensor {t.name} ends at byte {end} but the file has {size} bytes: "
                                  "the file is truncated; re-download it")
            if t.name == "rope_freqs.weight":
                rope_freqs = t
                continue
            canon = _GLOBAL_NAMES.get(t.name)
            if canon is None and (m := _LAYER_RE.match(t.name)):
                layer, suffix = int(m.group(1)), m.group(2)
                if suffix in _EXPERT_NAMES and arch == "qwen3moe":
                    for e in range(int(t.shape[-1]) if len(t.shape) == 3 else 0):
                        self._experts[f"layers.{layer}.experts.{e}.{_EXPERT_NAMES[suffix]}"] = (t, e)
                    self._tensors[f"layers.{layer}.{suffix}"] = t  # checked as a whole, not listed
                    continue
                short = _LAYER_NAMES.get(suffix)
                canon = f"layers.{layer}.{short}" if short else None
            if canon is None:
                continue  # a tensor this architecture does not use
            self._tensors[canon] = t

        self.config = self._build_config(arch, rope_freqs)
        self._check_tensors()
        self.tokenizer = build_tokenizer_spec(self._meta, path)
        check_vocab(path, self.tokenizer, self.config)

    # ---- metadata helpers -------------------------------------------------------------------
    def _field(self, key):
        return self._meta.get(key)

    def _str(self, key) -> str | None:
        f = self._field(key)
        return None if f is None else str(f.contents())

    def _int(self, key, default=None):
        f = self._field(key)
        return default if f is None else int(f.contents())

    def _float(self, key, default=None):
        f = self._field(key)
        return default if f is None else float(f.contents())

    # ---- config ---------------------------------------------------------------------------------
    def _build_config(self, arch: str, rope_freqs) -> ModelConfig:
        path = self.path

        def req(key):
            v = self._int(f"{arch}.{key}")
            if v is None:
                raise _fail(path, f"missing metadata key {arch}.{key}; the file is incomplete, re-convert it")
            return v

        n_experts = self._int(f"{arch}.expert_count", 0) if arch == "qwen3moe" else 0
        moe_hidden = n_active = 0
        norm_topk = True
        if arch == "qwen3moe":
            if n_experts <= 0:
                raise _fail(path, f"missing or zero {arch}.expert_count; the file is incomplete, re-convert it")
            n_active = req("expert_used_count")
            moe_hidden = self._int(f"{arch}.expert_feed_forward_length")
            if moe_hidden is None:
                exps = self._tensors.get("layers.0.ffn_gate_exps.weight")
                if exps is None:
                    raise _fail(path, f"missing metadata key {arch}.expert_feed_forward_length")
                moe_hidden = int(exps.shape[1])
            if not 0 < n_active <= n_experts:
                raise _fail(path, f"expert_used_count {n_active} is not in 1..expert_count {n_experts}")
            if self._int(f"{arch}.expert_shared_count", 0):
                raise _fail(path, "shared experts are not supported")
            gating = self._int(f"{arch}.expert_gating_func")
            if gating not in (None, 1):  # 1 = softmax (LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX)
                raise _fail(path, f"expert_gating_func {gating} is not supported (only softmax)")
            # llama.cpp's qwen3moe graph always renormalizes the top-k weights; the key is optional
            norm_topk = bool(self._int(f"{arch}.expert_weights_norm", 1))

        dim = req("embedding_length")
        n_heads = req("attention.head_count")
        n_kv_heads = self._int(f"{arch}.attention.head_count_kv", n_heads)
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise _fail(path, f"bad head counts n_heads={n_heads} n_kv_heads={n_kv_heads}")
        head_dim = self._int(f"{arch}.attention.key_length")
        if head_dim is None:
            if dim % n_heads:
                raise _fail(path, f"embedding_length {dim} is not a multiple of head_count {n_heads}")
            head_dim = dim // n_heads
        v_len = self._int(f"{arch}.attention.value_length", head_dim)
        if v_len != head_dim:
            raise _fail(path, f"value_length {v_len} != key_length {head_dim} is not supported")
        rope_dims = self._int(f"{arch}.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise _fail(path, f"partial rotary embeddings (rope.dimension_count {rope_dims} != head_dim "
                              f"{head_dim}) are not supported")
        vocab = self._int(f"{arch}.vocab_size")
        if vocab is None:
            tokens = self._field("tokenizer.ggml.tokens")
            if tokens is None:
                raise _fail(path, f"neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
            vocab = len(tokens.data)
        eps = self._float(f"{arch}.attention.layer_norm_rms_epsilon")
        if eps is None:
            raise _fail(path, f"missing metadata key {arch}.attention.layer_norm_rms_epsilon")

        divisors = None
        if rope_freqs is not None:
            from gguf import GGMLQuantizationType as T
            if rope_freqs.tensor_type != T.F32 or int(rope_freqs.n_elements) != head_dim // 2:
                raise _fail(path, f"rope_freqs.weight must be F32 with {head_dim // 2} values, got "
                                  f"{rope_freqs.tensor_type.name} with {int(rope_freqs.n_elements)}")
            divisors = [float(x) for x in np.asarray(rope_freqs.data, dtype=np.float32).reshape(-1)]
        scaling = self._str(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            factor = self._float(f"{arch}.rope.scaling.factor", 1.0)
            if scaling == "linear":
                if factor != 1.0:
                    divisors = [d * factor for d in (divisors or [1.0] * (head_dim // 2))]
            else:
                raise _fail(path, f"rope scaling type {scaling!r} is not supported (only linear and "
                                  "llama3-style rope_freqs)")

        attn_bias = arch == "qwen2" or any(k.endswith((".bq", ".bk", ".bv")) for k in self._tensors)
        if n_experts:
            hidden = self._int(f"{arch}.feed_forward_length", moe_hidden)
        else:
            hidden = req("feed_forward_length")
        return ModelConfig(
            arch=arch, dim=dim, hidden_dim=hidden, n_layers=req("block_count"),
            n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab,
            context_length=req("context_length"), norm_eps=eps,
            rope_theta=self._float(f"{arch}.rope.freq_base", 10000.0),
            rope_interleaved=arch == "llama", rope_freq_divisors=divisors,
            tied_embeddings="output" not in self._tensors,
            attn_bias=attn_bias, qk_norm=arch in ("qwen3", "qwen3moe"),
            n_experts=n_experts, n_active_experts=n_active, moe_hidden_dim=moe_hidden,
            norm_topk_prob=norm_topk,
        )

    def _check_tensors(self):
        c = self.config
        found = {}
        for canon, t in self._tensors.items():
            if canon.startswith("layers.") and int(canon.split(".")[1]) >= c.n_layers:
                raise _fail(self.path, f"tensor {t.name} is beyond block_count {c.n_layers}")
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            short = canon.split(".", 2)[-1]
            if short in _EXPERT_NAMES:  # 3-D expert stack: [n_expert, rows, cols]
                want = (c.n_experts,) + self.expected_shape(f"layers.0.experts.0.{_EXPERT_NAMES[short]}")
                if shape != want:
                    raise _fail(self.path, f"tensor {t.name} has shape {list(shape)}, expected {list(want)} "
                                           "from the metadata; the file is inconsistent")
                found[f"{canon}:stack"] = (t.name, int(t.tensor_type), shape)  # type check only
                continue
            found[canon] = (t.name, int(t.tensor_type), shape)
        for canon, (t, e) in self._experts.items():
            found[canon] = (t.name, int(t.tensor_type), tuple(int(x) for x in reversed(t.shape.tolist()))[1:])
        check_tensors(self.path, c, found, file_name=_gguf_name)

    # ---- interface ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n in self._tensors if n.split(".", 2)[-1] not in _EXPERT_NAMES] + list(self._experts)

    def tensor(self, name: str) -> TensorRef:
        expert = self._experts.get(name)
        t = expert[0] if expert else self._tensors.get(name)
        if t is None or name.split(".", 2)[-1] in _EXPERT_NAMES:
            raise _fail(self.path, f"no tensor {name!r} in this model"
                        + (" (embeddings are tied: use tok_embd)" if name == "output" else ""))
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        start = int(t.data_offset)
        nbytes = int(t.n_bytes)
        raw = self._reader.data[start:start + nbytes]
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8)
        if len(shape) > 1:
            raw = raw.reshape(shape[:-1] + (nbytes // int(np.prod(shape[:-1])),))
        if expert:
            raw, shape = raw[expert[1]], shape[1:]  # expert e's rows: a contiguous zero-copy view
        return TensorRef(name=name, ggml_type=int(t.tensor_type), shape=shape, raw=raw)

    def metadata(self, key: str):
        """The raw value of a GGUF metadata key (None if absent)."""
        f = self._field(key)
        return None if f is None else f.contents()


# ---- tokenizer ----------------------------------------------------------------------------------
def build_tokenizer_spec(meta: dict, path) -> TokenizerSpec:
    """A TokenizerSpec from GGUF tokenizer.* metadata (`meta`: key -> gguf ReaderField)."""
    def get(key, default=None):
        f = meta.get(key)
        return default if f is None else f.contents()

    model = get("tokenizer.ggml.model")
    if model is None:
        raise _fail(path, "no tokenizer in the file (tokenizer.ggml.model missing)")
    tokens: list[str] = get("tokenizer.ggml.tokens")
    if tokens is None:
        raise _fail(path, "tokenizer.ggml.tokens is missing")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise _fail(path, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    if model == "gpt2":
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in SUPPORTED_PRE:
            raise _fail(path, f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})")
        merges: list[str] = get("tokenizer.ggml.merges") or []
        tok = _byte_level_bpe(tokens, merges, types, pre, path)
        default_add_bos = False
    elif model == "llama":
        scores = get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise _fail(path, "SentencePiece tokenizer without tokenizer.ggml.scores for every token; "
                              "the tokenizer is corrupt")
        tok = _sentencepiece_bpe(tokens, scores, types, bool(get("tokenizer.ggml.add_space_prefix", True)), path)
        default_add_bos = True  # llama.cpp's (and transformers') default for SentencePiece vocabularies
    else:
        raise _fail(path, f"tokenizer type {model!r} is not supported (supported: gpt2 byte-level BPE, "
                          "llama SentencePiece)")

    bos = get("tokenizer.ggml.bos_token_id")
    eos = get("tokenizer.ggml.eos_token_id")
    special = {i for i, t in enumerate(types) if t in (_TT_CONTROL, _TT_USER_DEFINED)}
    eos_ids: list[int] = []
    for i in (eos, get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id")):
        if i is not None and 0 <= int(i) < len(tokens) and int(i) not in eos_ids:
            eos_ids.append(int(i))
    index = {tokens[i]: i for i in special}
    for t in END_TOKENS:
        i = index.get(t)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    add_bos = get("tokenizer.ggml.add_bos_token")
    return TokenizerSpec(
        tokenizer_json=tok.to_str(), chat_template=get("tokenizer.chat_template"),
        bos_id=None if bos is None else int(bos), eos_ids=eos_ids,
        add_bos=bool(add_bos) if add_bos is not None else default_add_bos,
    )


def _byte_level_bpe(tokens, merges, types, pre, path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise _fail(path, "tokenizer.ggml.tokens has duplicate tokens; the tokenizer is corrupt")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise _fail(path, f"bad BPE merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                     ignore_merges=pre in _IGNORE_MERGES)
    tok = Tokenizer(bpe)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # gpt2 / default
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return _add_special_tokens(tok, tokens, types, path)


def _sentencepiece_bpe(tokens, scores, types, add_space_prefix, path):
    """A SentencePiece BPE vocabulary as transformers' GGUF loader rebuilds it (LlamaTokenizer):
    BPE with byte fallback, merges recovered from the token scores, Metaspace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise _fail(path, "tokenizer.ggml.tokens has duplicate tokens; the tokenizer is corrupt")
    score = {t: float(s) for t, s in zip(tokens, scores)}
    # transformers.tokenization_utils_base.generate_merges with vocab_scores: every split of a
    # token into two vocabulary pieces is a merge ranked by the merged token's score.
    merges = []
    for merged, sc in score.items():
        local = [(merged[:k], merged[k:], sc) for k in range(1, len(merged))
                 if merged[:k] in vocab and merged[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    seq = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        seq.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(seq)
    return _add_special_tokens(tok, tokens, types, path)


def _add_special_tokens(tok, tokens, types, path):
    from tokenizers import AddedToken

    # CONTROL tokens become special added tokens and USER_DEFINED ones plain added tokens, so text
    # that spells them ("<|im_start|>") encodes to their single id, as llama.cpp does.
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _TT_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _TT_USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise _fail(path, "added tokens do not map onto the vocabulary; the tokenizer is corrupt")
    return tok
