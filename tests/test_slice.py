"""`dllama-mpi slice`: what the files hold, bounded memory, nothing half-written, clear errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import gguf
import h5py
import numpy as np
import pytest

from helpers import BIN, dllama, error_lines


def test_slice_set_is_self_describing(slices, smollm2_gguf):
    d = slices("auto", 2)
    assert sorted(p.name for p in d.iterdir()) == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    digests = set()
    for r in (0, 1):
        with h5py.File(d / f"rank-{r}-of-2.h5") as f:
            a = f.attrs
            assert a["format"] == "dllama-mpi-slice" and a["version"] >= 1
            assert (a["n_ranks"], a["rank"]) == (2, r)
            cfg = json.loads(a["config"])
            assert (cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]) == (576, 30, 9, 3)
            plan = json.loads(a["plan"])
            assert plan[r]["heads"] == ([0, 5], [5, 9])[r]
            digests.add(a["source_digest"])
            assert json.loads(a["weight_types"]) == ["q41", "q80"]  # Q4_1 layers, Q8_0 tied head
            assert f["layers/00/wq"].attrs["kind"] == "q41"
            assert f["output"].attrs["kind"] == "q80"
            assert ("tok_embd" in f) == (r == 0)  # only the root looks up embeddings
            assert len(bytes(f["tokenizer"][()])) > 100_000
            for name in ("layers/00/wq/wq", "layers/29/w2/wd", "output/wq"):
                assert f[name].id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
                assert f[name].compression is None
            # kernel arrays start on cache lines once memory-mapped (the mapping is page-aligned)
            offsets = []
            f.visititems(lambda n, o: offsets.append((n, o.id.get_offset())) if isinstance(o, h5py.Dataset)
                         and o.nbytes >= 1024 else None)
            assert len(offsets) > 300 and [n for n, off in offsets if off % 64] == []
    assert len(digests) == 1


def test_kept_blocks_are_bit_exact(slices, smollm2_gguf):
    """auto keeps Q4_1 blocks: scales in the file equal the f16 scales of the source blocks."""
    d = slices("auto", 1)
    reader = gguf.GGUFReader(smollm2_gguf)
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    raw = np.asarray(t.data).reshape(576, -1)  # [rows, bytes]
    blocks = raw.reshape(576, -1, 20)
    d_src = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    with h5py.File(d / "rank-0-of-1.h5") as f:
        wd = f["layers/03/w2/wd"][()]  # [ntile, nb, T]
    tiled = wd.transpose(0, 2, 1).reshape(-1, wd.shape[1])[:576]
    assert np.array_equal(tiled, d_src)


def _peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS (bytes) of a child process, measured by a fresh parent."""
    code = ("import resource,subprocess,sys; subprocess.run(sys.argv[1:], check=True, capture_output=True);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_slicing_streams_one_tensor_at_a_time(smollm2_gguf, tmp_path):
    """f32 slices of SmolLM2 are 580 MB; the slicer must never hold the model in memory."""
    opened = ("import sys, dllama_mpi.slicefile, tqdm; from dllama_mpi.readers import open_model; "
              "open_model(sys.argv[1]).digest()")
    baseline = _peak_rss_of([sys.executable, "-c", opened, str(smollm2_gguf)])  # imports + model metadata
    peak = _peak_rss_of([str(BIN / "dllama-mpi"), "slice", str(smollm2_gguf), "--nodes", "2", "--out",
                         str(tmp_path / "s"), "--weights-float-type", "f32", "--quiet"])
    total = sum(p.stat().st_size for p in (tmp_path / "s").iterdir())
    largest_tensor = 49152 * 576 * 4  # the f32 embedding / LM head
    assert total > 550e6
    grown = peak - baseline
    assert grown < 2 * largest_tensor, f"slicing grew RSS by {grown / 1e6:.0f} MB (model {total / 1e6:.0f} MB)"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_slice_leaves_no_valid_looking_file(smollm2_gguf, tmp_path, sig):
    out = tmp_path / "s"
    # a shell without job control starts background children with SIGINT ignored: undo that,
    # so the child sees the signal the way a user's Ctrl-C delivers it
    proc = subprocess.Popen([str(BIN / "dllama-mpi"), "slice", str(smollm2_gguf), "--nodes", "2", "--out", str(out),
                             "--weights-float-type", "f32", "--quiet"], stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(out.iterdir())):
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "slicing finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err.decode()
    assert list(out.glob("*.h5")) == []
    assert list(out.iterdir()) == []  # temporary files are removed too


def test_slice_bad_inputs(tmp_path, smollm2_gguf):
    missing = dllama("slice", tmp_path / "nope.gguf", "--nodes", 2, "--out", tmp_path / "o", check=False)
    assert missing.returncode != 0 and "no such model file" in error_lines(missing.stderr)[0]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    bad = dllama("slice", junk, "--nodes", 2, "--out", tmp_path / "o", check=False)
    assert bad.returncode != 0 and len(error_lines(bad.stderr)) == 1 and "junk.gguf" in bad.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    blocked = tmp_path / "file"
    blocked.write_text("x")
    out = dllama("slice", smollm2_gguf, "--nodes", 2, "--out", blocked, "--quiet", check=False)
    assert out.returncode != 0 and len(error_lines(out.stderr)) == 1
    zero = dllama("slice", smollm2_gguf, "--nodes", 0, "--out", tmp_path / "z", check=False)
    assert zero.returncode != 0 and len(error_lines(zero.stderr)) == 1 and "--nodes" in zero.stderr
    assert not (tmp_path / "z").exists()


def test_slices_of_another_layout_are_refused(slices, tmp_path):
    """A slice file of another format version, or whose matrices are tiled differently than the
    kernels expect, is refused with one line that says to re-slice (never read as garbage)."""
    import shutil
    from dllama_mpi.quant import T
    from dllama_mpi.slicefile import VERSION, SliceError, SliceFile
    src = slices("auto", 1) / "rank-0-of-1.h5"
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(src, old / src.name)
    with h5py.File(old / src.name, "r+") as f:
        f.attrs["version"] = VERSION - 1
    proc = dllama("infer", "--model", old, "--prompt", "Hi", "--steps", 1, check=False)
    assert proc.returncode != 0
    (line,) = error_lines(proc.stderr)
    assert f"slice format version {VERSION - 1}" in line and "re-slice" in line

    retiled = tmp_path / "retiled"
    retiled.mkdir()
    shutil.copy(src, retiled / src.name)
    with h5py.File(retiled / src.name, "r+") as f:
        wd = f["layers/00/w2/wd"][()]                       # [ntile, nb, T]
        del f["layers/00/w2/wd"]
        f.create_dataset("layers/00/w2/wd", data=wd.reshape(wd.shape[0], wd.shape[1], 2, T // 2)
                         .transpose(0, 2, 1, 3).reshape(-1, wd.shape[1], T // 2))
    with pytest.raises(SliceError, match=f"layers/00/w2/wd has tiles of {T // 2} rows.*re-slice"):
        SliceFile(retiled / src.name)
