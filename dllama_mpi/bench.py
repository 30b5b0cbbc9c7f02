"""`dllama-mpi bench`: decode and prefill speed on a slice set or on random weights of a named
shape, next to the memory read bandwidth measured in the same run. Runs under mpirun like infer.

Random weights are made per rank directly in the kernels' layout (no files); their values do not
change the kernels' speed, only what the tokens are."""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

from . import partition, slicefile
from .config import ModelConfig
from .quant import T
from .readers import expected_shape

# per 32-block: (values' shape, dtype) in the kernel layout (the scales are float32)
BLOCKS = {"q40": ((8,), np.uint16), "q41": ((8,), np.uint16), "q80": ((32,), np.int8)}


def matrix_arrays(kind: str, rows: int, cols: int) -> dict:
    """name -> (shape, dtype) of the arrays of a [rows, cols] matrix in the tiled kernel layout."""
    ntile, nb = -(-rows // T), cols // 32
    if kind == "f32":
        return {"w": ((ntile, cols, T), np.float32)}
    shape, dtype = BLOCKS[kind]
    out = {"wq": ((ntile, nb) + shape + (T,), dtype), "wd": ((ntile, nb, T), np.float32)}
    if kind == "q41":
        out["wm"] = ((ntile, nb, T), np.float32)
    return out


def random_matrix(kind: str, rows: int, cols: int, rng, alloc=np.empty) -> dict:
    """Arrays of a [rows, cols] matrix in the tiled kernel layout of `kind` (see quant.py), random
    values, in arrays made by alloc(shape, dtype)."""
    a = {name: alloc(shape, dtype) for name, (shape, dtype) in matrix_arrays(kind, rows, cols).items()}
    if kind == "f32":
        a["w"][...] = rng.standard_normal(a["w"].shape, np.float32) * 0.02
        return a
    a["wq"].reshape(-1).view(np.uint8)[:] = np.frombuffer(rng.bytes(a["wq"].nbytes), np.uint8)
    a["wd"][...] = rng.uniform(0.002, 0.01, a["wd"].shape)
    if kind == "q41":
        a["wm"][...] = -8 * a["wd"]
    return a


class Arena:
    """One buffer for all of a rank's matrices, each array 64-byte aligned, in the order of the
    slice file: the layout a memory-mapped slice file gives infer. Separately allocated arrays
    end up scattered over memory, and streaming them ran SmolLM2's decode 5-7% slower (measured
    in alternating runs)."""

    ALIGN = 64

    def __init__(self, nbytes: int):
        self.buf = np.empty(nbytes + self.ALIGN, np.uint8)
        self.off = -self.buf.ctypes.data % self.ALIGN

    @classmethod
    def size(cls, shapes) -> int:
        return sum(-(-int(np.prod(s)) * np.dtype(d).itemsize // cls.ALIGN) * cls.ALIGN for s, d in shapes)

    def __call__(self, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        a = self.buf[self.off:self.off + n].view(dtype).reshape(shape)
        self.off += -(-n // self.ALIGN) * self.ALIGN
        return a


class RandomSlice:
    """What a rank's slice file holds, for a named shape with random weights, made in memory."""

    def __init__(self, cfg: ModelConfig, n: int, rank: int, kind: str, head: str, seed: int = 0):
        self.config, self.n_ranks, self.rank = cfg, n, rank
        self.plan = partition.plan(cfg, n)
        self.digest, self.tokenizer_json, self.weight_types = "random", None, sorted({kind, head})
        rng = np.random.default_rng(seed * 1000 + rank)
        self.vectors, self.matrices = {}, {}
        s = self.plan[rank]
        steps = slicefile.tensor_plan(cfg)
        arena = Arena(Arena.size(shape for how, name in steps if how == "matrix"
                                 for shape in matrix_arrays(*self._part(name, kind, head, s)).values()))
        for how, name in steps:
            if how == "replicated":
                shape = expected_shape(cfg, name)
                self.vectors[name] = (rng.standard_normal(shape, np.float32) * 0.02 if name.endswith("router")
                                      else np.ones(shape, np.float32))
            elif how == "rows":
                (r0, r1), _ = slicefile._matrix_parts(cfg, name, s)
                self.vectors[name] = np.zeros(r1 - r0, np.float32)
            elif how == "matrix":
                k, rows, cols = self._part(name, kind, head, s)
                self.matrices[name] = (k, rows, cols, random_matrix(k, rows, cols, rng, arena))
        # f32 embedding rows: only the first EMBED_ROWS are filled (bench tokens come from there),
        # the rest stays untouched zero pages
        self.embed = np.zeros((cfg.vocab_size, cfg.dim * 4), np.uint8) if rank == 0 else None
        if rank == 0:
            rows = min(EMBED_ROWS, cfg.vocab_size)
            self.embed[:rows] = (rng.standard_normal((rows, cfg.dim), np.float32)).view(np.uint8)

    def _part(self, name, kind, head, s):
        """(kind, rows, cols) of this rank's part of matrix `name`."""
        (r0, r1), (c0, c1) = slicefile._matrix_parts(self.config, name, s)
        return (head if name == "output" else kind), r1 - r0, c1 - c0

    @property
    def slice(self):
        return self.plan[self.rank]

    def vector(self, name):
        return self.vectors[name]

    def matrix(self, name):
        return self.matrices[name]

    def embedding(self):
        return 0, self.embed  # GGML type 0 = F32

    def weight_bytes(self) -> int:
        return sum(a.nbytes for _, _, _, arrays in self.matrices.values() for a in arrays.values())


EMBED_ROWS = 1024


def measure_bandwidth(kernels, comm, nbytes: int = 256 << 20, repeats: int = 5) -> list[float]:
    """Read bandwidth (bytes/s) of this rank with its threads, all ranks reading at the same
    time (they share the machine's memory); one number per repeat.

    Measured in a forked child, so the buffer (8x the L3 cache here) never counts in the rank's
    peak RSS. Every repeat starts on all ranks together: the ranks' parents meet in a barrier
    and then let their children read (without it the ranks' reads hardly overlapped, because
    allocating and faulting the buffer takes longer than the reads, and their sum came out as
    twice the bandwidth two cores share: measured 54-58 GB/s against ~33). Call it before the
    rank's first OpenMP kernel: the runtime's threads do not survive fork."""
    import os
    import struct
    up_r, up_w = os.pipe()      # child -> parent: "ready", then the results
    down_r, down_w = os.pipe()  # parent -> child: "go"
    pid = os.fork()
    if pid == 0:  # child: no MPI here
        try:
            os.close(up_r)
            os.close(down_w)
            a = np.ones(nbytes // 8, np.uint64)
            kernels.read_sum(a)  # fault the pages in
            out = []
            for _ in range(repeats):
                os.write(up_w, b"r")
                if os.read(down_r, 1) != b"g":
                    break
                t0 = time.perf_counter()
                kernels.read_sum(a)
                out.append(a.nbytes / (time.perf_counter() - t0))
            os.write(up_w, struct.pack(f"{len(out)}d", *out))
        finally:
            os._exit(0)
    os.close(up_w)
    os.close(down_r)
    ok = True
    for _ in range(repeats):
        ok = os.read(up_r, 1) == b"r" and ok
        comm.comm.Barrier()   # every rank's child is ready: start them together
        try:
            os.write(down_w, b"g" if ok else b"x")
        except BrokenPipeError:   # the child died: still meet the other ranks in every barrier
            ok = False
    os.close(down_w)
    data = b""
    while chunk := os.read(up_r, 4096):
        data += chunk
    os.close(up_r)
    os.waitpid(pid, 0)
    if not ok or len(data) != 8 * repeats:
        raise RuntimeError("the bandwidth measurement failed")
    return list(struct.unpack(f"{repeats}d", data))


def kernel_streaming(kernels, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Bytes/s at which this process's q40 matmul streams one token's weights (B = 1) from a
    matrix 8x the L3 cache: the per-rank speed `plan` turns into an estimate by default."""
    cols = 4096
    rows = nbytes // (cols // 32 * 20)
    rng = np.random.default_rng(0)
    m = random_matrix("q40", rows, cols, rng)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    nb = cols // 32
    dx, sx, xc = np.empty((1, nb), np.float32), np.empty((1, nb), np.int32), np.empty((1, nb, 8, 4), np.int16)
    kernels.quantize_q80(x, np.empty((1, nb, 32), np.int8), dx, sx, xc)
    out = np.empty((1, rows), np.float32)
    times = []
    for _ in range(repeats + 1):  # the first call faults the pages in
        t0 = time.perf_counter()
        kernels.matmul_q40([m["wq"]], [m["wd"]], xc, sx, dx, [out])
        times.append(time.perf_counter() - t0)
    return (m["wq"].nbytes + m["wd"].nbytes) / statistics.median(times[1:])


def run(engine, runs: int, prompt: int, steps: int, seed: int = 0) -> dict:
    """Root: `runs` times, decode `steps` greedy tokens from an empty context (positions
    0..steps-1: what the original's `dllama inference --steps 64` after a short prompt and
    llama-bench's tg measure), prefill a random prompt of `prompt` tokens, then decode `steps`
    tokens after it (attention then reads `prompt` more cached positions per token). Returns
    per-run tok/s of each."""
    from .generate import prefill
    rng = np.random.default_rng(seed)
    vocab = min(EMBED_ROWS, engine.config.vocab_size)
    out = {"decode_tok_s": [], "prefill_tok_s": [], "decode_after_prompt_tok_s": []}

    def decode(token, start):
        t0 = time.perf_counter()
        for i in range(steps):
            logits = engine.forward([token], [0], [start + i], [1], phase="decode", topk=1)[0]  # greedy
            token = int(np.argmax(logits)) % EMBED_ROWS
        return steps / (time.perf_counter() - t0)

    for _ in range(runs):
        out["decode_tok_s"].append(decode(int(rng.integers(0, vocab)), 0))
        ids = rng.integers(0, vocab, prompt).tolist()
        t0 = time.perf_counter()
        logits = prefill(engine, ids)
        out["prefill_tok_s"].append(prompt / (time.perf_counter() - t0))
        out["decode_after_prompt_tok_s"].append(decode(int(np.argmax(logits)) % EMBED_ROWS, prompt))
    return out


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def report(name: str, kinds: str, wire: str, threads: int, prompt: int, steps: int, speeds: dict,
           bandwidth: list[list[float]], weight_bytes: list[int], stats: list[dict]) -> dict:
    """The result object (what --json prints) and the text lines, from the root's view."""
    dec, pre = summary(speeds["decode_tok_s"]), summary(speeds["prefill_tok_s"])
    late = summary(speeds["decode_after_prompt_tok_s"])
    bw_runs = [sum(r) for r in zip(*bandwidth)]  # all ranks read at once: the machine's bandwidth
    bw = statistics.median(bw_runs)
    per_token = sum(weight_bytes)
    weight_bps = per_token * dec["median"]
    ranks = len(stats)
    res = {
        "shape": name, "weights": kinds, "sync": wire, "ranks": ranks, "threads": threads,
        "decode_tok_s": dec["median"], "decode_runs": dec["runs"],
        "prefill_tok_s": pre["median"], "prefill_runs": pre["runs"], "prompt_tokens": prompt, "steps": steps,
        "decode_after_prompt_tok_s": late["median"], "decode_after_prompt_runs": late["runs"],
        "weight_bytes_per_token": per_token, "weight_gb_s": weight_bps / 1e9,
        "bandwidth_gb_s": bw / 1e9, "bandwidth_runs_gb_s": [b / 1e9 for b in bw_runs],
        "bandwidth_ratio": weight_bps / bw,
        "sent_bytes_per_token": [], "recv_bytes_per_token": [], "compute_ms_per_token": [],
        "sync_ms_per_token": [], "peak_rss_bytes": [],
    }
    for s in stats:
        d = s["phases"]["decode"]
        n = max(d["tokens"], 1)
        res["sent_bytes_per_token"].append(d["sent"] / n)
        res["recv_bytes_per_token"].append(d["recv"] / n)
        res["compute_ms_per_token"].append(1e3 * (d["seconds"] - d["mpi_seconds"]) / n)
        res["sync_ms_per_token"].append(1e3 * d["mpi_seconds"] / n)
        res["peak_rss_bytes"].append(s["peak_rss"])
    return res


def text(res: dict) -> str:
    spread = lambda runs: f"min {min(runs):.1f}, max {max(runs):.1f} over {len(runs)} runs"  # noqa: E731
    lines = [
        f"bench: {res['shape']}, weights {res['weights']}, sync {res['sync']}, {res['ranks']} rank(s) x "
        f"{res['threads']} thread(s)",
        f"memory read bandwidth (all ranks reading at once): {res['bandwidth_gb_s']:.1f} GB/s "
        f"({spread(res['bandwidth_runs_gb_s'])})",
        f"decode:  {res['decode_tok_s']:.1f} tok/s median ({spread(res['decode_runs'])}), positions 0-{res['steps'] - 1}",
        f"         weights {res['weight_bytes_per_token'] / 1e6:.0f} MB/token -> {res['weight_gb_s']:.1f} GB/s = "
        f"{100 * res['bandwidth_ratio']:.0f}% of the measured bandwidth",
        f"prefill: {res['prefill_tok_s']:.1f} tok/s median ({spread(res['prefill_runs'])}), {res['prompt_tokens']} tokens",
        f"decode after the prompt: {res['decode_after_prompt_tok_s']:.1f} tok/s median "
        f"({spread(res['decode_after_prompt_runs'])}), positions {res['prompt_tokens']}-"
        f"{res['prompt_tokens'] + res['steps'] - 1}",
        "decode per token (both decode runs):",
        "  rank  compute ms  sync ms  sent B  recv B  peak RSS",
    ]
    for r in range(res["ranks"]):
        lines.append(f"  {r:4d} {res['compute_ms_per_token'][r]:11.2f} {res['sync_ms_per_token'][r]:8.2f}"
                     f" {res['sent_bytes_per_token'][r]:7.0f} {res['recv_bytes_per_token'][r]:7.0f}"
                     f" {res['peak_rss_bytes'][r] / 2**20:6.0f} MiB")
    return "\n".join(lines)


def to_json(res: dict) -> str:
    return json.dumps(res)
