"""Model readers: one interface for every model file format.

A reader turns a model file into a `ModelSource`: a `ModelConfig`, a `TokenizerSpec` and lazily
read tensors under canonical names (see `CANONICAL_LAYER_TENSORS`). Readers never import MPI and
never load a whole model into memory: `ModelSource.tensor(name)` returns a `TensorRef` whose `raw`
bytes are a view into the memory-mapped file; `TensorRef.float32(rows)` dequantizes only the
selected rows.

    src = open_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    src.config.n_layers, src.names()[:3], src.tensor("layers.0.wq").float32(slice(0, 64))

Canonical tensor names:
    tok_embd, output (only when the LM head is not tied to tok_embd), out_norm,
    layers.{l}.attn_norm, layers.{l}.wq, .wk, .wv, .wo, layers.{l}.ffn_norm,
    layers.{l}.w1 (gate), layers.{l}.w2 (down), layers.{l}.w3 (up).
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
    "CANONICAL_LAYER_TENSORS", "SUPPORTED_GGML_TYPES",
]

CANONICAL_LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


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
    T = _ggml_types()
    return frozenset(int(t) for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0))


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
        """The shape a canonical tensor must have for this config."""
        c = self.config
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
            }[parts[2]]
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path}>"


GGUF_MAGIC = b"GGUF"


def open_model(path) -> ModelSource:
    """Open a model file, choosing the reader from the file's content."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a directory; pass a model file (.gguf)")
    if not path.is_file():
        raise ModelError(f"{path}: no such file; check the --model path")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror}); check the file permissions") from None
    if head[:4] == GGUF_MAGIC:
        from .gguf import open_gguf
        return open_gguf(path)
    raise ModelError(f"{path}: unknown model format (first bytes {head[:4]!r}); "
                     "supported: GGUF (.gguf) files")
