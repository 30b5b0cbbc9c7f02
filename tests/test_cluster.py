"""Running on a cluster: parallel slicing, SLURM job scripts on a real (one-node) SLURM, a
multi-host MPI job across network namespaces, the disk KV cache, and `plan`.

Needs root (SLURM daemons, network namespaces) and apt-get for the SLURM packages; a missing
piece is a failing test, never a skip."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from helpers import BIN, dllama, error_lines

ROOT = pathlib.Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
CLUSTER = pathlib.Path(__file__).resolve().parent / "cluster"
PROMPT = "Once upon a time, in a small village"


def run(cmd, timeout=120, check=True, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr}")
    return proc


# -- slicing in parallel ----------------------------------------------------------------------

def _h5_contents(path: pathlib.Path) -> dict:
    out = {}
    with h5py.File(path) as f:
        out["/"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}

        def visit(name, obj):
            attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                out[name] = (attrs, obj.dtype.str, obj.shape, obj[()].tobytes())
            else:
                out[name] = attrs
        f.visititems(visit)
    return out


def test_slice_under_mpirun_equals_the_serial_slicer(slices, smollm2_gguf, tmp_path):
    serial = slices("auto", 2)
    par = tmp_path / "par"
    proc = dllama("slice", smollm2_gguf, "--nodes", 2, "--out", par, "--quiet", np=2, timeout=300)
    assert sorted(p.name for p in par.iterdir()) == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    assert proc.stderr.count("rank-") == 2  # the root lists every rank's file, with its host
    for r in (0, 1):
        a, b = _h5_contents(serial / f"rank-{r}-of-2.h5"), _h5_contents(par / f"rank-{r}-of-2.h5")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k], f"rank {r}: {k} differs"
    # --ranks writes only the named ranks, with or without MPI
    one = tmp_path / "one"
    dllama("slice", smollm2_gguf, "--nodes", 2, "--ranks", 1, "--out", one, "--quiet", timeout=300)
    assert [p.name for p in one.iterdir()] == ["rank-1-of-2.h5"]
    assert _h5_contents(one / "rank-1-of-2.h5") == _h5_contents(serial / "rank-1-of-2.h5")


def test_slice_under_mpirun_errors_are_collective(smollm2_gguf, tmp_path):
    wrong = dllama("slice", smollm2_gguf, "--nodes", 3, "--out", tmp_path / "w", np=2, check=False, timeout=120)
    lines = error_lines(wrong.stderr)
    assert wrong.returncode != 0 and len(lines) == 1 and "2 rank(s) but --nodes is 3" in lines[0], wrong.stderr
    assert not (tmp_path / "w").exists()
    missing = dllama("slice", tmp_path / "nope.gguf", "--nodes", 2, "--out", tmp_path / "m", np=2, check=False,
                     timeout=120)
    lines = error_lines(missing.stderr)
    assert missing.returncode != 0 and len(lines) == 1 and "no such model file" in lines[0], missing.stderr
    assert re.search(r"\(rank [01]\)", lines[0])  # names the host and rank
    bad = dllama("slice", smollm2_gguf, "--nodes", 2, "--ranks", "0,2", "--out", tmp_path / "b", check=False)
    assert bad.returncode != 0 and "--ranks: 2" in error_lines(bad.stderr)[0]


# -- SLURM ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A one-node SLURM started by jobs/local-slurm.sh (which installs the packages if missing)."""
    env = dict(os.environ, LOCAL_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")), LOCAL_SLURM_PORT="6837")
    start = run(["bash", JOBS / "local-slurm.sh", "start"], timeout=900, check=False, env=env)
    try:
        assert start.returncode == 0, f"could not start a local SLURM:\n{start.stderr}"
        conf = re.search(r"export SLURM_CONF=(\S+)", start.stdout).group(1)
        yield dict(env, SLURM_CONF=conf, VENV=str(BIN.parent))
    finally:
        run(["bash", JOBS / "local-slurm.sh", "stop"], timeout=120, check=False, env=env)


def sbatch(env, script, *args, ntasks=2, out, **extra):
    """sbatch --wait: returns (exit code, stdout file text, stderr file text)."""
    job_env = dict(env, **{k: str(v) for k, v in extra.items()})
    proc = run(["sbatch", "--wait", "-n", ntasks, "-o", f"{out}.out", "-e", f"{out}.err", script, *args],
               timeout=300, check=False, env=job_env, cwd=out.parent)
    read = lambda p: p.read_text() if p.exists() else ""  # noqa: E731
    return proc.returncode, read(pathlib.Path(f"{out}.out")), read(pathlib.Path(f"{out}.err")) + proc.stderr


def test_slurm_jobs_slice_and_infer_like_mpirun(local_slurm, smollm2_gguf, tmp_path):
    sl = tmp_path / "slices"
    code, out, err = sbatch(local_slurm, JOBS / "slice.sbatch", out=tmp_path / "slice", MODEL=smollm2_gguf,
                            SLICES=sl, LAUNCHER="mpirun")
    assert code == 0, err
    assert sorted(p.name for p in sl.iterdir()) == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    code, out, err = sbatch(local_slurm, JOBS / "infer.sbatch", out=tmp_path / "infer", SLICES=sl, PROMPT=PROMPT,
                            STEPS=24, TEMPERATURE=0, LAUNCHER="srun")
    assert code == 0, err
    assert "--- dllama-mpi stats: 2 rank(s)" in err  # one 2-rank job, not two 1-rank jobs
    plain = dllama("infer", "--model", sl, "--prompt", PROMPT, "--steps", 24, "--temperature", 0, np=2)
    assert len(out) > 40 and out == plain.stdout


def test_slurm_job_with_the_wrong_task_count_fails_clearly(local_slurm, slices, tmp_path):
    code, out, err = sbatch(local_slurm, JOBS / "infer.sbatch", ntasks=1, out=tmp_path / "wrong",
                            SLICES=slices("auto", 2), PROMPT="Hi", STEPS=2)
    assert code != 0 and out == ""
    lines = error_lines(err)
    assert len(lines) == 1 and "slice set for 2 rank(s) but this allocation has 1 task(s)" in lines[0], err


def test_plain_srun_slicing_is_refused(local_slurm, smollm2_gguf, tmp_path):
    """srun without --mpi starts N 1-rank jobs: the slicer says so instead of racing on the files."""
    script = tmp_path / "plain.sbatch"
    script.write_text(f"#!/bin/sh\nsrun -n 2 {BIN / 'dllama-mpi'} slice {smollm2_gguf} --nodes 2 --out "
                      f"{tmp_path / 's'} --quiet\n")
    code, out, err = sbatch(local_slurm, script, out=tmp_path / "plain")
    assert code != 0 and "srun --mpi=pmi2" in err, err


# -- several hosts: network namespaces --------------------------------------------------------

HOSTS = 3


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory):
    """Namespaces PREFIX-h0..h2 (one per host) on a bridge, 1 Gbit tbf links; torn down at the end."""
    prefix = f"dlt{os.getpid() % 100000}"
    script = CLUSTER / "netns.sh"
    run(["bash", script, "down", prefix], check=False)
    try:
        run(["bash", script, "up", prefix, HOSTS])
        yield prefix
    finally:
        run(["bash", script, "down", prefix], check=False)
        left = run(["ip", "netns", "list"], check=False).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


def netns_mpiexec(prefix, hostdir, mount, args, timeout=180):
    """One rank per namespace, launched through ns-agent.sh; MPICH forced onto TCP (libfabric tcp)."""
    hosts = [f"{prefix}-h{i}" for i in range(HOSTS)]
    env = dict(os.environ, NS_HOSTDIR=str(hostdir), NS_MOUNT=str(mount), MPIR_CVAR_CH4_NETMOD="ofi",
               FI_PROVIDER="tcp", PATH=f"{BIN}:{os.environ['PATH']}")
    cmd = ["ip", "netns", "exec", f"{prefix}-ctl", BIN / "mpiexec", "-launcher", "ssh", "-launcher-exec",
           CLUSTER / "ns-agent.sh", "-localhost", "10.199.0.1", "-hosts", ",".join(hosts), "-n", HOSTS, "-ppn", 1,
           BIN / "dllama-mpi", *args]
    return run(cmd, timeout=timeout, check=False, env=env)


def tx_bytes(ns: str) -> int:
    link = json.loads(run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", "eth0"]).stdout)[0]
    return int(link["stats64"]["tx"]["bytes"])


def stats_rows(stderr: str) -> dict:
    """{phase: {rank: (host, sent B/token, recv B/token)}} from the stats block."""
    rows, phase = {}, None
    for line in stderr.splitlines():
        m = re.match(r"(prefill|decode): rank host", line)
        if m:
            phase = rows.setdefault(m.group(1), {})
            continue
        m = re.match(r"\s+(\d+) (\S+)\s+\S+\s+\S+\s+\S+\s+(\d+)\s+(\d+)$", line)
        if phase is not None and m:
            phase[int(m.group(1))] = (m.group(2), int(m.group(3)), int(m.group(4)))
    return rows


def _host_dirs(root: pathlib.Path, prefix: str, slice_dir: pathlib.Path, skip: int | None = None) -> pathlib.Path:
    for i in range(HOSTS):
        d = root / f"{prefix}-h{i}"
        d.mkdir(parents=True)
        if i != skip:
            os.link(slice_dir / f"rank-{i}-of-{HOSTS}.h5", d / f"rank-{i}-of-{HOSTS}.h5")
    return root


def test_three_hosts_over_tcp_match_one_rank(netns_cluster, slices, tmp_path):
    prefix = netns_cluster
    hostdir = _host_dirs(tmp_path / "disks", prefix, slices("f32", HOSTS))
    mount = tmp_path / "models" / "x"  # every host sees only its own disk here
    mount.mkdir(parents=True)
    args = ["--prompt", PROMPT, "--steps", 24, "--temperature", 0, "--buffer-float-type", "f32"]
    before = [tx_bytes(f"{prefix}-h{i}") for i in range(HOSTS)]
    proc = netns_mpiexec(prefix, hostdir, mount, ["infer", "--model", mount, *args])
    assert proc.returncode == 0, proc.stderr
    grown = [tx_bytes(f"{prefix}-h{i}") - b for i, b in enumerate(before)]
    one = dllama("infer", "--model", slices("f32", 1), *args)
    assert len(one.stdout) > 40 and proc.stdout == one.stdout
    assert list(mount.iterdir()) == []  # the bind mounts lived only in the ranks' mount namespaces
    rows = stats_rows(proc.stderr)
    prompt_tokens = int(re.search(r"prompt tokens:\s+(\d+)", proc.stderr).group(1))
    new_tokens = int(re.search(r"generated tokens:\s+(\d+)", proc.stderr).group(1))
    counted = []
    for i in range(HOSTS):
        assert rows["decode"][i][0] == f"{prefix}-h{i}"  # one rank per namespace, named by its host
        # per-token figures are rounded: take the lower bound; decode ran >= new_tokens - 1 forwards
        counted.append((rows["prefill"][i][1] - 0.5) * prompt_tokens + (rows["decode"][i][1] - 0.5) * (new_tokens - 1))
        # every host really sent its share over its (1 Gbit) link, not through shared memory
        assert grown[i] > 0.5 * counted[i] > 5e5, f"host {i}: veth sent {grown[i]} B, MPI counted {counted[i]:.0f} B"
    # collectives.py counts the ring all-reduce's 2b(N-1)/N a rank; MPICH's recursive doubling with
    # 3 ranks moves more in total but less from rank 0, so the totals are what must agree
    assert sum(grown) >= sum(counted), f"veth sent {grown} B < MPI payload {counted} B"


def test_a_host_missing_its_file_fails_the_job_with_its_name(netns_cluster, slices, tmp_path):
    prefix = netns_cluster
    hostdir = _host_dirs(tmp_path / "disks", prefix, slices("f32", HOSTS), skip=1)
    mount = tmp_path / "models" / "x"
    mount.mkdir(parents=True)
    proc = netns_mpiexec(prefix, hostdir, mount, ["infer", "--model", mount, "--prompt", "Hi", "--steps", 2],
                         timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}-h1: ") and \
        f"{mount}/rank-1-of-3.h5 is missing" in lines[0], proc.stderr


# -- KV cache on disk -------------------------------------------------------------------------

def test_disk_kv_cache_matches_memory_and_leaves_nothing(slices, tmp_path):
    kv = tmp_path / "kv"
    kv.mkdir()
    d = slices("auto", 2)
    args = ["--model", d, "--prompt", PROMPT, "--steps", 24, "--temperature", 0, "--max-seq-len", 256]
    mem = dllama("infer", *args, np=2)
    disk = dllama("infer", *args, "--kv-cache-storage", "disk", "--kv-cache-dir", kv, np=2)
    assert len(mem.stdout) > 40 and disk.stdout == mem.stdout
    assert list(kv.iterdir()) == []
    ppl = [dllama("perplexity", "--model", d, "--file", ROOT / "tests" / "data" / "perplexity.txt",
                  "--max-seq-len", 128, *extra, np=2).stdout.splitlines()[-1]
           for extra in ([], ["--kv-cache-storage", "disk", "--kv-cache-dir", kv])]
    assert ppl[0] == ppl[1] and ppl[0].startswith("perplexity: ")
    assert list(kv.iterdir()) == []
    # a run that fails after the cache exists, and one killed in the middle of generating
    bad = dllama("infer", "--model", d, "--prompt-ids", "1,999999", "--kv-cache-storage", "disk",
                 "--kv-cache-dir", kv, np=2, check=False)
    assert bad.returncode != 0 and "outside the vocabulary" in bad.stderr
    assert list(kv.iterdir()) == []
    p = subprocess.Popen([str(BIN / "mpirun"), "-np", "2", str(BIN / "dllama-mpi"), "infer", "--model", str(d),
                          "--prompt", PROMPT, "--steps", "4000", "--max-seq-len", "4096", "--kv-cache-storage", "disk",
                          "--kv-cache-dir", str(kv)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        assert p.stdout.read(8)  # generating
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    time.sleep(0.5)
    assert list(kv.iterdir()) == []
    # a KV folder that does not exist on a host: one clear line from the root
    nodir = dllama("infer", "--model", d, "--prompt", "Hi", "--steps", 2, "--kv-cache-storage", "disk",
                   "--kv-cache-dir", tmp_path / "nope", np=2, check=False, timeout=120)
    lines = error_lines(nodir.stderr)
    assert nodir.returncode != 0 and len(lines) == 1 and "--kv-cache-dir" in lines[0], nodir.stderr


# -- plan -------------------------------------------------------------------------------------

def plan_json(*args) -> dict:
    return json.loads(dllama("plan", *args, "--bandwidth", 10, "--json").stdout)


def test_plan_llama31_8b_on_4_nodes():
    from dllama_mpi.config import SHAPES
    from dllama_mpi.partition import plan as partition_plan
    c = SHAPES["llama3.1-8b"]
    p = plan_json("--shape", "llama3.1-8b", "--nodes", 4, "--ram-per-node", "8GB", "--max-seq-len", 4096)
    assert len(p["ranks"]) == 4 and p["fits"] == [True] * 4
    for r, s in zip(p["ranks"], partition_plan(c, 4)):
        assert (tuple(r["heads"]), tuple(r["kv_heads"]), tuple(r["ffn"]), tuple(r["vocab"])) == \
            (s.heads, s.kv_heads, s.ffn, s.vocab)
        assert r["kv_bytes"] == 2 * 32 * 2 * 4096 * 128 * 4
        assert (r["embedding_bytes"] > 0) == (r["rank"] == 0)
    # the shape's parameters at the bytes each kind takes in a slice file (q40 20/32, q80 head 36/32);
    # each rank's head rows (128256 / 4 = 32064) are padded to whole kernel tiles
    from dllama_mpi.quant import T
    head_rows = sum(-(-(v1 - v0) // T) * T for v0, v1 in (s.vocab for s in partition_plan(c, 4)))
    assert head_rows > c.vocab_size   # 32064 is not a multiple of T = 128: the padding is counted
    layer = c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.hidden_dim
    weights = c.n_layers * layer * 20 / 32 + head_rows * c.dim * 36 / 32 + (2 * c.n_layers + 1) * c.dim * 4 * 4
    embedding = c.vocab_size * c.dim * 18 / 32
    assert sum(r["weight_bytes"] for r in p["ranks"]) == pytest.approx(weights, rel=1e-6)
    assert p["ranks"][0]["embedding_bytes"] == pytest.approx(embedding, rel=1e-6)
    # sync per token at 4 ranks (ring): per layer 2 reduce-scatter + all-gather rounds, each moving
    # 2 x 3/4 of the dim values' Q80 records (36 B per 32 values) in and out of every rank
    sync = 2 * 32 * 2 * (4096 // 32 * 36 * 3 // 4)
    assert p["ranks"][1]["sent_per_token"] == sync + 4 * (c.vocab_size // 4)
    assert p["ranks"][0]["recv_per_token"] == sync + 4 * (c.vocab_size - c.vocab_size // 4)
    assert 0 < p["estimate"]["tokens_per_second"] < 10 / (weights / 4 / 1e9)
    big = plan_json("--shape", "llama3.1-70b", "--nodes", 4, "--ram-per-node", "8GB")
    assert big["fits"] == [False] * 4
    text = dllama("plan", "--shape", "llama3.1-8b", "--nodes", 4, "--ram-per-node", "8GB", "--bandwidth", 10).stdout
    assert "ESTIMATE" in text and "fits: yes" in text


def test_plan_agrees_with_real_slice_files(slices, smollm2_gguf):
    d = slices("auto", 2)
    from_set = plan_json(d, "--nodes", 2)
    from_file = plan_json(smollm2_gguf, "--nodes", 2)
    for a, b in zip(from_set["ranks"], from_file["ranks"]):
        assert a["weight_bytes"] == b["weight_bytes"] and a["embedding_bytes"] == b["embedding_bytes"]
    for r in from_set["ranks"]:
        size = (d / f"rank-{r['rank']}-of-2.h5").stat().st_size
        with h5py.File(d / f"rank-{r['rank']}-of-2.h5") as f:
            tokenizer = f["tokenizer"].size
        overhead = size - tokenizer - r["weight_bytes"] - r["embedding_bytes"]
        assert 0 <= overhead < 2e6, f"rank {r['rank']}: file {size} B vs plan {r['weight_bytes']} B"


def test_plan_ram_table_for_info():
    from dllama_mpi.config import SHAPES
    from dllama_mpi.plan import ram_per_rank, storage_for_type
    table = ram_per_rank(SHAPES["llama3.1-70b"], storage_for_type("q40"))
    assert sorted(table) == [1, 2, 4, 8] and [len(v) for v in table.values()] == [1, 2, 4, 8]
    assert table[1][0] > 2 * table[2][1] > 4 * table[8][7] * 0.9
    bad = dllama("plan", "--shape", "llama9", "--nodes", 2, check=False)
    assert bad.returncode != 0 and "unknown shape" in error_lines(bad.stderr)[0]
