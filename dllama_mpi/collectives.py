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

Q80_BLOCK = 32
Q80_BYTES = Q80_BLOCK + 4  # int8 values + a float32 scale


class Counters:
    __slots__ = ("sent", "recv", "seconds")

    def __init__(self):
        self.sent = 0
        self.recv = 0
        self.seconds = 0.0


class Collectives:
    def __init__(self, comm=None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.phases = {}        # phase name -> Counters
        self.phase = "setup"
        self._q80 = {}          # buffers for the q80 all-reduce, by shape

    # -- accounting -------------------------------------------------------------------------
    def set_phase(self, name: str) -> None:
        self.phase = name

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

    # -- the per-layer sync -----------------------------------------------------------------
    def allreduce_sum(self, x: np.ndarray, wire: str, kernels) -> None:
        """Sum a [B, dim] float32 partial over all ranks, in place.

        wire "f32": MPI_Allreduce. wire "q80": every rank quantizes its partial to Q80
        (int8 + float32 scale per 32 values), all-gathers the encoded bytes and sums them locally
        in rank order, so every rank gets the same bits (4x fewer bytes on the wire than f32)."""
        if self.size == 1:
            return
        n = self.size
        if wire == "f32":
            t0 = time.perf_counter()
            self.comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
            moved = 2 * x.nbytes * (n - 1) // n
            self._count(moved, moved, t0)
            return
        b, dim = x.shape
        nb = dim // Q80_BLOCK
        bufs = self._q80.get(x.shape)
        if bufs is None:
            # one send buffer = [scales f32 (b*nb) | values int8 (b*nb*32)], gathered N times
            send = np.empty(b * nb * Q80_BYTES, dtype=np.uint8)
            recv = np.empty((n, send.size), dtype=np.uint8)
            dx = send[: b * nb * 4].view(np.float32).reshape(b, nb)
            qx = send[b * nb * 4:].view(np.int8).reshape(b, nb, Q80_BLOCK)
            sx = np.empty((b, nb), dtype=np.int32)
            all_dx = recv[:, : b * nb * 4].view(np.float32).reshape(n, b, nb)
            all_qx = recv[:, b * nb * 4:].view(np.int8).reshape(n, b, nb, Q80_BLOCK)
            bufs = self._q80[x.shape] = (send, recv, dx, qx, sx, all_dx, all_qx)
        send, recv, dx, qx, sx, all_dx, all_qx = bufs
        kernels.quantize_q80(x, qx, dx, sx)
        t0 = time.perf_counter()
        self.comm.Allgather(send, recv)
        self._count(send.nbytes * (n - 1), send.nbytes * (n - 1), t0)
        kernels.dequant_sum_q80(np.ascontiguousarray(all_qx), np.ascontiguousarray(all_dx), x)

    def gather_rows(self, local: np.ndarray, counts: list[int]) -> np.ndarray | None:
        """Concatenate every rank's [B, counts[r]] float32 columns on the root -> [B, sum]."""
        b = local.shape[0]
        if self.size == 1:
            return local
        t0 = time.perf_counter()
        # Gatherv moves contiguous blocks: send [B, v_r] as is, root receives rank-major.
        sizes = [b * c for c in counts]
        if self.rank == 0:
            recv = np.empty(sum(sizes), dtype=np.float32)
            offsets = np.cumsum([0] + sizes[:-1]).tolist()
            self.comm.Gatherv(np.ascontiguousarray(local), [recv, sizes, offsets, MPI.FLOAT], root=0)
            self._count(0, (sum(sizes) - sizes[0]) * 4, t0)
            parts = [recv[o:o + s].reshape(b, c) for o, s, c in zip(offsets, sizes, counts)]
            return np.concatenate(parts, axis=1)
        self.comm.Gatherv(np.ascontiguousarray(local), None, root=0)
        self._count(local.nbytes, 0, t0)
        return None


def processor_name() -> str:
    """This rank's host name as MPI reports it (what error messages name)."""
    return MPI.Get_processor_name()
