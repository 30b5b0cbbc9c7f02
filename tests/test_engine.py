"""Engine behaviour that the CLI does not show directly: batching of several sequences."""
import json
import subprocess

import pytest

from helpers import BIN, TIMEOUT


@pytest.mark.parametrize("n,wire", [(1, "f32"), (2, "q80"), (3, "f32"), (3, "q80")])
def test_two_sequences_in_one_batch_equal_separate_runs(n, wire, slices):
    script = __import__("pathlib").Path(__file__).parent / "batch_check.py"
    proc = subprocess.run([str(BIN / "mpirun"), "-np", str(n), str(BIN / "python"), str(script),
                           str(slices("auto", n)), wire], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["a_vs_b"] > 0.1 * res["scale"]  # the two sequences really differ
    for key in ("prefill_a", "prefill_b", "decode_a", "decode_b"):
        assert res[key] <= 1e-5 * res["scale"], (key, res)
