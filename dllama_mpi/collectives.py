"""Every MPI call of the project lives here.

Byte accounting: each call adds the payload this rank hands to / gets from other ranks under
the direct algorithm (Bcast: root sends b to each of N-1 ranks; Allgather: b to each of N-1;
Allreduce: reduce-scatter + all-gather, 2b(N-1)/N each way; Gatherv: each worker sends its
slice to the root). Time inside MPI calls (including waiting for slower ranks) is counted too,
so the engine can split a token's time into compute and sync.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from .buffers import Buffers
from .partition import split_even

Q80_BLOCK = 32
Q80_BYTES = Q80_BLOCK + 4  # int8 values + a float32 scale


class Counters:
    __slots__ = ("sent", "recv", "seconds")

    def __init__(self):
        self.sent = 0
        self.recv = 0
        self.seconds = 0.0


class Collectives:
    def __init__(self, comm=None, sync: str = "auto"):
        if sync not in ("auto", "allgather", "ring"):
            raise ValueError(f"unknown sync {sync!r}: use auto, allgather or ring")
        self.sync = sync
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.phases = {}        # phase name -> Counters
        self.phase = "setup"
        self.bufs = Buffers()     # work arrays of the per-token calls, reused
        self._ring_plans = {}     # (B, blocks) -> the ring sync's chunks, byte counts, offsets

    # -- accounting -------------------------------------------------------------------------
    def set_phase(self, name: str) -> None:
        self.phase = name

    def add_bytes(self, sent: int = 0, recv: int = 0) -> None:
        """Bytes that moved in a call counted under another phase (a worker learns the phase of a
        command only after receiving its header)."""
        self._count(sent, recv, time.perf_counter())

    def _count(self, sent: int, recv: int, t0: float) -> None:
        c = self.phases.get(self.phase)
        if c is None:
            c = self.phases[self.phase] = Counters()
        c.sent += sent
        c.recv += recv
        c.seconds += time.perf_counter() - t0

    # -- control ----------------------------------------------------------------------------
    def bcast_array(self, arr: np.ndarray) -> np.ndarray:
        """Root's array to every rank, in place (shape and dtype known to all)."""
        t0 = time.perf_counter()
        self.comm.Bcast(arr, root=0)
        n = self.size - 1
        self._count(arr.nbytes * n if self.rank == 0 else 0, 0 if self.rank == 0 else arr.nbytes, t0)
        return arr

    def allgather_object(self, obj):
        """Small Python objects (start-up checks, stats); not counted per token."""
        return self.comm.allgather(obj)

    def gather_object(self, obj):
        return self.comm.gather(obj, root=0)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)

    # -- Q80 on the wire ---------------------------------------------------------------------
    # A Q80 record is one 32-value block: a float32 scale then 32 int8 values (36 bytes); a
    # [B, n] partial travels as B * n/32 records, row by row.

    def _q80_encode(self, x: np.ndarray, kernels, name: str = "rec") -> np.ndarray:
        """[B, n] float32 -> its records as [B, n/32 * 36] uint8 (a reused buffer under `name`)."""
        b, n = x.shape
        rec = self.bufs(name, (b, n // Q80_BLOCK * Q80_BYTES), np.uint8)
        if n:
            kernels.quantize_q80_records(x, rec.view(np.float32), rec.view(np.int8))
        return rec

    @staticmethod
    def _q80_sum(recs: np.ndarray, out: np.ndarray, kernels) -> None:
        """Sum of N ranks' records [N, bytes] (rank order), dequantized into out [B, nb*32]."""
        if out.shape[1]:
            kernels.sum_q80_records(recs.view(np.float32), recs.view(np.int8), out)

    def bcast_x(self, x: np.ndarray, wire: str) -> None:
        """The root's embedded batch [B, dim] to every rank, in place. With the q80 wire it
        travels as float16 (half the bytes; its 2^-11 relative rounding is far below the Q80
        syncs' error) and every rank, the root included, continues from the rounded values."""
        if wire == "f32" or self.size == 1:
            self.bcast_array(x)
            return
        half = self.bufs("x.f16", x.shape, np.float16)
        if self.rank == 0:
            np.copyto(half, x, casting="same_kind")
        self.bcast_array(half)
        np.copyto(x, half)

    # -- the per-layer sync -----------------------------------------------------------------
    def allreduce_sum(self, x: np.ndarray, wire: str, kernels) -> None:
        """Sum a [B, dim] float32 partial over all ranks, in place; every rank gets the same bits.

        wire "f32": MPI_Allreduce. wire "q80", sync "allgather": every rank all-gathers its Q80
        partial and sums all of them in rank order ((N-1) * b bytes sent per rank, as the original
        does). sync "ring": reduce-scatter + all-gather: rank r sums block range r of every rank's
        Q80 partial (MPI_Alltoallv), re-quantizes that sum and all ranks all-gather the sums,
        2 * b * (N-1)/N bytes per rank whatever N. "auto" uses ring from 3 ranks on."""
        if self.size == 1:
            return
        n = self.size
        if wire == "f32":
            t0 = time.perf_counter()
            self.comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
            moved = 2 * x.nbytes * (n - 1) // n
            self._count(moved, moved, t0)
            return
        rec = self._q80_encode(x, kernels)
        if self.sync_mode(n) == "allgather":
            recv = self.bufs("recv", (n, rec.size), np.uint8)
            t0 = time.perf_counter()
            self.comm.Allgather(rec, recv)
            self._count(rec.nbytes * (n - 1), rec.nbytes * (n - 1), t0)
            self._q80_sum(recv, x, kernels)
            return
        b, nb = x.shape[0], x.shape[1] // Q80_BLOCK
        chunks, counts, displs = self._ring_plan(b, nb)
        mine = counts[self.rank]
        # the records chunk by chunk (what rank r gets is contiguous); a single token's [1, nb]
        # records already are in that order
        rec = rec.reshape(b, nb, Q80_BYTES)
        send = rec.reshape(-1) if b == 1 else self._by_chunk(rec, chunks, displs, counts)
        recv = self.bufs("ring.recv", (n, mine), np.uint8)
        t0 = time.perf_counter()
        self.comm.Alltoallv([send, counts, displs, MPI.BYTE], [recv, [mine] * n, _displs([mine] * n), MPI.BYTE])
        self._count(sum(counts) - mine, mine * (n - 1), t0)
        c0, c1 = chunks[self.rank]
        part = self.bufs("ring.part", (b, (c1 - c0) * Q80_BLOCK))
        self._q80_sum(recv, part, kernels)
        mine_rec = self._q80_encode(part, kernels, "ring.mine")
        gathered = self.bufs("ring.gathered", (sum(counts),), np.uint8)
        t0 = time.perf_counter()
        self.comm.Allgatherv(mine_rec.reshape(-1), [gathered, counts, displs, MPI.BYTE])
        self._count(mine * (n - 1), sum(counts) - mine, t0)
        if b > 1:   # back to row order
            full = self.bufs("ring.full", rec.shape, np.uint8)
            for (a, z), off, c in zip(chunks, displs, counts):
                full[:, a:z] = gathered[off:off + c].reshape(b, z - a, Q80_BYTES)
            gathered = full
        self._q80_sum(gathered.reshape(1, -1), x, kernels)

    def _ring_plan(self, b: int, nb: int):
        """The ring's block ranges per rank and their byte counts and offsets, for [b, nb*32]."""
        key = (b, nb)
        plan = self._ring_plans.get(key)
        if plan is None:
            chunks = split_even(nb, self.size)
            counts = [b * (z - a) * Q80_BYTES for a, z in chunks]
            plan = self._ring_plans[key] = (chunks, counts, _displs(counts))
        return plan

    def _by_chunk(self, rec: np.ndarray, chunks, displs, counts) -> np.ndarray:
        """Records [b, nb, 36] reordered chunk by chunk (each chunk's [b, z-a, 36] contiguous)."""
        out = self.bufs("ring.send", (sum(counts),), np.uint8)
        for (a, z), off, c in zip(chunks, displs, counts):
            out[off:off + c].reshape(rec.shape[0], z - a, Q80_BYTES)[...] = rec[:, a:z]
        return out

    def sync_mode(self, n: int) -> str:
        return ("ring" if n >= 3 else "allgather") if self.sync == "auto" else self.sync

    def gather_topk(self, values: np.ndarray, ids: np.ndarray):
        """Every rank's [B, k] best logits (values float32, global ids int32) on the root as
        [B, N*k] each; None elsewhere."""
        if self.size == 1:
            return values, ids
        t0 = time.perf_counter()
        b, k = values.shape
        local = self.bufs("topk.local", (b, 8 * k), np.uint8)   # per row: k float32 values, k int32 ids
        local[:, :4 * k] = values.view(np.uint8)
        local[:, 4 * k:] = ids.astype(np.int32, copy=False).view(np.uint8)
        recv = self.bufs("topk.recv", (self.size,) + local.shape, np.uint8) if self.rank == 0 else None
        self.comm.Gather(local, recv, root=0)
        if self.rank != 0:
            self._count(local.nbytes, 0, t0)
            return None
        self._count(0, local.nbytes * (self.size - 1), t0)
        vals = self.bufs("topk.vals", (b, self.size, k))
        idx = self.bufs("topk.ids", (b, self.size, k), np.int32)
        vals[...] = recv[:, :, :4 * k].view(np.float32).transpose(1, 0, 2)
        idx[...] = recv[:, :, 4 * k:].view(np.int32).transpose(1, 0, 2)
        return vals.reshape(b, -1), idx.reshape(b, -1)

    def gather_rows(self, local: np.ndarray, counts: list[int]) -> np.ndarray | None:
        """Concatenate every rank's [B, counts[r]] float32 columns on the root -> [B, sum]."""
        b = local.shape[0]
        if self.size == 1:
            return local
        t0 = time.perf_counter()
        # Gatherv moves contiguous blocks: send [B, v_r] as is, root receives rank-major.
        sizes = [b * c for c in counts]
        if self.rank == 0:
            recv = self.bufs("rows.recv", (sum(sizes),))
            offsets = np.cumsum([0] + sizes[:-1]).tolist()
            self.comm.Gatherv(np.ascontiguousarray(local), [recv, sizes, offsets, MPI.FLOAT], root=0)
            self._count(0, (sum(sizes) - sizes[0]) * 4, t0)
            parts = [recv[o:o + s].reshape(b, c) for o, s, c in zip(offsets, sizes, counts)]
            return np.concatenate(parts, axis=1)
        self.comm.Gatherv(np.ascontiguousarray(local), None, root=0)
        self._count(local.nbytes, 0, t0)
        return None


def _displs(counts: list[int]) -> list[int]:
    return np.cumsum([0] + counts[:-1]).tolist()


def processor_name() -> str:
    """This rank's host name as MPI reports it (what error messages name)."""
    return MPI.Get_processor_name()
