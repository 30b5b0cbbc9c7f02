"""`dllama-mpi plan`: what each rank of an N-node job holds, sends and (roughly) how fast it runs.

Pure functions over a ModelConfig and the kind each matrix is stored as: no MPI, and no weights
are read (a model file or slice set is opened for its header only). The byte counts follow the
slice file (`slicefile.py`) and the byte accounting of `collectives.py` exactly; the RAM total
adds an estimate of buffers and of the Python runtime; the speed is a model, labelled as such:

    token time = max over ranks (weight bytes / weight streaming speed)
               + max over ranks (sync bytes / link rate) + collectives x hops x latency

Weights are memory-mapped, not loaded: they count towards RAM because a rank reads all of them
for every token, so they must stay in the page cache to run at memory speed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re


from .config import SHAPES, ModelConfig
from .partition import RankSlice, plan as partition_plan
from .quant import T as TILE  # output rows per kernel tile: a matrix part's rows are padded to a multiple
from .quant import kv_positions

# Bytes per weight as the slice file stores each kind (kernel layout, float32 scales):
# q40 = 16 B of nibbles + a 4 B scale per 32 values, q41 adds a 4 B minimum, q80 = 32 int8 + 4 B.
KIND_BYTES = {"q40": 20 / 32, "q41": 24 / 32, "q80": 36 / 32, "f32": 4.0}
# The embedding table keeps its source GGML blocks (rank 0 only): Q4_0 18 B, Q4_1 20 B, Q8_0 34 B per 32.
EMBED_BYTES = {"q40": 18 / 32, "q41": 20 / 32, "q80": 34 / 32, "f32": 4.0}
PREFILL_CHUNK = 128       # tokens per prefill batch (generate.prefill): 5-10% faster than 64 on
                          # the Llama 3.2 1B shape (measured; 256 was no faster), half the syncs
RUNTIME_BYTES = 150 << 20  # Python, numpy, h5py, mpi4py, MPI and the tokenizer: measured ~130-200 MiB
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
LINK_LATENCY_US = {"100mbit": 100.0, "1gbit": 50.0, "2.5gbit": 40.0, "10gbit": 20.0}  # per message, MPI over TCP


class PlanError(ValueError):
    """Bad plan input; str() is the line to print."""


@dataclasses.dataclass
class Storage:
    """How a model's matrices are stored: kind per matrix name (canonical, e.g. layers.3.wq, output)
    and the embedding's bytes per value."""
    kinds: dict[str, str]
    embed_bytes_per_value: float
    description: str

    def kind(self, name: str) -> str:
        k = self.kinds
        return k.get(name) or k.get(name.rsplit(".", 1)[-1]) or k.get("default") or "q40"


@dataclasses.dataclass
class RankPlan:
    rank: int
    slice: RankSlice
    weight_bytes: int        # matrices, norms, biases in this rank's file (memory-mapped)
    embedding_bytes: int     # the token embedding table: rank 0 only
    kv_bytes: int            # K and V of this rank's KV heads at --max-seq-len
    buffer_bytes: int        # activations, sync buffers, RoPE tables, logits (estimate)
    runtime_bytes: int       # interpreter and libraries (estimate)
    streamed_bytes: int      # weight bytes read per decoded token (MoE: active experts only)
    sent_per_token: int      # decode, as collectives.py counts it
    recv_per_token: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.embedding_bytes + self.kv_bytes + self.buffer_bytes + self.runtime_bytes


@dataclasses.dataclass
class JobPlan:
    name: str
    config: ModelConfig
    storage: Storage
    nodes: int
    max_seq_len: int
    wire: str
    ranks: list[RankPlan]
    collectives_per_token: int

    def fits(self, ram: int) -> list[bool]:
        return [r.total_bytes <= ram for r in self.ranks]


# -- what the matrices are stored as ---------------------------------------------------------

def storage_for_type(weights: str = "q40", head: str = "auto") -> Storage:
    """A named shape sliced with --weights-float-type weights (auto counts as q40: the usual Q4_0
    file). The head follows the slicer's rule: a 4-bit request keeps the LM head at q80."""
    from .slicefile import KINDS
    w = "q40" if weights == "auto" else weights
    if w not in KINDS:
        raise PlanError(f"unknown weight type {weights!r}: use {', '.join(KINDS)}")
    h = head if head != "auto" else ("q80" if w in ("q40", "q41") else w)
    kinds = {m: w for m in LAYER_MATRICES}
    kinds["output"] = h
    return Storage(kinds, EMBED_BYTES[w], f"weights {w}, LM head {h}, embedding as {w} blocks")


def storage_of_model(source, weights: str = "auto", head: str = "auto") -> Storage:
    """The kinds `dllama-mpi slice --weights-float-type weights` would write for this model file."""
    import gguf
    from .slicefile import choose_kind, head_kind
    cfg = source.config
    names = source.names()
    kinds = {}
    for l in range(cfg.n_layers):
        for m in _layer_matrix_names(cfg, l):
            try:
                kinds[m] = choose_kind(source.tensor(m).ggml_type, weights)
            except KeyError:  # a reader naming this tensor differently: counted as the default kind
                pass
    t = source.tensor("output" if "output" in names else "tok_embd")
    kinds["output"] = head_kind(t.ggml_type, weights, head)
    e = source.tensor("tok_embd")
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(e.ggml_type)]
    kinds["default"] = "q40" if weights == "auto" else weights
    used = sorted(set(kinds.values()))
    return Storage(kinds, nbytes / block, f"as sliced with --weights-float-type {weights}: "
                                          f"{', '.join(used)} (LM head {kinds['output']})")


def storage_of_slice_set(sf) -> Storage:
    """The kinds an existing slice set holds (read from rank 0's file)."""
    kinds = {}
    for path, attrs in sf.attrs.items():
        if "kind" in attrs:
            m = re.fullmatch(r"layers/(\d+)/(.+)", path)
            kinds[f"layers.{int(m.group(1))}.{m.group(2).replace('/', '.')}" if m else path] = str(attrs["kind"])
    if kinds:
        kinds["default"] = max(set(kinds.values()), key=list(kinds.values()).count)
    raw = sf.arrays.get("tok_embd/raw")
    cfg = sf.config
    per_value = raw.nbytes / (cfg.vocab_size * cfg.dim) if raw is not None else 4.0
    return Storage(kinds, per_value, f"slice set {sf.path.parent}: {', '.join(sf.weight_types)} "
                                     f"(LM head {kinds.get('output', '?')})")


def _layer_matrix_names(cfg: ModelConfig, l: int) -> list[str]:
    p = f"layers.{l}."
    attn = [p + m for m in ("wq", "wk", "wv", "wo")]
    if cfg.n_experts:
        return attn + [f"{p}experts.{e}.{m}" for e in range(cfg.n_experts) for m in ("w1", "w2", "w3")]
    return attn + [p + m for m in ("w1", "w2", "w3")]


# -- the plan ---------------------------------------------------------------------------------

def matrix_bytes(kind: str, rows: int, cols: int) -> int:
    """Bytes of one rank's [rows x cols] part in the slice file (rows padded to whole tiles)."""
    if rows == 0 or cols == 0:
        return 0
    return int(math.ceil(rows / TILE) * TILE * cols * KIND_BYTES[kind])


def _rank_matrices(cfg: ModelConfig, s: RankSlice) -> dict[str, tuple[int, int]]:
    """(rows, cols) of each matrix part a rank holds, by matrix base name."""
    hd, dim = cfg.head_dim, cfg.dim
    f = s.ffn[1] - s.ffn[0]
    return {"wq": (s.n_heads * hd, dim), "wk": (s.n_kv_heads * hd, dim), "wv": (s.n_kv_heads * hd, dim),
            "wo": (dim, s.n_heads * hd), "w1": (f, dim), "w3": (f, dim), "w2": (dim, f)}


def plan_job(cfg: ModelConfig, storage: Storage, nodes: int, max_seq_len: int | None = None,
             wire: str = "q80", name: str = "model") -> JobPlan:
    if nodes < 1:
        raise PlanError(f"--nodes must be at least 1, got {nodes}")
    seq = max_seq_len or min(cfg.context_length, 4096)
    slices = partition_plan(cfg, nodes)
    hd, dim, L = cfg.head_dim, cfg.dim, cfg.n_layers
    vocab_parts = [s.vocab[1] - s.vocab[0] for s in slices]
    ranks = []
    for s in slices:
        parts = _rank_matrices(cfg, s)
        weights = streamed = 0
        for l in range(L):
            for full in _layer_matrix_names(cfg, l):
                base = full.rsplit(".", 1)[-1]
                b = matrix_bytes(storage.kind(full), *parts[base])
                weights += b
                expert = ".experts." in full
                streamed += b * (cfg.n_active_experts / cfg.n_experts if expert else 1)
        head = matrix_bytes(storage.kind("output"), vocab_parts[s.rank], dim)
        vectors = (2 * L + 1) * dim  # norms, replicated
        if cfg.qk_norm:
            vectors += 2 * L * hd
        if cfg.attn_bias:
            vectors += L * (s.n_heads + 2 * s.n_kv_heads) * hd
        if cfg.n_experts:
            vectors += L * cfg.n_experts * dim  # the router, replicated
        weights += head + 4 * vectors
        streamed += head + 4 * vectors
        embedding = int(cfg.vocab_size * dim * storage.embed_bytes_per_value) if s.rank == 0 else 0
        kv = 2 * L * s.n_kv_heads * kv_positions(seq) * hd * 4
        sent, recv = sync_bytes_per_token(cfg, nodes, s.rank, vocab_parts, wire)
        ranks.append(RankPlan(s.rank, s, weights, embedding, kv, buffer_bytes(cfg, s, nodes, seq, s.rank == 0),
                              RUNTIME_BYTES, int(streamed), sent, recv))
    ring = wire == "q80" and nodes >= 3  # `--sync auto`: reduce-scatter + all-gather, two collectives a sync
    per_token = 3 + 2 * L * (2 if ring else 1) + 1 if nodes > 1 else 0  # header, entries, x; syncs; logits
    return JobPlan(name, cfg, storage, nodes, seq, wire, ranks, per_token)


def buffer_bytes(cfg: ModelConfig, s: RankSlice, nodes: int, seq: int, root: bool) -> int:
    """Working memory of a forward over one prefill chunk (an estimate: numpy temporaries vary)."""
    b, hd = PREFILL_CHUNK, cfg.head_dim
    f = s.ffn[1] - s.ffn[0]
    acts = b * (4 * cfg.dim + (2 * s.n_heads + 2 * s.n_kv_heads) * hd + 2 * f)  # x, h, partials, q, att, k, v, gate, up
    q80 = (nodes + 1) * b * cfg.dim // 32 * 36  # the all-gather's send and receive buffers
    rope = 2 * seq * hd // 2
    logits = b * (s.vocab[1] - s.vocab[0]) + (b * cfg.vocab_size if root else 0)
    return 4 * (acts + rope + logits) + q80


def sync_bytes_per_token(cfg: ModelConfig, nodes: int, rank: int, vocab_parts: list[int],
                         wire: str = "q80", sync: str = "auto", topk: int = 0) -> tuple[int, int]:
    """(sent, received) bytes of one decoded token on `rank`, counted as collectives.py does:
    the command header and the batch entries (16 B each), the embedded x (f32, or f16 with the
    q80 wire), two per-layer syncs, and the logits (the rank's vocabulary slice as f32, or its
    topk best as value + id pairs)."""
    if nodes == 1:
        return 0, 0
    n = nodes - 1
    q80 = lambda values: values // 32 * 36  # noqa: E731  (Q80 records: f32 scale + 32 int8)
    x = cfg.dim * (2 if wire == "q80" else 4)
    bcast = 16 + 16 + x
    if wire == "f32":
        s_layer = r_layer = 2 * cfg.dim * 4 * n // nodes  # MPI_Allreduce as reduce-scatter + all-gather
    elif sync == "ring" or (sync == "auto" and nodes >= 3):
        from .partition import split_even
        chunks = [b - a for a, b in split_even(cfg.dim // 32, nodes)]
        mine, total = chunks[rank] * 36, cfg.dim // 32 * 36
        s_layer = (total - mine) + mine * n      # alltoall of the other ranks' chunks, all-gather of my sum
        r_layer = mine * n + (total - mine)
    else:
        s_layer = r_layer = q80(cfg.dim) * n     # this rank's Q80 partial to each other rank
    sent, recv = 2 * cfg.n_layers * s_layer, 2 * cfg.n_layers * r_layer
    logits = (lambda r: topk * 8) if topk else (lambda r: 4 * vocab_parts[r])  # noqa: E731
    if rank == 0:
        sent += bcast * n
        recv += sum(logits(r) for r in range(1, nodes))
    else:
        recv += bcast
        sent += logits(rank)
    return sent, recv


# -- speed estimate ---------------------------------------------------------------------------

def parse_link(text: str) -> float:
    """'1gbit', '2.5Gbit', '100mbit', '10gbit/s' -> bits per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg])bit(?:/s|ps)?\s*", text.lower())
    if not m:
        raise PlanError(f"--link {text!r}: give a rate like 100mbit, 1gbit, 2.5gbit, 10gbit")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def parse_size(text: str) -> int:
    """'8GB', '16G', '8GiB', '512MB' -> bytes. RAM sizes are binary: 8GB = 8 GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt])?(?:i?b)?\s*", text.lower())
    if not m:
        raise PlanError(f"{text!r} is not a size: give e.g. 8GB, 16GB, 512MB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


@dataclasses.dataclass
class Estimate:
    compute_s: list[float]   # per rank
    link_s: list[float]      # per rank: bytes over the link
    latency_s: float         # per token, the same on every rank
    bandwidth: float         # bytes/s
    link_bits: float
    latency_us: float

    @property
    def token_seconds(self) -> float:
        return max(self.compute_s) + max(self.link_s) + self.latency_s

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.token_seconds


def estimate(job: JobPlan, bandwidth: float, link_bits: float, latency_us: float) -> Estimate:
    compute = [r.streamed_bytes / bandwidth for r in job.ranks]
    link = [max(r.sent_per_token, r.recv_per_token) * 8 / link_bits for r in job.ranks]
    hops = math.ceil(math.log2(job.nodes)) if job.nodes > 1 else 0  # tree / recursive-doubling steps
    return Estimate(compute, link, job.collectives_per_token * hops * latency_us * 1e-6, bandwidth, link_bits,
                    latency_us)


# -- inputs and reports -----------------------------------------------------------------------

def open_target(model: str | None, shape: str | None, weights: str = "auto", head: str = "auto",
                tokenizer=None):
    """(name, ModelConfig, Storage) from a model file or folder, a slice-set folder or a named shape."""
    if (model is None) == (shape is None):
        raise PlanError("give a MODEL file or slice-set folder, or --shape NAME (one of them)")
    if shape is not None:
        if shape not in SHAPES:
            raise PlanError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
        return shape, SHAPES[shape], storage_for_type(weights, head)
    path = pathlib.Path(model)
    firsts = sorted(path.glob("rank-0-of-*.h5")) if path.is_dir() else []
    if firsts:
        from .slicefile import SliceError, SliceFile
        try:
            sf = SliceFile(firsts[0])
        except SliceError as e:
            raise PlanError(str(e)) from None
        return f"{path.name} ({sf.source_name})", sf.config, storage_of_slice_set(sf)
    if not path.exists():
        raise PlanError(f"{path}: no such model file or folder")
    from .readers import ModelError, open_model
    try:
        source = open_model(path, tokenizer=tokenizer)
    except ModelError as e:
        raise PlanError(str(e)) from None
    return path.name, source.config, storage_of_model(source, weights, head)


def ram_per_rank(cfg: ModelConfig, storage: Storage, nodes=(1, 2, 4, 8), max_seq_len: int | None = None) -> dict:
    """{N: [RAM bytes of each rank]} for N-node jobs: what `info` shows next to a model."""
    out = {}
    for n in nodes:
        out[n] = [r.total_bytes for r in plan_job(cfg, storage, n, max_seq_len).ranks]
    return out


def _size(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**10:.1f} KiB"


def _range(r: tuple[int, int]) -> str:
    return f"{r[0]}-{r[1] - 1}" if r[1] > r[0] else "-"


def report(job: JobPlan, est: Estimate | None, ram: int | None, link_name: str) -> str:
    c = job.config
    lines = [f"plan: {job.name} on {job.nodes} node(s), one rank each; max-seq-len {job.max_seq_len}, "
             f"sync {job.wire}",
             f"model: {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / {c.n_kv_heads} KV heads, "
             f"FFN {c.ffn_dim}{f' x {c.n_experts} experts' if c.n_experts else ''}, vocab {c.vocab_size}; "
             f"{job.storage.description}",
             "",
             "rank  heads   kv   ffn rows      vocab rows       weights  embedding   KV cache  buffers+runtime"
             "       total" + (f"  fits {_size(ram)}" if ram else "")]
    fits = job.fits(ram) if ram else None
    for i, r in enumerate(job.ranks):
        s = r.slice
        line = (f"{r.rank:4d}  {_range(s.heads):>6s} {_range(s.kv_heads):>4s} {_range(s.ffn):>12s} "
                f"{_range(s.vocab):>15s} {_size(r.weight_bytes):>13s} {_size(r.embedding_bytes):>10s} "
                f"{_size(r.kv_bytes):>10s} {_size(r.buffer_bytes + r.runtime_bytes):>16s} "
                f"{_size(r.total_bytes):>11s}")
        if fits:
            line += "  " + ("yes" if fits[i] else f"NO (short by {_size(r.total_bytes - ram)})")
        lines.append(line)
    total_w = sum(r.weight_bytes + r.embedding_bytes for r in job.ranks)
    lines.append(f"all ranks: {_size(total_w)} of weights (embedding included), "
                 f"{_size(sum(r.kv_bytes for r in job.ranks))} of KV cache")
    if fits is not None:
        lines.append("fits: " + ("yes, on every node" if all(fits) else
                                 f"NO: rank(s) {[i for i, f in enumerate(fits) if not f]} need more than "
                                 f"{_size(ram)}: use more nodes, a smaller --max-seq-len or --kv-cache-storage disk"))
    lines.append("")
    lines.append(f"sync per decoded token (as the stats block counts it): {job.collectives_per_token} collectives")
    for r in job.ranks:
        lines.append(f"  rank {r.rank}: sends {r.sent_per_token:,} B, receives {r.recv_per_token:,} B")
    if est is not None:
        lines.append("")
        lines.append(f"ESTIMATE (a model, not a measurement): {est.tokens_per_second:.2f} tok/s decode "
                     f"({1e3 * est.token_seconds:.1f} ms/token)")
        lines.append(f"  compute {1e3 * max(est.compute_s):.1f} ms = slowest rank's weights / "
                     f"{est.bandwidth / 1e9:.1f} GB/s weight streaming per rank")
        lines.append(f"  link {1e3 * max(est.link_s):.2f} ms = sync bytes / {link_name} "
                     f"+ latency {1e3 * est.latency_s:.2f} ms = {job.collectives_per_token} collectives x "
                     f"{math.ceil(math.log2(job.nodes)) if job.nodes > 1 else 0} hop(s) x {est.latency_us:g} µs")
    return "\n".join(lines)


def to_json(job: JobPlan, est: Estimate | None, ram: int | None) -> str:
    d = {"name": job.name, "nodes": job.nodes, "max_seq_len": job.max_seq_len, "wire": job.wire,
         "collectives_per_token": job.collectives_per_token, "storage": job.storage.description,
         "ranks": [dict(rank=r.rank, heads=r.slice.heads, kv_heads=r.slice.kv_heads, ffn=r.slice.ffn,
                        vocab=r.slice.vocab, weight_bytes=r.weight_bytes, embedding_bytes=r.embedding_bytes,
                        kv_bytes=r.kv_bytes, buffer_bytes=r.buffer_bytes, runtime_bytes=r.runtime_bytes,
                        total_bytes=r.total_bytes, sent_per_token=r.sent_per_token,
                        recv_per_token=r.recv_per_token) for r in job.ranks]}
    if ram:
        d["ram_per_node"] = ram
        d["fits"] = job.fits(ram)
    if est is not None:
        d["estimate"] = {"tokens_per_second": est.tokens_per_second, "compute_seconds": est.compute_s,
                         "link_seconds": est.link_s, "latency_seconds": est.latency_s,
                         "bandwidth_bytes_per_second": est.bandwidth, "link_bits_per_second": est.link_bits}
    return json.dumps(d, indent=1)
