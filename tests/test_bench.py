"""`dllama-mpi bench`: it runs, reports what it promises, and counts bytes as the plan predicts.
(Speed itself is never asserted: these machines are shared and noisy.)"""
from __future__ import annotations

import json

import pytest

from helpers import dllama

SMALL = ["--runs", 2, "--prompt-tokens", 16, "--steps", 6, "--json"]


@pytest.mark.parametrize("n,sync", [(1, "auto"), (2, "auto"), (3, "auto"), (3, "allgather"), (4, "ring")])
def test_bench_reports_and_bytes_match_the_plan(n, sync):
    res = json.loads(dllama("bench", "--shape", "smollm2-135m", "--sync", sync, *SMALL, np=n).stdout)
    assert res["ranks"] == n and res["threads"] == 1
    for key in ("decode_tok_s", "prefill_tok_s", "decode_after_prompt_tok_s", "weight_gb_s", "bandwidth_gb_s"):
        assert res[key] > 0, key
    assert len(res["decode_runs"]) == len(res["prefill_runs"]) == len(res["decode_after_prompt_runs"]) == 2
    assert (res["prompt_tokens"], res["steps"]) == (16, 6)
    assert len(res["peak_rss_bytes"]) == n and min(res["peak_rss_bytes"]) > 50e6
    # every byte a decode step hands to MPI (x broadcast, 2 syncs per layer, logits) is predicted
    plan = json.loads(dllama("bench", "--shape", "smollm2-135m", "--sync", sync, "--plan-only", "--nodes", n,
                             "--json").stdout)
    assert res["sent_bytes_per_token"] == plan["sent_bytes_per_token"]
    assert res["recv_bytes_per_token"] == plan["recv_bytes_per_token"]
    if n > 1:
        assert min(res["sent_bytes_per_token"]) > 0


def test_bench_on_a_slice_set(slices):
    res = json.loads(dllama("bench", "--model", slices("auto", 2), *SMALL, np=2).stdout)
    assert res["ranks"] == 2 and res["weights"] == "q41, q80"
    # the slice files' matrices: SmolLM2 in q41 with a q80 head, about 100 MB
    assert 80e6 < res["weight_bytes_per_token"] < 120e6


def test_bench_needs_a_shape_or_a_model():
    proc = dllama("bench", "--runs", 1, check=False)
    assert proc.returncode != 0 and "give --shape NAME or --model" in proc.stderr


def test_ring_sends_less_than_allgather_from_three_ranks():
    def busiest(sync, n):
        out = dllama("bench", "--shape", "llama3.1-8b", "--sync", sync, "--plan-only", "--nodes", n, "--json").stdout
        return max(json.loads(out)["sent_bytes_per_token"])
    assert busiest("ring", 2) == busiest("allgather", 2)
    for n in (3, 4, 8):
        assert busiest("ring", n) < busiest("allgather", n)
    # the original's busiest worker sends 963,840 B per token for Llama 3.1 8B on 4 nodes
    assert busiest("auto", 4) <= 0.5 * 963_840


def test_random_weights_are_laid_out_like_a_slice_file():
    """One buffer, in slice-file order, every array 64-byte aligned and C-contiguous (what the
    kernels get from a memory-mapped slice file), values of the kernel layout's kinds."""
    import numpy as np
    from dllama_mpi.bench import RandomSlice
    from dllama_mpi.config import SHAPES

    rs = RandomSlice(SHAPES["smollm2-135m"], 2, 1, "q41", "q80")
    arrays = [a for _, _, _, parts in rs.matrices.values() for a in parts.values()]
    assert len(arrays) == 30 * 7 * 3 + 2
    assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous for a in arrays)
    starts = [a.ctypes.data for a in arrays]
    assert starts == sorted(starts) and starts[-1] + arrays[-1].nbytes - starts[0] < sum(a.nbytes for a in arrays) + 64 * len(arrays)
    kind, rows, cols, out = rs.matrices["output"]
    assert (kind, rows, cols) == ("q80", 24576, 576) and out["wq"].dtype == np.int8
    kind, rows, cols, wq = rs.matrices["layers.3.wq"]
    assert (kind, rows, cols) == ("q41", 256, 576)  # rank 1 of 2: query heads 5-8
    assert np.array_equal(wq["wm"], -8 * wq["wd"]) and (wq["wd"] > 0).all()
