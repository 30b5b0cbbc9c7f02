"""Compiled compute kernels (pythran + OpenMP), built by meson at install time.

Sources: kernels/matmul.py and kernels/ops.py at the repository root; layouts and exact
semantics are documented there and in dllama_mpi/quant.py (which also holds the numpy
references). All kernels write into caller-preallocated, C-contiguous arrays of the exact dtypes
of their signatures and return None; a wrong dtype or a non-contiguous view raises TypeError
(never a silent copy).

There is deliberately no numpy fallback: without the compiled modules inference would be
hundreds of times slower, so a missing build is an error.
"""
from __future__ import annotations


try:
    from dllama_mpi import _matmul, _ops
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "compiled kernels missing: run `make install` (it builds dllama_mpi._matmul/_ops with "
        f"pip install --no-build-isolation .) ({exc})"
    ) from exc

matmul_q40 = _matmul.matmul_q40
matmul_q41 = _matmul.matmul_q41
matmul_q80 = _matmul.matmul_q80
matmul_f32 = _matmul.matmul_f32
sum_q80_records = _matmul.sum_q80_records

rmsnorm = _ops.rmsnorm
rope = _ops.rope
attention = _ops.attention
kv_store = _ops.kv_store
silu_mul = _ops.silu_mul
quantize_q80 = _ops.quantize_q80
quantize_q80_records = _ops.quantize_q80_records
rmsnorm_q80 = _ops.rmsnorm_q80
silu_mul_q80 = _ops.silu_mul_q80
add_rmsnorm_q80 = _ops.add_rmsnorm_q80
rope_attention_q80 = _ops.rope_attention_q80
read_sum = _ops.read_sum

__all__ = [
    "quantize_q80", "matmul_q40", "matmul_q41", "matmul_q80", "matmul_f32",
    "quantize_q80_records", "sum_q80_records",
    "rmsnorm", "rope", "attention", "kv_store", "silu_mul", "read_sum",
    "rmsnorm_q80", "add_rmsnorm_q80", "silu_mul_q80", "rope_attention_q80",
]
# Threads: the OpenMP runtime reads OMP_NUM_THREADS once, at the first parallel region, so the
# caller sets it before importing this module (the CLI does, from --nthreads). With one MPI rank
# per core use 1 thread per rank: two threads on a core shared with another rank are very slow.
