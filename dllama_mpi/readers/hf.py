"""Hugging Face model folder reader: config.json + safetensors weights + tokenizer.json.

Supported `architectures`: LlamaForCausalLM, MistralForCausalLM (arch "llama"), Qwen2ForCausalLM
("qwen2", q/k/v biases), Qwen3ForCausalLM ("qwen3", q/k norms) and Qwen3MoeForCausalLM ("qwen3moe").
Weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`; dtypes F32, F16
and BF16 (exposed as the ggml types of the same name, so `TensorRef.float32` works unchanged).

Each safetensors file is memory-mapped here (8-byte little-endian header length, JSON header,
data), so `TensorRef.raw` is a zero-copy view; the `safetensors` package validates the header.

Notes on what the folder means:
* HF checkpoints keep Q/K rows unpermuted: `rope_interleaved=False` (half-split "rotate_half").
* Experts: per-expert `mlp.experts.E.{gate,up,down}_proj.weight` (what transformers 5 writes
  with `save_pretrained`) or the fused in-memory format `mlp.experts.gate_up_proj` [E, 2*moe_hidden,
  dim] (gate rows first, then up) + `mlp.experts.down_proj` [E, dim, moe_hidden]; both become
  zero-copy per-expert views `layers.L.experts.E.w1/w2/w3`.
* rope scaling (`rope_scaling`, or `rope_parameters` in transformers 5): "llama3" becomes
  `rope_freq_divisors`, "linear" a constant divisor; other types are rejected.
* Mistral-style `sliding_window` (without `use_sliding_window: false`) caps `context_length`, since
  the engine attends over the whole context.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import re

import numpy as np

from ..config import ModelConfig, llama3_freq_divisors
from . import ModelError, ModelSource, TensorRef, TokenizerSpec, check_tensors, check_vocab
from .gguf import END_TOKENS

ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
}
# config.json without "architectures": by model_type
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embd", "lm_head.weight": "output",
                 "model.norm.weight": "out_norm"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3",
    "mlp.gate.weight": "router",
}
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")
_FUSED = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}

_ST_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # safetensors dtype -> ggml type name
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

WEIGHT_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def open_hf(folder) -> "HFSource":
    return HFSource(pathlib.Path(folder))


def _fail(path, msg) -> ModelError:
    return ModelError(f"{path}: {msg}")


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(path, f"is not valid JSON ({e})") from None


class _SafetensorsFile:
    """One memory-mapped .safetensors file: name -> (dtype, shape, uint8 view of the data)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, "is truncated (no safetensors header); re-download it")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise _fail(path, f"is truncated or not a safetensors file (header length {n}, file size "
                                  f"{size}); re-download it")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise _fail(path, f"has a corrupt safetensors header ({e}); re-download it") from None
        if not isinstance(header, dict):
            raise _fail(path, "has a corrupt safetensors header (not a JSON object); re-download it")
        header.pop("__metadata__", None)
        base = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (b, e) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
                b, e = int(b), int(e)
            except (KeyError, TypeError, ValueError):
                raise _fail(path, f"has a corrupt safetensors header entry for {name}; re-download it") from None
            if base + e > size:
                raise _fail(path, f"tensor {name} ends at byte {base + e} but the file has {size} bytes: "
                                  "the file is truncated; re-download it")
            item = _ST_ITEMSIZE.get(dtype)
            if e < b or (item is not None and e - b != item * int(np.prod(shape, dtype=np.int64))):
                raise _fail(path, f"tensor {name} has {e - b} bytes, which does not match its dtype {dtype} "
                                  f"and shape {list(shape)}; the file is corrupt")
            self.entries[name] = (dtype, shape, base + b, base + e)
        try:  # the safetensors package's own validation (overlaps, alignment, data extent)
            from safetensors import safe_open
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as e:
            raise _fail(path, f"is not a valid safetensors file ({e}); re-download it") from None
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def view(self, name: str) -> np.ndarray:
        """uint8 zero-copy view shaped (*shape[:-1], bytes per row) (1-D: (nbytes,))."""
        dtype, shape, b, e = self.entries[name]
        raw = self._map[b:e]
        if len(shape) > 1:
            raw = raw.reshape(shape[:-1] + ((e - b) // max(1, int(np.prod(shape[:-1]))),))
        return raw


class HFSource(ModelSource):
    format = "hf"

    def __init__(self, folder: pathlib.Path):
        self.path = folder = pathlib.Path(folder)
        self._digest = None
        cfg_path = folder / "config.json"
        cfg = _read_json(cfg_path)
        if not isinstance(cfg, dict):
            raise _fail(cfg_path, "is not a JSON object")
        self._cfg = cfg
        archs = cfg.get("architectures") or []
        arch_name = archs[0] if archs else _MODEL_TYPES.get(cfg.get("model_type"), cfg.get("model_type"))
        if arch_name not in ARCHITECTURES:
            raise _fail(cfg_path, f"unsupported architecture {arch_name!r} (supported: {', '.join(ARCHITECTURES)})")
        self._arch_name = arch_name

        # Weights: the single file or the shards of the index.
        self._files: dict[str, _SafetensorsFile] = {}
        single, index = folder / WEIGHT_FILE, folder / INDEX_FILE
        if index.is_file():
            idx = _read_json(index)
            wmap = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise _fail(index, "has no weight_map; the index is corrupt")
            located: dict[str, str] = {}
            for name, fname in wmap.items():
                located[name] = fname
            for fname in sorted(set(located.values())):
                fpath = folder / fname
                if not fpath.is_file():
                    raise _fail(fpath, f"is listed in {INDEX_FILE} but missing; the download is incomplete")
                self._files[fname] = _SafetensorsFile(fpath)
            for name, fname in located.items():
                if name not in self._files[fname].entries:
                    raise _fail(folder / fname, f"does not hold tensor {name} that {INDEX_FILE} lists; the "
                                                "download is incomplete or mixed")
        elif single.is_file():
            self._files[WEIGHT_FILE] = _SafetensorsFile(single)
            located = {name: WEIGHT_FILE for name in self._files[WEIGHT_FILE].entries}
        else:
            other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            raise _fail(folder, f"no {WEIGHT_FILE} or {INDEX_FILE}"
                                + (f" (found {', '.join(other[:3])}: only safetensors weights are supported)"
                                   if other else "") + "; download the safetensors weights")
        self._located = located

        self.config = self._build_config(cfg, cfg_path)
        self._refs: dict[str, tuple[str, str, tuple, tuple[int, ...]]] = {}
        self._map_tensors()
        found = {canon: (hf, _ggml_type(self._dtype(hf), self.path / self._located[hf], hf), shape)
                 for canon, (hf, _, _, shape) in self._refs.items()}
        check_tensors(folder, self.config, found)
        self.tokenizer = build_hf_tokenizer_spec(folder, cfg)
        check_vocab(folder, self.tokenizer, self.config)

    # ---- config ---------------------------------------------------------------------------------
    def _build_config(self, cfg: dict, path) -> ModelConfig:
        arch = ARCHITECTURES[self._arch_name]

        def req(key):
            v = cfg.get(key)
            if v is None:
                raise _fail(path, f"missing key {key!r}; the config is incomplete")
            return v

        dim, n_heads = int(req("hidden_size")), int(req("num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
            raise _fail(path, f"bad head counts num_attention_heads={n_heads} num_key_value_heads={n_kv}")
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if dim % n_heads:
                raise _fail(path, f"hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
            head_dim = dim // n_heads
        head_dim = int(head_dim)
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise _fail(path, f"hidden_act {act!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise _fail(path, "mlp_bias=true is not supported (no FFN biases)")
        if cfg.get("attention_bias") and arch != "qwen2":
            raise _fail(path, "attention_bias=true is not supported for this architecture (o_proj bias)")
        if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise _fail(path, "partial rotary embeddings (partial_rotary_factor != 1) are not supported")

        rope_params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        theta = float(theta)
        scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else None
        if scaling is None and rope_params:
            scaling = rope_params
        divisors = None
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype in ("default", None):
                pass
            elif rtype == "llama3":
                try:
                    divisors = llama3_freq_divisors(
                        head_dim, theta, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
                except KeyError as e:
                    raise _fail(path, f"llama3 rope scaling without {e.args[0]!r}") from None
            elif rtype == "linear":
                factor = float(scaling.get("factor", 1.0))
                if factor != 1.0:
                    divisors = [factor] * (head_dim // 2)
            else:
                raise _fail(path, f"rope scaling type {rtype!r} is not supported (only llama3 and linear)")

        context = int(req("max_position_embeddings"))
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", arch == "llama") and int(window) < context:
            context = int(window)  # attention beyond the window would differ from the model's

        n_experts = n_active = moe_hidden = 0
        norm_topk = True
        if arch == "qwen3moe":
            n_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
            if n_experts <= 0:
                raise _fail(path, "num_experts / num_local_experts missing or 0 for Qwen3MoeForCausalLM")
            n_active = int(req("num_experts_per_tok"))
            moe_hidden = int(req("moe_intermediate_size"))
            norm_topk = bool(cfg.get("norm_topk_prob", False))  # transformers' Qwen3MoeConfig default
            if int(cfg.get("decoder_sparse_step", 1)) != 1:
                raise _fail(path, f"decoder_sparse_step {cfg['decoder_sparse_step']} is not supported (only "
                                  "every layer MoE)")
            if cfg.get("mlp_only_layers"):
                raise _fail(path, "mlp_only_layers (dense layers in a MoE model) is not supported")
            if not 0 < n_active <= n_experts:
                raise _fail(path, f"num_experts_per_tok {n_active} is not in 1..{n_experts}")
        hidden = cfg.get("intermediate_size")
        if hidden is None and not n_experts:
            req("intermediate_size")
        tied = cfg.get("tie_word_embeddings")
        if tied is None:  # absent: tied exactly when no lm_head is stored
            tied = "lm_head.weight" not in self._located
        return ModelConfig(
            arch=arch, dim=dim, hidden_dim=int(hidden if hidden is not None else moe_hidden),
            n_layers=int(req("num_hidden_layers")), n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            vocab_size=int(req("vocab_size")), context_length=context,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_interleaved=False,
            rope_freq_divisors=divisors, tied_embeddings=bool(tied),
            attn_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "qwen3moe"),
            n_experts=n_experts, n_active_experts=n_active, moe_hidden_dim=moe_hidden, norm_topk_prob=norm_topk,
        )

    # ---- tensors --------------------------------------------------------------------------------
    def _dtype(self, hf: str) -> str:
        return self._files[self._located[hf]].entries[hf][0]

    def _shape(self, hf: str) -> tuple[int, ...]:
        return self._files[self._located[hf]].entries[hf][1]

    def _map_tensors(self):
        """canonical -> (hf name, kind, index, shape); kind "" = the whole tensor, "fused" = a row
        range of expert `index` of a 3-D expert tensor."""
        c = self.config
        refs = self._refs
        for hf in self._located:
            canon = _GLOBAL_NAMES.get(hf)
            if canon == "output" and c.tied_embeddings:
                continue
            if canon is None and (m := _LAYER_RE.match(hf)):
                layer, rest = int(m.group(1)), m.group(2)
                if layer >= c.n_layers:
                    raise _fail(self.path / self._located[hf], f"tensor {hf} is beyond num_hidden_layers "
                                                               f"{c.n_layers}")
                p = f"layers.{layer}."
                if c.n_experts and (em := _EXPERT_RE.match(rest)):
                    canon = f"{p}experts.{int(em.group(1))}.{_EXPERT_NAMES[em.group(2)]}"
                elif c.n_experts and rest in _FUSED:
                    shape = self._shape(hf)
                    m_h = c.moe_hidden_dim
                    rows = 2 * m_h if rest.endswith("gate_up_proj") else c.dim
                    cols = c.dim if rest.endswith("gate_up_proj") else m_h
                    if shape != (c.n_experts, rows, cols):
                        raise _fail(self.path / self._located[hf],
                                    f"tensor {hf} has shape {list(shape)}, expected {[c.n_experts, rows, cols]} "
                                    "from the model's config; the file is inconsistent")
                    for e in range(c.n_experts):
                        if rest.endswith("gate_up_proj"):
                            refs[f"{p}experts.{e}.w1"] = (hf, "fused", (e, 0, m_h), (m_h, cols))
                            refs[f"{p}experts.{e}.w3"] = (hf, "fused", (e, m_h, 2 * m_h), (m_h, cols))
                        else:
                            refs[f"{p}experts.{e}.w2"] = (hf, "fused", (e, 0, rows), (rows, cols))
                    continue
                else:
                    short = _LAYER_NAMES.get(rest)
                    if short in ("w1", "w2", "w3") and c.n_experts:
                        short = None
                    if short == "router" and not c.n_experts:
                        short = None
                    if short in ("bq", "bk", "bv") and not c.attn_bias:
                        short = None
                    if short in ("q_norm", "k_norm") and not c.qk_norm:
                        short = None
                    canon = p + short if short else None
            if canon is None:
                continue  # a tensor these architectures do not use (e.g. rotary_emb.inv_freq)
            refs[canon] = (hf, "", (), self._shape(hf))

    def names(self) -> list[str]:
        return list(self._refs)

    def tensor(self, name: str) -> TensorRef:
        ref = self._refs.get(name)
        if ref is None:
            raise _fail(self.path, f"no tensor {name!r} in this model"
                        + (" (embeddings are tied: use tok_embd)" if name == "output" else ""))
        hf, kind, idx, shape = ref
        f = self._files[self._located[hf]]
        raw = f.view(hf)
        if kind == "fused":
            e, r0, r1 = idx
            raw = raw[e, r0:r1]
        return TensorRef(name=name, ggml_type=_ggml_type(self._dtype(hf), f.path, hf), shape=tuple(shape), raw=raw)

    def files(self) -> list[pathlib.Path]:
        """The files this model is made of (config, weights, index, tokenizer files present)."""
        out = [self.path / "config.json"]
        if (self.path / INDEX_FILE).is_file():
            out.append(self.path / INDEX_FILE)
        out += [f.path for f in self._files.values()]
        out += [self.path / n for n in _TOKENIZER_FILES if (self.path / n).is_file()]
        return out

    def digest(self) -> str:
        """sha256 over the folder's model files (name, size and content of each, in a fixed order)."""
        if self._digest is None:
            h = hashlib.sha256()
            for p in self.files():
                h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
            self._digest = h.hexdigest()
        return self._digest


def _ggml_type(dtype: str, path, name) -> int:
    from gguf import GGMLQuantizationType as T
    t = _ST_DTYPES.get(dtype)
    if t is None:
        raise _fail(path, f"tensor {name} has dtype {dtype}, which is not supported (F32, F16, BF16); "
                          "save the model in one of those dtypes")
    return int(T[t])


# ---- tokenizer ----------------------------------------------------------------------------------
def _token_content(v):
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if x is not None]
    return [int(v)]


def build_hf_tokenizer_spec(folder: pathlib.Path, cfg: dict) -> TokenizerSpec:
    """A TokenizerSpec from tokenizer.json (used as is), tokenizer_config.json, chat_template.jinja,
    generation_config.json and config.json."""
    from tokenizers import Tokenizer

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise _fail(folder, "no tokenizer.json (only fast tokenizers are supported; save the tokenizer with "
                            "transformers' AutoTokenizer.save_pretrained)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:
        raise _fail(tj, f"cannot be loaded by the tokenizers library ({e})") from None
    tok.no_truncation()  # encode whole prompts: a saved max_length must not cut them
    tok.no_padding()
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}

    template = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        t = tcfg.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        template = t if isinstance(t, str) else None

    def token_id(key, cfg_key):
        content = _token_content(tcfg.get(key))
        if content is not None and (i := tok.token_to_id(content)) is not None:
            return i
        ids = _ids(cfg.get(cfg_key))
        return ids[0] if ids else None

    bos = token_id("bos_token", "bos_token_id")
    eos_ids: list[int] = []
    first = token_id("eos_token", "eos_token_id")
    n = tok.get_vocab_size(with_added_tokens=True)
    for i in [first] + _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id")):
        if i is not None and 0 <= i < max(n, int(cfg.get("vocab_size") or 0)) and i not in eos_ids:
            eos_ids.append(i)
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for t in END_TOKENS:
        i = specials.get(t)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)

    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:  # what the tokenizer's own post-processor does (Llama 3 adds <|begin_of_text|>)
        add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos] \
            and tok.encode("a", add_special_tokens=False).ids[:1] != [bos]
    return TokenizerSpec(tokenizer_json=tok.to_str(), chat_template=template, bos_id=bos, eos_ids=eos_ids,
                         add_bos=bool(add_bos))
