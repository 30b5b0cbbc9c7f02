"""Every architecture, from files other tools wrote (llama.cpp's converter and quantizer, the
original distributed-llama converter), against logits computed by transformers.
See ../shared/fixtures/README.md for what each file and each reference is."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import dllama

# (model file, tokenizer file, --weights-float-type, reference, tolerance relative to max|logit|)
CASES = {
    "llama31-f16": ("llama31/llama31-f16.gguf", None, "f32", "hf", 1e-3),
    "qwen3-f16": ("qwen3/qwen3-f16.gguf", None, "f32", "hf", 1e-3),
    "qwen3moe-f16": ("qwen3moe/qwen3moe-f16.gguf", None, "f32", "hf", 1e-3),
    "llama_tied-q4_0": ("llama_tied/llama_tied-q4_0.gguf", None, "auto", "gguf_q4_0", 2e-2),
    "qwen2-q4_0": ("qwen2/qwen2-q4_0.gguf", None, "auto", "gguf_q4_0", 2e-2),
    "llama31-m": ("llama31/dllama_model_llama31_q40.m", "llama31/dllama_tokenizer_llama31.t", "auto", "m_q40", 2e-2),
    "qwen3-m": ("qwen3/dllama_model_qwen3_q40.m", "qwen3/dllama_tokenizer_qwen3.t", "auto", "m_q40", 2e-2),
}


def reference_logits(fixtures_dir, model: str, which: str) -> np.ndarray:
    folder = fixtures_dir / model.split("/")[0]
    if which == "m_q40":
        ref = json.loads((folder / "reference_m_q40.json").read_text())
    else:
        ref = json.loads((folder / "reference.json").read_text())
        if which == "gguf_q4_0":
            ref = ref["transformers_gguf_loader"]["q4_0"]
    return np.asarray(ref["last_logits"], np.float32)


@pytest.fixture(scope="module")
def run_case(fixtures_dir, tmp_path_factory):
    done = {}

    def run(case: str, n: int) -> np.ndarray:
        if (case, n) not in done:
            model, tok, kind, _, _ = CASES[case]
            ids = json.loads((fixtures_dir / model.split("/")[0] / "reference.json").read_text())["prompt_ids"]
            out = tmp_path_factory.mktemp(f"{case}-{n}")
            args = ["--tokenizer", fixtures_dir / tok] if tok else []
            dllama("slice", fixtures_dir / model, *args, "--nodes", n, "--out", out / "s",
                   "--weights-float-type", kind, "--quiet")
            dllama("infer", "--model", out / "s", "--prompt-ids", ",".join(map(str, ids)), "--steps", 1,
                   "--temperature", 0, "--buffer-float-type", "f32", "--logits-out", out / "l.npy", np=n)
            done[case, n] = np.load(out / "l.npy")
        return done[case, n]
    return run


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(case, n, run_case, fixtures_dir):
    model, _, _, which, tol = CASES[case]
    ref = reference_logits(fixtures_dir, model, which)
    ours = run_case(case, n)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= tol, f"{case} N={n}: max |diff| / max |logit| = {err:.2e} > {tol}"


@pytest.mark.parametrize("case", CASES)
def test_one_and_three_ranks_agree(case, run_case):
    one, three = run_case(case, 1), run_case(case, 3)
    err = np.abs(one - three).max() / np.abs(one).max()
    assert err <= 1e-4, f"{case}: N=1 vs N=3 differ by {err:.2e} of max |logit|"
