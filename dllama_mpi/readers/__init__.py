"""Model readers: one interface for every model file format.

A reader turns a model file into a `ModelSource`: a `ModelConfig`, a `TokenizerSpec` and lazily
read tensors under canonical names (see `CANONICAL_LAYER_TENSORS`). Readers never import MPI and
never load a whole model into memory: `ModelSource.tensor(name)` returns a `TensorRef` whose `raw`
bytes are a view into the memory-mapped file; `TensorRef.float32(rows)` dequantizes only the
selected rows.

    src = open_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    src.config.n_layers, src.names()[:3], src.tensor("layers.0.wq").float32(slice(0, 64))

Readers: GGUF files (readers/gguf.py), Hugging Face folders with config.json + safetensors
(readers/hf.py), distributed-llama .m model + .t tokenizer files (readers/dllama.py).

Canonical tensor names (`canonical_names(config)` lists the ones a config requires, in order):
    tok_embd, output (only when the LM head is not tied to tok_embd), out_norm,
    layers.{l}.attn_norm, layers.{l}.wq, .wk, .wv, .wo, layers.{l}.ffn_norm,
    layers.{l}.w1 (gate), layers.{l}.w2 (down), layers.{l}.w3 (up)          (dense FFN)
    layers.{l}.bq [q_dim], .bk [kv_dim], .bv [kv_dim]                       (config.attn_bias, Qwen2)
    layers.{l}.q_norm [head_dim], .k_norm [head_dim]                        (config.qk_norm, Qwen3)
    layers.{l}.router [n_experts, dim], layers.{l}.experts.{e}.w1 / .w2 / .w3 (config.n_experts > 0,
        no dense w1/w2/w3; expert matrices [moe_hidden, dim], [dim, moe_hidden], [moe_hidden, dim])
Matrices are (rows = out features, cols = in features), `y = W @ x`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from ..config import ModelConfig

__all__ = [
    "ModelError", "TokenizerSpec", "TensorRef", "ModelSource", "open_model",
    "CANONICAL_LAYER_TENSORS", "SUPPORTED_GGML_TYPES", "canonical_names", "check_tensors",
    "check_vocab", "expected_shape", "ggml_type_name", "DLLAMA_MODEL_MAGIC", "DLLAMA_TOKENIZER_MAGIC",
]

# The dense Llama layer (Qwen2 adds bq/bk/bv, Qwen3 q_norm/k_norm, MoE replaces w1/w2/w3).
CANONICAL_LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


def canonical_names(c: ModelConfig) -> list[str]:
    """Every canonical tensor name a model with config `c` must provide, in forward-pass order."""
    out = ["tok_embd"]
    for l in range(c.n_layers):
        p = f"layers.{l}."
        out += [p + n for n in ("attn_norm", "wq", "wk", "wv", "wo")]
        if c.attn_bias:
            out += [p + "bq", p + "bk", p + "bv"]
        if c.qk_norm:
            out += [p + "q_norm", p + "k_norm"]
        out.append(p + "ffn_norm")
        if c.n_experts:
            out.append(p + "router")
            out += [f"{p}experts.{e}.{w}" for e in range(c.n_experts) for w in ("w1", "w2", "w3")]
        else:
            out += [p + "w1", p + "w2", p + "w3"]
    out.append("out_norm")
    if not c.tied_embeddings:
        out.append("output")
    return out


class ModelError(Exception):
    """Bad model input. str(e) is one line: the file, the problem, and what to do about it."""


@dataclasses.dataclass
class TokenizerSpec:
    """Everything needed to rebuild the tokenizer on any host; JSON-serializable."""
    tokenizer_json: str            # a `tokenizers` library JSON (Tokenizer.to_str())
    chat_template: str | None
    bos_id: int | None
    eos_ids: list[int]             # ids that end generation; the model's own eos first, no duplicates
    add_bos: bool

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "TokenizerSpec":
        d = json.loads(s)
        return cls(tokenizer_json=d["tokenizer_json"], chat_template=d.get("chat_template"),
                   bos_id=d.get("bos_id"), eos_ids=[int(i) for i in d.get("eos_ids", [])],
                   add_bos=bool(d.get("add_bos", False)))


def _ggml_types():
    from gguf import GGMLQuantizationType as T
    return T


def _supported_types() -> frozenset[int]:
    """Every type `gguf.quants.dequantize` can turn into float32 (F32, F16 and the quant classes:
    BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, IQ*, TQ*, MXFP4 ...)."""
    from gguf import quants
    T = _ggml_types()
    return frozenset({int(T.F32), int(T.F16)} | {int(t) for t in quants._type_traits})


SUPPORTED_GGML_TYPES = _supported_types()


def ggml_type_name(t: int) -> str:
    try:
        return _ggml_types()(t).name
    except ValueError:
        return f"type {t}"


@dataclasses.dataclass
class TensorRef:
    name: str                      # canonical name
    ggml_type: int                 # gguf.GGMLQuantizationType value of the stored data
    shape: tuple[int, ...]         # numpy order: (rows=out, cols=in) for matrices, (n,) for vectors
    raw: np.ndarray                # uint8 view of the stored bytes: (rows, bytes_per_row) for 2-D, (nbytes,) for 1-D

    def float32(self, rows: slice | None = None) -> np.ndarray:
        """Dequantized float32 values (a fresh array); for matrices only the selected rows are read."""
        from gguf.quants import dequantize
        qtype = _ggml_types()(self.ggml_type)
        if len(self.shape) == 1:
            out = np.array(dequantize(self.raw, qtype), dtype=np.float32).reshape(self.shape)
            return out if rows is None else out[rows].copy()
        raw = self.raw if rows is None else self.raw[rows]
        out = dequantize(raw, qtype)
        if out.dtype != np.float32 or np.may_share_memory(out, self.raw):
            out = np.array(out, dtype=np.float32)
        return out.reshape(raw.shape[:-1] + (self.shape[-1],))


class ModelSource:
    """A model file opened for reading. Subclasses fill the attributes and implement `tensor`."""
    path: pathlib.Path
    format: str
    config: ModelConfig
    tokenizer: TokenizerSpec

    _digest: str | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def tensor(self, name: str) -> TensorRef:
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 hex of the whole file, streamed in chunks; computed once."""
        if self._digest is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            self._digest = h.hexdigest()
        return self._digest

    def expected_shape(self, name: str) -> tuple[int, ...]:
        """The shape a canonical tensor must have for this config (KeyError for unknown names)."""
        return expected_shape(self.config, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path}>"


def expected_shape(c: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape canonical tensor `name` must have for config `c` (KeyError for unknown names)."""
    if name in ("tok_embd", "output"):
        return (c.vocab_size, c.dim)
    if name == "out_norm":
        return (c.dim,)
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers":
        return {
            "attn_norm": (c.dim,), "ffn_norm": (c.dim,),
            "wq": (c.q_dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim),
            "wo": (c.dim, c.q_dim),
            "w1": (c.hidden_dim, c.dim), "w3": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim),
            "bq": (c.q_dim,), "bk": (c.kv_dim,), "bv": (c.kv_dim,),
            "q_norm": (c.head_dim,), "k_norm": (c.head_dim,),
            "router": (c.n_experts, c.dim),
        }[parts[2]]
    if len(parts) == 5 and parts[0] == "layers" and parts[2] == "experts":
        m = c.moe_hidden_dim
        return {"w1": (m, c.dim), "w3": (m, c.dim), "w2": (c.dim, m)}[parts[4]]
    raise KeyError(name)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_tensors(path, config: ModelConfig, found: dict[str, tuple[str, int, tuple[int, ...]]],
                  file_name=lambda canon: canon) -> None:
    """Raise ModelError unless `found` (canonical name -> (name in the file, ggml type, shape))
    holds every tensor `config` needs, each of a supported type and the expected shape.
    file_name maps a canonical name to the file format's own, for the message."""
    missing = list(dict.fromkeys(file_name(n) for n in canonical_names(config) if n not in found))
    if missing:
        raise ModelError(f"{path}: missing tensors {_shown(missing)}; the file is incomplete or not a "
                         f"{config.arch} model")
    for canon, (fname, qtype, shape) in found.items():
        if int(qtype) not in SUPPORTED_GGML_TYPES:
            raise ModelError(f"{path}: tensor {fname} has type {ggml_type_name(qtype)}, which is not supported "
                             "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants and the other "
                             "types gguf.quants can dequantize); re-quantize or re-convert the model")
        try:
            want = expected_shape(config, canon)
        except KeyError:
            continue
        if tuple(shape) != want:
            raise ModelError(f"{path}: tensor {fname} has shape {list(shape)}, expected {list(want)} "
                             "from the model's config; the file is inconsistent")


def check_vocab(path, spec: TokenizerSpec, config: ModelConfig) -> None:
    """A tokenizer that can produce ids the model has no embedding for is an error."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(spec.tokenizer_json)
    n = max(tok.get_vocab_size(with_added_tokens=True),
            1 + max(tok.get_vocab(with_added_tokens=True).values(), default=-1))
    if n > config.vocab_size:
        raise ModelError(f"{path}: the tokenizer has {n} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; the tokenizer does not belong to this model")


GGUF_MAGIC = b"GGUF"
DLLAMA_MODEL_MAGIC = 0x0A00ABCD
DLLAMA_TOKENIZER_MAGIC = 0x567124


def open_model(path, tokenizer=None) -> ModelSource:
    """Open a model, choosing the reader from the content: a GGUF file, a Hugging Face folder
    (config.json + model.safetensors[.index.json] + tokenizer.json), or a distributed-llama .m
    file, which needs its .t tokenizer file as `tokenizer`."""
    path = pathlib.Path(path)
    if path.is_dir() or (path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors")):
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").is_file():
            raise ModelError(f"{path}: is a directory without config.json; pass a model file (.gguf, .m) "
                             "or a Hugging Face model folder")
        if tokenizer is not None:
            raise ModelError(f"{tokenizer}: --tokenizer is only for distributed-llama .m models; a Hugging "
                             "Face folder uses its own tokenizer.json")
        from .hf import open_hf
        return open_hf(folder)
    if not path.is_file():
        raise ModelError(f"{path}: no such file; check the --model path")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror}); check the file permissions") from None
    magic = int.from_bytes(head[:4], "little") if len(head) >= 4 else None
    if head[:4] == GGUF_MAGIC:
        if tokenizer is not None:
            raise ModelError(f"{tokenizer}: --tokenizer is only for distributed-llama .m models; a GGUF file "
                             "carries its own tokenizer")
        from .gguf import open_gguf
        return open_gguf(path)
    if magic in (DLLAMA_MODEL_MAGIC, 0xABCD00, 0xABCD01):
        from .dllama import open_dllama
        return open_dllama(path, tokenizer)
    if magic in (DLLAMA_TOKENIZER_MAGIC, 0x567123):
        raise ModelError(f"{path}: is a distributed-llama tokenizer (.t) file; pass the .m model file as the "
                         "model and this file as --tokenizer")
    raise ModelError(f"{path}: unknown model format (first bytes {head[:4]!r}); "
                     "supported: GGUF (.gguf) files, Hugging Face folders (config.json + safetensors), "
                     "distributed-llama .m files (with --tokenizer FILE.t)")
