"""Run under mpirun by test_engine.py: two sequences in one batch vs two separate runs.
Prints one JSON line on the root with the largest differences."""
import json
import sys

import numpy as np

from dllama_mpi.collectives import Collectives
from dllama_mpi.engine import Engine
from dllama_mpi.generate import prefill

model_dir, wire = sys.argv[1], sys.argv[2]
comm = Collectives()
engine = Engine(model_dir, comm, 128, wire, n_slots=2)
if comm.rank != 0:
    sys.exit(engine.serve())

a = [504, 2365, 6354, 16438, 27003, 690, 260]
b = [1001, 30, 7, 14228, 30855, 897, 4070, 1699, 42, 11]
# separately: each prompt prefilled alone, then one decode step each
sep_a = prefill(engine, a, slot=0)
sep_b = prefill(engine, b, slot=1)
step_sep = [engine.forward([5], [0], [len(a)], [1])[0], engine.forward([6], [1], [len(b)], [1])[0]]
# together: both prompts in one forward (interleaved entries), then one batched decode step
order = [(0, i) for i in range(len(a))] + [(1, i) for i in range(len(b))]
order = order[::2] + order[1::2]  # mix the sequences inside the batch
tokens = [(a, b)[s][i] for s, i in order]
want = [int(i == len((a, b)[s]) - 1) for s, i in order]
both = engine.forward(tokens, [s for s, _ in order], [i for _, i in order], want, phase="prefill")
rows = [k for k, w in enumerate(want) if w]
tog = {order[k][0]: both[j] for j, k in enumerate(rows)}
step_tog = engine.forward([5, 6], [0, 1], [len(a), len(b)], [1, 1])
res = {
    "prefill_a": float(np.abs(tog[0] - sep_a).max()), "prefill_b": float(np.abs(tog[1] - sep_b).max()),
    "decode_a": float(np.abs(step_tog[0] - step_sep[0]).max()), "decode_b": float(np.abs(step_tog[1] - step_sep[1]).max()),
    "a_vs_b": float(np.abs(sep_a - sep_b).max()), "scale": float(np.abs(sep_a).max()),
}
print(json.dumps(res))
engine.stop()
