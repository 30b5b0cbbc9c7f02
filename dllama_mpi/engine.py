"""The loop every rank runs. The root drives it; workers obey; all run the same forward.

The root broadcasts a small fixed header (command, batch size, phase, exit code or top-k) and then,
for a forward, the batch's (token, slot, position, want-logits) entries. Workers never parse
prompts. Start-up is collective: every rank opens its own slice file and all ranks agree on
the outcome before anyone proceeds, so a bad slice set ends the job everywhere with the same
message instead of a hang.
"""
from __future__ import annotations

import pathlib
import re
import resource
import time

import numpy as np
from mpi4py import MPI

from .collectives import Collectives
from .slicefile import SliceError, SliceFile, slice_name

FORWARD, STOP = 1, 2
PHASES = ("prefill", "decode")


class StartupError(Exception):
    """Raised on every rank when any rank cannot start; str() is the line the root prints."""


def open_rank_slice(model_dir, comm: Collectives) -> SliceFile:
    """Each rank opens its own rank-R-of-N.h5; all ranks agree on success or on the error."""
    model_dir = pathlib.Path(model_dir)
    host = MPI.Get_processor_name()
    sf, err = None, None
    path = model_dir / slice_name(comm.rank, comm.size)
    try:
        if not model_dir.is_dir():
            err = f"{host}: model folder {model_dir} does not exist: slice a model with `dllama-mpi slice`"
        elif not path.is_file():
            sizes = sorted({int(m.group(1)) for p in model_dir.glob("rank-*-of-*.h5")
                            if (m := re.fullmatch(r"rank-\d+-of-(\d+)\.h5", p.name))})
            err = f"{host}: {path} is missing"
            if sizes and comm.size not in sizes:
                err = (f"{model_dir} holds a slice set for {', '.join(map(str, sizes))} rank(s) but this job has "
                       f"{comm.size}: run with mpirun -np {sizes[0]}, or re-slice with --nodes {comm.size}")
            else:
                err += f": copy rank {comm.rank}'s file to this host or re-slice with --nodes {comm.size}"
        else:
            sf = SliceFile(path)
            if sf.n_ranks != comm.size or sf.rank != comm.rank:
                err = f"{host}: {path} claims to be rank {sf.rank} of {sf.n_ranks}: re-slice with --nodes {comm.size}"
    except SliceError as e:
        err = f"{host}: {e}"
    except Exception as e:  # an unreadable file must still end the job on every rank
        err = f"{host}: {path}: {type(e).__name__}: {e}"
    views = comm.allgather_object((err, sf.digest if sf else None))
    errors = [e for e, _ in views if e]
    if errors:
        raise StartupError(errors[0] if len(set(errors)) == 1 else "; ".join(dict.fromkeys(errors)))
    digests = [d for _, d in views]
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise StartupError(f"slice files of rank(s) {bad} come from a different model than rank 0's "
                           f"(source digest differs): re-slice all ranks from one source")
    return sf


class Engine:
    def __init__(self, model_dir, comm: Collectives, max_seq_len: int | None, wire: str, n_slots: int = 1,
                 kv_storage: str = "memory", kv_dir=None, rank_slice=None):
        """rank_slice: this rank's weights already in memory (bench's random weights) instead of
        the slice file in model_dir."""
        from .model import RankModel  # imports the compiled kernels: after OMP_NUM_THREADS is set
        self.comm = comm
        self.slice = rank_slice if rank_slice is not None else open_rank_slice(model_dir, comm)
        cfg = self.config = self.slice.config
        self.max_seq_len = min(cfg.context_length, 4096) if not max_seq_len else max_seq_len
        err = None
        try:  # the KV cache may not fit (RAM, or --kv-cache-dir on this host): agreed by all ranks
            self.model = RankModel(self.slice, comm, self.max_seq_len, wire, n_slots, kv_storage, kv_dir)
        except (OSError, MemoryError) as e:
            err = f"{MPI.Get_processor_name()}: KV cache ({kv_storage}): {e.strerror if isinstance(e, OSError) and e.strerror else e}"
            if isinstance(e, OSError) and e.filename:
                err += f": {e.filename}"
        errors = list(dict.fromkeys(e for e in comm.allgather_object(err) if e))
        if errors:
            raise StartupError("; ".join(errors))
        self.n_slots = n_slots
        self.header = np.zeros(4, np.int32)
        self.stats = {p: {"tokens": 0, "seconds": 0.0} for p in PHASES}

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def _run(self, entries: np.ndarray, name: str, topk: int = 0):
        t0 = time.perf_counter()
        tokens, slots, pos, want = entries
        out = self.model.forward(tokens, slots, pos, want, topk)
        st = self.stats[name]
        st["seconds"] += time.perf_counter() - t0
        st["tokens"] += len(tokens)
        return out

    # -- root ---------------------------------------------------------------------------------
    def forward(self, tokens, slots, positions, want, phase: str = "decode", topk: int = 0):
        """Root only: run one batch on every rank; returns logits [n_want, vocab] (with topk > 0
        only the topk best of each rank are real, the rest -inf)."""
        entries = np.ascontiguousarray(np.stack([np.asarray(tokens), np.asarray(slots), np.asarray(positions),
                                                 np.asarray(want)]).astype(np.int32))
        if entries.shape[1] == 0:
            raise ValueError("empty batch")
        if entries[2].max() >= self.max_seq_len or entries[2].min() < 0:
            raise ValueError(f"position beyond --max-seq-len {self.max_seq_len}")
        if entries[1].max() >= self.n_slots or entries[1].min() < 0:
            raise ValueError(f"sequence slot outside 0..{self.n_slots - 1}")
        if entries[0].max() >= self.config.vocab_size or entries[0].min() < 0:
            raise ValueError("token id outside the vocabulary")
        self.comm.set_phase(phase)
        self.header[:] = (FORWARD, entries.shape[1], PHASES.index(phase), topk)
        self.comm.bcast_array(self.header)
        self.comm.bcast_array(entries)
        return self._run(entries, phase, topk)

    def stop(self, exit_code: int = 0):
        """Root only: release the workers (they exit with exit_code) and collect every rank's stats."""
        self.comm.set_phase("idle")
        self.header[:] = (STOP, 0, 0, exit_code)
        self.comm.bcast_array(self.header)
        return self.comm.gather_object(self.rank_stats())

    # -- workers ------------------------------------------------------------------------------
    def serve(self) -> int:
        """Worker loop: obey the root until it says stop; returns the job's exit code."""
        while True:
            self.comm.set_phase("idle")  # waiting for the root is not part of any token's time
            self.comm.bcast_array(self.header)
            cmd, b, phase, code = (int(v) for v in self.header)  # code: exit code (STOP) or top-k (FORWARD)
            if cmd == STOP:
                self.comm.gather_object(self.rank_stats())
                return code
            entries = self.comm.bufs("entries", (4, b), np.int32)
            self.comm.set_phase(PHASES[phase])
            self.comm.add_bytes(recv=self.header.nbytes)  # the header belongs to this command
            self.comm.bcast_array(entries)
            self._run(entries, PHASES[phase], code)

    def rank_stats(self) -> dict:
        phases = {}
        for name in PHASES:
            c = self.comm.phases.get(name)
            st = self.stats[name]
            phases[name] = dict(st, mpi_seconds=c.seconds if c else 0.0, sent=c.sent if c else 0,
                                recv=c.recv if c else 0)
        return {"rank": self.comm.rank, "host": MPI.Get_processor_name(), "phases": phases,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
