"""Hugging Face folders of every architecture, written by transformers' own save_pretrained,
sliced and run end to end at N = 1 and 3: the logits must match transformers' on the same folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import dllama
from test_hf_reader import LLAMA3, MOE, _save, tokenizer_dir  # noqa: F401  (tokenizer_dir is a fixture)

PROMPT = [5, 17, 42, 99, 200, 301, 7, 8, 150, 64, 33]
MODELS = {
    "llama3.1-untied": ("llama", dict(rope_parameters=dict(LLAMA3), tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "mistral-bf16-sharded": ("mistral", dict(dtype=torch.bfloat16, shard="40KB", head_dim=16, sliding_window=None,
                                             tie_word_embeddings=False)),
    "qwen2-f16-biases": ("qwen2", dict(dtype=torch.float16, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-sharded": ("qwen3", dict(shard="60KB", head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen3moe": ("qwen3moe", dict(MOE)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):  # noqa: F811
    made = {}

    def make(name):
        if name not in made:
            kind, cfg = MODELS[name]
            folder = tmp_path_factory.mktemp(name)
            _save(kind, folder, tokenizer_dir, seed=7, **cfg)
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            with torch.no_grad():
                ref = model(torch.tensor([PROMPT]), use_cache=False).logits[0, -1].float().numpy()
            made[name] = folder, ref
        return made[name]
    return make


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name, n, folders, tmp_path):
    folder, ref = folders(name)
    dllama("slice", folder, "--nodes", n, "--out", tmp_path / "s", "--weights-float-type", "f32", "--quiet")
    dllama("infer", "--model", tmp_path / "s", "--prompt-ids", ",".join(map(str, PROMPT)), "--steps", 1,
           "--temperature", 0, "--buffer-float-type", "f32", "--logits-out", tmp_path / "l.npy", np=n)
    ours = np.load(tmp_path / "l.npy")
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-3, f"{name} N={n}: max |diff| / max |logit| = {err:.2e}"
