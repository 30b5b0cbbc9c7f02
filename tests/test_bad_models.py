"""Unsupported or broken model files: one clear `error:` line naming the file and the problem,
a non-zero exit, and no slice files left behind."""
from __future__ import annotations

import gguf
import pytest

import gguf_maker
from helpers import dllama, error_lines


def slice_fails(model, tmp_path, *extra):
    out = tmp_path / "out"
    proc = dllama("slice", model, "--nodes", 2, "--out", out, "--quiet", *extra, check=False)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir()), "no output files after an error"
    return lines[0]


def test_a_good_tiny_file_slices(tmp_path):
    """The maker's baseline file is valid, so each test below fails for its one defect only."""
    model = gguf_maker.write(tmp_path / "ok.gguf")
    dllama("slice", model, "--nodes", 2, "--out", tmp_path / "out", "--quiet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rank-0-of-2.h5", "rank-1-of-2.h5"]


def test_unknown_architecture(tmp_path):
    model = gguf_maker.write(tmp_path / "m.gguf", arch="mamba")
    line = slice_fails(model, tmp_path)
    assert "m.gguf" in line and "mamba" in line


def test_unsupported_tensor_type(tmp_path):
    # integer tensors are not weights anyone can dequantize
    model = gguf_maker.write(tmp_path / "m.gguf", types={"blk.0.attn_norm.weight": gguf.GGMLQuantizationType.I32})
    line = slice_fails(model, tmp_path)
    assert "m.gguf" in line and "I32" in line


def test_missing_tensor(tmp_path):
    model = gguf_maker.write(tmp_path / "m.gguf", drop={"blk.0.ffn_down.weight"})
    line = slice_fails(model, tmp_path)
    assert "m.gguf" in line and "ffn_down" in line


def test_shape_mismatch(tmp_path):
    model = gguf_maker.write(tmp_path / "m.gguf", shapes={"blk.0.attn_k.weight": (48, 64)})
    line = slice_fails(model, tmp_path)
    assert "m.gguf" in line and "attn_k" in line and "shape" in line


def test_tokenizer_larger_than_model_vocabulary(tmp_path):
    model = gguf_maker.write(tmp_path / "m.gguf", vocab_size=200)
    line = slice_fails(model, tmp_path)
    assert "m.gguf" in line and "vocab" in line


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tmp_path, keep):
    full = gguf_maker.write(tmp_path / "full.gguf")
    data = full.read_bytes()
    cut = tmp_path / "m.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    line = slice_fails(cut, tmp_path)
    assert "m.gguf" in line and "truncated" in line
