"""Work arrays reused from token to token. A decode step's activations, Q80 encodings and sync
buffers all come from here; what a step still allocates is what it hands out (the logits, the
embedded rows) and the kernels' own small per-call scratch (kernels/ops.py says why)."""
from __future__ import annotations

import numpy as np

F32 = np.float32


class Buffers:
    """Named work arrays reused from token to token: a name gets a new array only when the shape
    asked for changes (another batch size), so steady decoding makes no new work arrays."""

    def __init__(self):
        self._arrays = {}

    def __call__(self, name: str, shape: tuple, dtype=F32) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._arrays[name] = np.empty(shape, dtype)
        return a

    def q80(self, name: str, b: int, n: int) -> tuple:
        """The Q80 encoding arrays (qx, dx, sx, xc) of a [b, n] activation."""
        a = self._arrays.get(name)
        if a is None or a[0].shape[0] != b or a[0].shape[1] != n // 32:
            nb = n // 32
            a = self._arrays[name] = (np.empty((b, nb, 32), np.int8), np.empty((b, nb), F32),
                                      np.empty((b, nb), np.int32), np.empty((b, nb, 8, 4), np.int16))
        return a
