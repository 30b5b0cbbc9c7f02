"""Per-rank HDF5 slice files: written by `dllama-mpi slice`, memory-mapped by every rank.

One self-describing file per rank, `rank-R-of-N.h5`. Root attributes carry the format version,
model config, plan, source digest and weight types; the tokenizer is a dataset in every file.
Matrices are groups holding contiguous, uncompressed datasets in the layout the kernels read
(see quant.py), so loading is an np.memmap per dataset: no copy, no dequantization.

    /tokenizer                 uint8  TokenizerSpec JSON
    /tok_embd/raw              uint8  [vocab, row_bytes] source blocks (rank 0 only: the root embeds)
    /layers/07/attn_norm       f32    [dim] (norms are replicated)
    /layers/07/wq/{wq,wd,...}  a matrix: attrs kind (q40|q41|q80|f32), rows, cols
    /out_norm, /output/...
"""
from __future__ import annotations

import json
import os
import pathlib
import re

import gguf
import h5py
import numpy as np

from . import __version__, quant
from .config import ModelConfig
from .partition import RankSlice, plan, plan_from_json, plan_to_json

FORMAT = "dllama-mpi-slice"
VERSION = 3  # 2: q40/q41 values as 16-bit words (kernels/matmul.py); 3: tiles of 128 rows
KINDS = ("q40", "q41", "q80", "f32")
_T = gguf.GGMLQuantizationType
# Block types the kernels multiply directly; anything else is requantized.
KEEP = {_T.Q4_0: "q40", _T.Q4_1: "q41", _T.Q8_0: "q80", _T.F32: "f32", _T.F16: "f32", _T.BF16: "f32"}
SOURCE_TYPE = {"q40": _T.Q4_0, "q41": _T.Q4_1, "q80": _T.Q8_0}
ARRAYS = {"q40": ("wq", "wd"), "q41": ("wq", "wd", "wm"), "q80": ("wq", "wd"), "f32": ("w",)}


class SliceError(Exception):
    """A slice set that cannot be used; the message says what to do."""


def slice_name(rank: int, n: int) -> str:
    return f"rank-{rank}-of-{n}.h5"


# -- writing --------------------------------------------------------------------------------

def choose_kind(ggml_type: int, requested: str) -> str:
    if requested == "auto":
        return KEEP.get(ggml_type, "q40")
    return requested


def head_kind(ggml_type: int, weights: str, head: str) -> str:
    """The LM head's kind. By default it follows --weights-float-type, except that a 4-bit
    request keeps the head at 8 bits (as llama.cpp's quantizer keeps output.weight above 4
    bits): on SmolLM2-135M a q40 head alone costs ~6% perplexity."""
    if head != "auto":
        return head
    kind = choose_kind(ggml_type, weights)
    return "q80" if kind in ("q40", "q41") and weights != "auto" else kind


def _matrix_part(t, kind: str, rows: tuple[int, int], cols: tuple[int, int]) -> dict:
    """A rank's [rows x cols] part of matrix t, converted to the kernel layout of `kind`.
    Keeps the source blocks when they already are `kind` (bit-exact), else requantizes."""
    r0, r1 = rows
    c0, c1 = cols
    src = gguf.GGMLQuantizationType(t.ggml_type)
    if kind != "f32" and SOURCE_TYPE[kind] == src:
        block, nbytes = gguf.GGML_QUANT_SIZES[src]
        raw = t.raw[r0:r1, c0 // block * nbytes: c1 // block * nbytes]
        return dict(zip(ARRAYS[kind], quant.tile_blocks(np.ascontiguousarray(raw), kind)))
    w = t.float32(slice(r0, r1))[:, c0:c1]
    w = np.ascontiguousarray(w, dtype=np.float32)
    if kind == "f32":
        return {"w": quant.tile_f32(w)}
    return dict(zip(ARRAYS[kind], quant.tile_blocks(quant.requantize(w, kind), kind)))


def _matrix_parts(cfg: ModelConfig, name: str, s: RankSlice):
    """(rows, cols) of the part of canonical matrix `name` that rank slice s owns
    (biases: the rows of their matrix; expert matrices: split like the dense FFN)."""
    hd = cfg.head_dim
    base = {"bq": "wq", "bk": "wk", "bv": "wv"}.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1])
    if base == "wq":
        return (s.heads[0] * hd, s.heads[1] * hd), (0, cfg.dim)
    if base in ("wk", "wv"):
        return (s.kv_heads[0] * hd, s.kv_heads[1] * hd), (0, cfg.dim)
    if base == "wo":
        return (0, cfg.dim), (s.heads[0] * hd, s.heads[1] * hd)
    if base in ("w1", "w3"):
        return s.ffn, (0, cfg.dim)
    if base == "w2":
        return (0, cfg.dim), s.ffn
    if base == "output":
        return s.vocab, (0, cfg.dim)
    raise KeyError(name)


def _h5_path(name: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return f"layers/{int(m.group(1)):02d}/{m.group(2).replace('.', '/')}" if m else name


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(how, canonical name) of every tensor a slice set holds, in writing order:
    "replicated" vectors/small matrices go to every rank as f32, "rows" vectors are cut like
    their matrix's rows, "matrix" ones are split per the partition plan."""
    out = [("embedding", "tok_embd"), ("replicated", "out_norm")]
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        out += [("replicated", p + "attn_norm"), ("replicated", p + "ffn_norm")]
        if cfg.qk_norm:
            out += [("replicated", p + "q_norm"), ("replicated", p + "k_norm")]
        if cfg.attn_bias:
            out += [("rows", p + "bq"), ("rows", p + "bk"), ("rows", p + "bv")]
        out += [("matrix", p + w) for w in ("wq", "wk", "wv", "wo")]
        if cfg.n_experts:
            out.append(("replicated", p + "router"))
            out += [("matrix", f"{p}experts.{e}.{w}") for e in range(cfg.n_experts) for w in ("w1", "w2", "w3")]
        else:
            out += [("matrix", p + w) for w in ("w1", "w2", "w3")]
    return out + [("matrix", "output")]


CHUNK_ROWS = 4096  # rows converted at a time (a multiple of the 64-row tile): bounds the slicer's memory


def _write_matrix(f: h5py.File, path: str, t, kind: str, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """Convert and write one rank's part of matrix t in row chunks, so even a huge LM head
    never sits in memory as float32 all at once."""
    g = f.create_group(path)
    g.attrs.update(kind=kind, rows=rows[1] - rows[0], cols=cols[1] - cols[0])
    ntile = quant.ntiles(rows[1] - rows[0])
    datasets = {}
    for c0 in range(rows[0], max(rows[1], rows[0] + 1), CHUNK_ROWS):
        part = _matrix_part(t, kind, (c0, min(c0 + CHUNK_ROWS, rows[1])), cols)
        t0 = (c0 - rows[0]) // quant.T
        for key, arr in part.items():
            if key not in datasets:
                datasets[key] = g.create_dataset(key, shape=(ntile,) + arr.shape[1:], dtype=arr.dtype,
                                                 track_times=False)
            if arr.size:
                datasets[key][t0:t0 + arr.shape[0]] = arr


def write_slices(source, n: int, out_dir, weight_type: str = "auto", ranks=None, progress=None,
                 head_type: str = "auto") -> list[pathlib.Path]:
    """Stream the source model into out_dir/rank-R-of-N.h5 for R in ranks (default all).

    One tensor is read, converted and written to every rank's file before the next one is
    touched, so peak memory is about one tensor. Files are written under a temporary name and
    renamed only when complete."""
    cfg: ModelConfig = source.config
    for t in (weight_type, head_type):
        if t != "auto" and t not in KINDS:
            raise SliceError(f"unknown weight type {t!r}: use auto, {', '.join(KINDS)}")
    slices = plan(cfg, n)
    ranks = list(range(n)) if ranks is None else list(ranks)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {r: out_dir / slice_name(r, n) for r in ranks}
    tmp = {r: p.with_name(p.name + f".tmp{os.getpid()}") for r, p in final.items()}
    files = {}
    try:
        digest = source.digest()
        names = source.names()
        head_name = "output" if "output" in names else "tok_embd"
        kinds = {}
        for r in ranks:
            # every dataset of 1 KiB or more starts on a 64-byte boundary: memory-mapped, its rows
            # then sit on cache lines and its float32 scales are aligned (without this HDF5 packs
            # datasets back to back, at offsets of 6 mod 64 here)
            f = files[r] = h5py.File(tmp[r], "w", libver="latest", alignment_threshold=1024, alignment_interval=64)
            f.attrs.update(format=FORMAT, version=VERSION, config=cfg.to_json(), n_ranks=n, rank=r,
                           plan=plan_to_json(slices), source_digest=digest,
                           source_name=pathlib.Path(source.path).name, created_by=f"dllama-mpi {__version__}")
            f.create_dataset("tokenizer", data=np.frombuffer(source.tokenizer.to_json().encode(), np.uint8))
        steps = tensor_plan(cfg)
        if progress:
            progress(0, len(steps), "")
        for i, (what, name) in enumerate(steps):
            if what == "embedding":
                t = source.tensor("tok_embd")
                if 0 in files:
                    g = files[0].create_group("tok_embd")
                    g.attrs["ggml_type"] = int(t.ggml_type)
                    g.create_dataset("raw", data=np.asarray(t.raw), track_times=False)
            elif what == "replicated":
                w = source.tensor(name).float32()
                for f in files.values():
                    f.create_dataset(_h5_path(name), data=np.asarray(w, np.float32), track_times=False)
            elif what == "rows":
                w = source.tensor(name).float32()
                for r, f in files.items():
                    (r0, r1), _ = _matrix_parts(cfg, name, slices[r])
                    f.create_dataset(_h5_path(name), data=np.asarray(w[r0:r1], np.float32), track_times=False)
            else:
                t = source.tensor(head_name if name == "output" else name)
                kind = kinds[name] = (head_kind(t.ggml_type, weight_type, head_type) if name == "output"
                                      else choose_kind(t.ggml_type, weight_type))
                for r, f in files.items():
                    _write_matrix(f, _h5_path(name), t, kind, *_matrix_parts(cfg, name, slices[r]))
            if progress:
                progress(i + 1, len(steps), name)
        for r, f in files.items():
            f.attrs["weight_types"] = json.dumps(sorted(set(kinds.values())))
            f.close()
            os.replace(tmp[r], final[r])
        return [final[r] for r in ranks]
    except BaseException:
        for f in files.values():
            try:
                f.close()
            except Exception:
                pass
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise


# -- reading --------------------------------------------------------------------------------

def _memmap(path: pathlib.Path, d: h5py.Dataset) -> np.ndarray:
    if d.size == 0:
        return np.zeros(d.shape, d.dtype)
    if d.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS or d.compression:
        raise SliceError(f"{path}: dataset {d.name} is not contiguous: re-slice with this version")
    return np.memmap(path, dtype=d.dtype, mode="r", offset=d.id.get_offset(), shape=d.shape)


class SliceFile:
    """One rank's slice, memory-mapped. Nothing is read until a kernel touches it."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        try:
            f = h5py.File(self.path, "r")
        except (OSError, ValueError) as e:
            raise SliceError(f"{self.path}: not a readable slice file ({e}): re-slice it") from None
        with f:
            a = f.attrs
            if a.get("format") != FORMAT:
                raise SliceError(f"{self.path}: not a dllama-mpi slice file")
            if int(a["version"]) != VERSION:
                raise SliceError(f"{self.path}: slice format version {int(a['version'])}, this dllama-mpi "
                                 f"reads version {VERSION}: re-slice with this version")
            self.n_ranks = int(a["n_ranks"])
            self.rank = int(a["rank"])
            self.digest = str(a["source_digest"])
            self.source_name = str(a["source_name"])
            self.config = ModelConfig.from_json(a["config"])
            self.plan = plan_from_json(a["plan"])
            self.weight_types = json.loads(a["weight_types"])
            self.tokenizer_json = bytes(f["tokenizer"][()]).decode()
            self.arrays = {}
            self.attrs = {}

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and name != "tokenizer":
                    self.arrays[name] = _memmap(self.path, obj)
                elif isinstance(obj, h5py.Group):
                    self.attrs[name] = dict(obj.attrs)
            f.visititems(visit)
        for name, a in self.arrays.items():  # kernel-layout matrices: their tile size must be ours
            if "kind" in self.attrs.get(name.rsplit("/", 1)[0], {}) and a.shape[-1] != quant.T:
                raise SliceError(f"{self.path}: {name} has tiles of {a.shape[-1]} rows, this dllama-mpi uses "
                                 f"{quant.T}: re-slice with this version")

    @property
    def slice(self) -> RankSlice:
        return self.plan[self.rank]

    def vector(self, name: str) -> np.ndarray:
        """A float32 dataset that is not a kernel-layout matrix (norms, biases, router)."""
        return self.arrays[_h5_path(name)]

    def matrix(self, name: str) -> tuple[str, int, int, dict]:
        path = _h5_path(name)
        at = self.attrs[path]
        arrays = {k[len(path) + 1:]: v for k, v in self.arrays.items() if k.startswith(path + "/")}
        return str(at["kind"]), int(at["rows"]), int(at["cols"]), arrays

    def weight_bytes(self) -> int:
        """Bytes of the matrices this rank streams per token (the embedding is only looked up)."""
        return sum(a.nbytes for name, a in self.arrays.items() if "kind" in self.attrs.get(name.rsplit("/", 1)[0], {}))

    def embedding(self) -> tuple[int, np.ndarray]:
        return int(self.attrs["tok_embd"]["ggml_type"]), self.arrays["tok_embd/raw"]
