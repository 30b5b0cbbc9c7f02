"""End to end on the real SmolLM2-135M GGUF against transformers loading the same file."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

import reference
from helpers import dllama, error_lines, peak_rss_mib

PROMPT = "The history of the Roman Empire is"
TEXT = (__import__("pathlib").Path(__file__).parent / "data" / "perplexity.txt").read_text()


@pytest.fixture(scope="session")
def prompt_ids(smollm2_gguf):
    return reference.hf_tokenizer(str(smollm2_gguf)).encode(PROMPT, add_special_tokens=False)


@pytest.fixture(scope="session")
def hf_greedy(smollm2_gguf, prompt_ids):
    ids = reference.greedy(smollm2_gguf, prompt_ids, 32)
    eos = {0, 2}
    assert not eos & set(ids), "the reference continuation must not end early"
    return ids


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_f32_logits_and_greedy_match_transformers(n, slices, smollm2_gguf, prompt_ids, hf_greedy, tmp_path):
    out = tmp_path / "logits.npy"
    proc = dllama("infer", "--model", slices("f32", n), "--prompt-ids", ",".join(map(str, prompt_ids)),
                  "--steps", 32, "--temperature", 0, "--buffer-float-type", "f32", "--logits-out", out, np=n)
    ours = np.load(out)
    ref = reference.all_logits(smollm2_gguf, prompt_ids)[-1]
    assert ours.shape == ref.shape == (49152,)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-3, f"N={n}: max |logit diff| / max |logit| = {err:.2e}"
    text = reference.hf_tokenizer(str(smollm2_gguf)).decode(hf_greedy, skip_special_tokens=False,
                                                             clean_up_tokenization_spaces=False)
    assert proc.stdout == text + "\n"


def _perplexity(slices_dir, n, wire):
    proc = dllama("perplexity", "--model", slices_dir, "--file", __import__("pathlib").Path(__file__).parent
                  / "data" / "perplexity.txt", "--buffer-float-type", wire, np=n)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    return float(last.split()[1])


@pytest.fixture(scope="session")
def hf_perplexity(smollm2_gguf):
    ids = reference.hf_tokenizer(str(smollm2_gguf)).encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 256
    return reference.perplexity(smollm2_gguf, ids)


# q40 requantizes the Q4_1 model (+14-16% perplexity); its value moves by ~1% with rounding-level
# changes alone (measured: 23.26 -> 23.44 at N = 3 from the attention kernel's summation order and
# the float32 scale fix in quantize_q80), so its bound is 17%, not the 15% it once had 0.4% below.
@pytest.mark.parametrize("kind,n,tol", [("auto", 1, 0.02), ("auto", 3, 0.02), ("q40", 1, 0.17), ("q40", 3, 0.17)])
def test_perplexity_close_to_transformers(kind, n, tol, slices, hf_perplexity):
    ours = _perplexity(slices(kind, n), n, "q80")
    assert abs(ours / hf_perplexity - 1) <= tol, f"{kind} N={n}: {ours:.4f} vs transformers {hf_perplexity:.4f}"


def test_one_and_three_ranks_generate_the_same(slices):
    """f32 weights and f32 sync: the split changes only the order of float sums, so a long greedy
    run stays identical. (With quantized activations those last-bit differences can flip a Q80
    rounding and, many tokens later, a near-tie; that is why this is checked on f32 slices.)"""
    args = ["--prompt", "Once upon a time, in a small village", "--steps", 64, "--temperature", 0,
            "--buffer-float-type", "f32"]
    one = dllama("infer", "--model", slices("f32", 1), *args, np=1)
    three = dllama("infer", "--model", slices("f32", 3), *args, np=3)
    assert len(one.stdout) > 100
    assert one.stdout == three.stdout


def test_top_k_sampling_is_the_same_on_one_and_three_ranks(slices):
    """From 3 ranks only each rank's top-k logits travel; sampling must not notice."""
    args = ["--prompt", "My favourite food is", "--steps", 24, "--temperature", 0.9, "--top-k", 5, "--seed", 3,
            "--buffer-float-type", "f32"]
    one = dllama("infer", "--model", slices("f32", 1), *args, np=1)
    three = dllama("infer", "--model", slices("f32", 3), *args, np=3)
    assert one.stdout.strip() and one.stdout == three.stdout
    from dllama_mpi.config import SHAPES
    from dllama_mpi.plan import sync_bytes_per_token
    decode = three.stderr.split("decode: rank")[1].splitlines()[1:4]
    sent = [float(line.split()[-2]) for line in decode]
    cfg, parts = SHAPES["smollm2-135m"], [16384] * 3
    for r in (1, 2):  # each worker sends its 5 best logits (value + id), not its 16,384
        assert sent[r] == sync_bytes_per_token(cfg, 3, r, parts, "f32", topk=5)[0]
        assert sent[r] < sync_bytes_per_token(cfg, 3, r, parts, "f32")[0]


def test_runs_without_mpirun_as_one_rank(slices):
    single = dllama("infer", "--model", slices("auto", 1), "--prompt", "Paris is", "--steps", 8, "--temperature", 0)
    under = dllama("infer", "--model", slices("auto", 1), "--prompt", "Paris is", "--steps", 8, "--temperature", 0, np=1)
    assert single.stdout == under.stdout and single.stdout.strip()


def test_chat_answers_a_factual_question(slices):
    proc = dllama("infer", "--model", slices("auto", 2), "--chat", "--prompt", "What is the capital of France? Answer in one sentence.",
                  "--steps", 48, "--temperature", 0, np=2)
    assert "Paris" in proc.stdout
    assert "generated tokens" in proc.stderr


def test_peak_rss_is_mapped_weights_plus_kv_cache(slices):
    d = slices("auto", 2)
    seq = 512
    proc = dllama("infer", "--model", d, "--prompt", "Hello", "--steps", 16, "--temperature", 0,
                  "--max-seq-len", seq, np=2)
    rss = peak_rss_mib(proc.stderr)
    assert sorted(rss) == [0, 1]
    for r in (0, 1):
        path = d / f"rank-{r}-of-2.h5"
        with h5py.File(path) as f:
            s = __import__("json").loads(f.attrs["plan"])[r]
        kv = 2 * 30 * (s["kv_heads"][1] - s["kv_heads"][0]) * seq * 64 * 4
        bound = (path.stat().st_size + kv) / 2**20 + 200
        assert rss[r] <= bound, f"rank {r}: peak RSS {rss[r]} MiB > {bound:.0f} MiB"


# -- a bad slice set ends the job on every rank with one line, never a hang ------------------

def test_world_size_differs_from_slice_count(slices):
    proc = dllama("infer", "--model", slices("auto", 2), "--prompt", "Hi", "--steps", 2, np=3, check=False, timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "2 rank(s) but this job has 3" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_missing_rank_file(slices, tmp_path):
    import shutil
    d = tmp_path / "set"
    shutil.copytree(slices("auto", 2), d)
    (d / "rank-1-of-2.h5").unlink()
    proc = dllama("infer", "--model", d, "--prompt", "Hi", "--steps", 2, np=2, check=False, timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "rank-1-of-2.h5 is missing" in lines[0], proc.stderr


def test_slice_files_from_different_models(slices, fixtures_dir, tmp_path):
    import shutil
    other = tmp_path / "other"
    dllama("slice", fixtures_dir / "llama_tied" / "llama_tied-q4_0.gguf", "--nodes", 2, "--out", other, "--quiet")
    d = tmp_path / "mixed"
    shutil.copytree(slices("auto", 2), d)
    shutil.copy(other / "rank-1-of-2.h5", d / "rank-1-of-2.h5")
    proc = dllama("infer", "--model", d, "--prompt", "Hi", "--steps", 2, np=2, check=False, timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "different model" in lines[0], proc.stderr


def test_old_slice_format_version(slices, tmp_path):
    import shutil
    d = tmp_path / "old"
    shutil.copytree(slices("auto", 2), d)
    with h5py.File(d / "rank-1-of-2.h5", "r+") as f:
        f.attrs["version"] = 0
    proc = dllama("infer", "--model", d, "--prompt", "Hi", "--steps", 2, np=2, check=False, timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "re-slice with this version" in lines[0], proc.stderr


def test_truncated_rank_file(slices, tmp_path):
    import shutil
    d = tmp_path / "cut"
    shutil.copytree(slices("auto", 2), d)
    path = d / "rank-1-of-2.h5"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    proc = dllama("infer", "--model", d, "--prompt", "Hi", "--steps", 2, np=2, check=False, timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "rank-1-of-2.h5" in lines[0], proc.stderr


def test_threads_do_not_change_the_result(slices):
    args = ["--model", slices("auto", 1), "--prompt", "The river flows", "--steps", 12, "--temperature", 0]
    one = dllama("infer", *args, "--nthreads", 1)
    two = dllama("infer", *args, "--nthreads", 2)
    assert one.stdout == two.stdout and one.stdout.strip()
