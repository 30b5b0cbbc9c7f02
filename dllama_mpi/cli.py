"""The `dllama-mpi` command line: thin click commands that parse options and call the package."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import traceback

import click

from .config import SHAPES

WEIGHT_TYPES = ["auto", "q40", "q41", "q80", "f32"]


def fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dllama-mpi")
def cli():
    """Tensor-parallel LLM inference across several computers as one MPI job."""


def main():
    """Console entry point: click's usage errors become one `error:` line like ours."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        fail("interrupted", 130)
    except click.ClickException as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        fail(e.format_message() + hint, e.exit_code)


# -- slice ----------------------------------------------------------------------------------

def mpi_launched() -> bool:
    """True when an MPI launcher (mpirun/mpiexec, srun with PMI) started this process: read from
    the environment only, so a plain `dllama-mpi slice` never initializes MPI."""
    env = os.environ
    if any(k in env for k in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")):
        return True
    # an srun step of several tasks: with --mpi=pmi2 PMI_* is set; without it, see _slice_mpi
    return "SLURM_STEP_ID" in env and _int_env("SLURM_STEP_NUM_TASKS") > 1


def _int_env(name: str, default: int = 1) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _parse_ranks(text: str, nodes: int) -> list[int]:
    try:
        ranks = sorted({int(t) for t in text.replace(" ", "").split(",") if t})
    except ValueError:
        fail(f"--ranks must be comma-separated integers, got {text!r}")
    if not ranks:
        fail("--ranks is empty")
    bad = [r for r in ranks if not 0 <= r < nodes]
    if bad:
        fail(f"--ranks: {bad[0]} is not a rank of a {nodes}-rank set (0..{nodes - 1})")
    return ranks


_stop_signals: list[int] = []


def _stop_on_signals() -> None:
    """Ctrl-C / SIGTERM only set a flag; the slicer checks it between tensors (in `progress`).
    Raising straight from a signal handler can land inside a library's cleanup callback, where
    Python prints the exception and carries on."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: _stop_signals.append(signum))


def _progress_bar(quiet: bool):
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=1, unit="tensor", file=sys.stderr, desc="slicing")

    def progress(i, total, name):
        if _stop_signals:  # unwinds through write_slices, which removes its temporary files
            raise KeyboardInterrupt
        if bar:
            bar.total = total
            bar.set_postfix_str(name, refresh=False)
            bar.update(i - bar.n)
    return bar, progress


def _write(model, nodes, out, weights_float_type, head_float_type, ranks, quiet):
    """Slice `ranks` of `model` into out; returns (paths, None) or (None, error line)."""
    from .readers import ModelError
    from .slicefile import SliceError, write_slices
    bar, progress = _progress_bar(quiet)
    try:
        paths = write_slices(model, nodes, out, weights_float_type, ranks=ranks, progress=progress,
                             head_type=head_float_type)
    except (ModelError, SliceError, ValueError) as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot write slices to {out}: {e.strerror or e}"
    finally:
        if bar:
            bar.close()
    return paths, None


@cli.command("slice")
@click.argument("source", type=click.Path(path_type=pathlib.Path))
@click.option("--nodes", "-n", type=click.IntRange(1, 4096), required=True, help="Number of ranks of the job that will run it.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=pathlib.Path), required=True, help="Folder for rank-R-of-N.h5.")
@click.option("--weights-float-type", type=click.Choice(WEIGHT_TYPES), default="auto", show_default=True,
              help="auto keeps each matrix's blocks when a kernel reads them, else requantizes to q40.")
@click.option("--head-float-type", type=click.Choice(WEIGHT_TYPES), default="auto", show_default=True,
              help="LM head: auto follows --weights-float-type but keeps 8 bits (q80) when that is 4-bit.")
@click.option("--ranks", "ranks_text", metavar="R1,R2",
              help="Write only these ranks' files [default: all; under mpirun each rank writes its own].")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="The .t tokenizer file that goes with a distributed-llama .m model.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def slice_cmd(source, nodes, out, weights_float_type, head_float_type, ranks_text, tokenizer, quiet):
    """Pre-split a model into one HDF5 slice file per rank. SOURCE is a GGUF file, a Hugging
    Face folder (config.json + safetensors + tokenizer.json), or a distributed-llama .m file
    (with --tokenizer FILE.t).

    Under `mpirun -np N` (or `srun --mpi=pmi2`) every rank writes its own rank-R-of-N.h5 on its
    own host, in parallel: the world size must equal --nodes, unless --ranks says which files
    the job writes (then they are dealt out over the ranks)."""
    ranks = _parse_ranks(ranks_text, nodes) if ranks_text is not None else None
    _stop_on_signals()  # SIGTERM (kill, a cancelled batch job) unwinds like Ctrl-C
    if mpi_launched():
        sys.exit(_slice_mpi(source, nodes, out, weights_float_type, head_float_type, ranks, tokenizer, quiet))
    from .readers import ModelError, open_model
    if not source.exists():
        fail(f"{source}: no such model file")
    try:
        model = open_model(source, tokenizer=tokenizer)
    except (ModelError, ValueError) as e:
        fail(str(e))
    paths, err = _write(model, nodes, out, weights_float_type, head_float_type, ranks, quiet)
    if err:
        fail(err)
    for p in paths:
        click.echo(f"{p} ({p.stat().st_size / 1e6:.1f} MB)", err=True)


def _slice_mpi(source, nodes, out, weights_float_type, head_float_type, ranks, tokenizer, quiet) -> int:
    """The parallel slicer: each rank checks its source, then writes its files; every step's
    outcome is agreed by all ranks, so any rank's problem ends the job with one `error:` line."""
    from .collectives import Collectives, processor_name
    from .readers import ModelError, open_model
    comm = Collectives()
    host, me, world = processor_name(), comm.rank, comm.size
    steps = _int_env("SLURM_STEP_NUM_TASKS")
    if world == 1 and steps > 1 and "SLURM_STEP_ID" in os.environ and "PMI_RANK" not in os.environ:
        fail(f"srun started {steps} separate 1-rank jobs: launch with `srun --mpi=pmi2` (MPICH) or "
             f"`mpirun -np {steps}` inside the allocation")

    def agree(err, result=None):
        """Every rank's (error, result); on any error the root prints one line and all exit 2."""
        views = comm.allgather_object((err, result))
        errors = list(dict.fromkeys(e for e, _ in views if e))
        if errors:
            if me == 0:
                click.echo("error: " + "; ".join(errors), err=True)
            return None
        return [r for _, r in views]

    if ranks is None:
        if world != nodes:
            err = (f"this job has {world} rank(s) but --nodes is {nodes}: run it with mpirun -np {nodes}, "
                   f"or pass --ranks to choose which slice files this job writes")
            agree(err)
            return 2
        mine = [me]
    else:
        mine = ranks[me::world]  # dealt out: rank i writes ranks[i], ranks[i + world], ...
    # 1. every host opens its own copy of the source; all copies must be the same file
    model, err, digest = None, None, None
    if mine:
        try:
            if not source.exists():
                raise ModelError(f"{source}: no such model file")
            model = open_model(source, tokenizer=tokenizer)
            digest = model.digest()
        except (ModelError, ValueError, OSError) as e:
            err = f"{host} (rank {me}): {e}"
    views = agree(err, digest)
    if views is None:
        return 2
    digests = {d for d in views if d}
    if len(digests) > 1:
        ref = next(d for d in views if d)
        bad = [r for r, d in enumerate(views) if d and d != ref]
        if me == 0:
            click.echo(f"error: {source} on rank(s) {bad} differs from the first host's copy (sha256): "
                       f"give every host the same model file", err=True)
        return 2
    # 2. write this rank's files
    paths, err = ([], None) if not mine else \
        _write(model, nodes, out, weights_float_type, head_float_type, mine, quiet or me != 0)
    if err:
        err = f"{host} (rank {me}): {err}"
    written = [(str(p), p.stat().st_size) for p in paths or []]
    views = agree(err, (host, written))
    if views is None:
        return 2
    if me == 0:
        for h, files in views:
            for p, size in files:
                click.echo(f"{h}: {p} ({size / 1e6:.1f} MB)", err=True)
    return 0


# -- running jobs ---------------------------------------------------------------------------

def runtime_options(f):
    f = click.option("--model", "-m", type=click.Path(path_type=pathlib.Path), required=True,
                     help="Folder holding the slice set (rank-R-of-N.h5).")(f)
    f = click.option("--buffer-float-type", type=click.Choice(["q80", "f32"]), default="q80", show_default=True,
                     help="Wire format of the per-layer all-reduce.")(f)
    f = click.option("--nthreads", type=click.IntRange(1, 1024), default=1, show_default=True,
                     help="OpenMP threads per rank.")(f)
    f = click.option("--sync", type=click.Choice(["auto", "allgather", "ring"]), default="auto", show_default=True,
                     help="q80 all-reduce: all-gather of partials, or reduce-scatter + all-gather (auto: ring from 3 ranks).")(f)
    f = click.option("--max-seq-len", type=click.IntRange(2, None), default=None,
                     help="KV cache length [default: the model's context, at most 4096].")(f)
    f = click.option("--kv-cache-storage", type=click.Choice(["memory", "disk"]), default="memory", show_default=True,
                     help="disk: one memory-mapped file per rank in --kv-cache-dir, removed at exit.")(f)
    f = click.option("--kv-cache-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
                     help="Folder for --kv-cache-storage disk, on each host [default: $TMPDIR or /tmp].")(f)
    return f


def run_job(opts: dict, root_fn, make_slice=None, setup=None):
    """Start the engine on every rank; the root runs root_fn(engine), workers serve it.
    make_slice(comm) gives this rank's weights instead of its slice file (bench); setup(engine)
    runs on every rank before the root starts (bench's bandwidth measurement).
    Any rank's failure ends the whole job: collectively when it can, by MPI_Abort if not."""
    os.environ["OMP_NUM_THREADS"] = str(opts["nthreads"])  # before the kernels are loaded
    from .collectives import Collectives
    from .engine import Engine, StartupError
    from .generate import UsageError
    comm = Collectives(sync=opts.get("sync", "auto"))
    try:
        engine = Engine(opts["model"], comm, opts["max_seq_len"], opts["buffer_float_type"],
                        kv_storage=opts.get("kv_cache_storage", "memory"), kv_dir=opts.get("kv_cache_dir"),
                        rank_slice=make_slice(comm) if make_slice else None)
        if setup:
            setup(engine)
    except StartupError as e:
        if comm.rank == 0:
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except BaseException:
        traceback.print_exc()
        click.echo(f"error: rank {comm.rank} failed to start: aborting the job", err=True)
        comm.abort(1)
    if comm.rank != 0:
        try:
            code = engine.serve()
        except BaseException:
            traceback.print_exc()
            click.echo(f"error: rank {comm.rank} failed: aborting the job", err=True)
            comm.abort(1)
        sys.exit(code)
    code = 0
    try:
        root_fn(engine)
    except UsageError as e:
        click.echo(f"error: {e}", err=True)
        code = 2
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            traceback.print_exc()
        click.echo("error: the root failed: aborting the job", err=True)
        comm.abort(1)
    stats = engine.stop(code)
    return code, stats


def print_stats(gen, stats: list[dict], wire: str) -> None:
    e = lambda s: click.echo(s, err=True)  # noqa: E731
    e("")
    e(f"--- dllama-mpi stats: {len(stats)} rank(s), sync {wire} ---")
    pre = f"{gen.prompt_tokens / gen.prefill_seconds:.1f} tok/s" if gen.prefill_seconds else "-"
    dec = f"{gen.new_tokens / gen.decode_seconds:.1f} tok/s" if gen.decode_seconds and gen.new_tokens else "-"
    e(f"prompt tokens:    {gen.prompt_tokens:6d}   prefill {pre}")
    e(f"generated tokens: {gen.new_tokens:6d}   decode  {dec}")
    for phase in ("prefill", "decode"):
        e(f"{phase}: rank host          ms/token  compute     mpi  sent B/token  recv B/token")
        for s in stats:
            p = s["phases"][phase]
            n = max(p["tokens"], 1)
            e(f"{'':9s}{s['rank']:4d} {s['host'][:12]:12s} {1e3 * p['seconds'] / n:9.2f} "
              f"{1e3 * (p['seconds'] - p['mpi_seconds']) / n:8.2f} {1e3 * p['mpi_seconds'] / n:7.2f} "
              f"{p['sent'] / n:13.0f} {p['recv'] / n:13.0f}")
    e("peak RSS: " + ", ".join(f"rank {s['rank']} {s['peak_rss'] / 2**20:.0f} MiB" for s in stats))


def load_tokenizer(engine):
    from .readers import TokenizerSpec
    from .tokenizer import Tokenizer
    return Tokenizer(TokenizerSpec.from_json(engine.slice.tokenizer_json))


def save_npy(path: pathlib.Path, arr) -> None:
    import numpy as np
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


@cli.command()
@runtime_options
@click.option("--prompt", "-p", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids (no tokenizer involved).")
@click.option("--steps", "-s", type=click.IntRange(0, None), default=64, show_default=True, help="New tokens at most.")
@click.option("--chat", is_flag=True, help="Render the model's chat template with the prompt as one user message.")
@click.option("--temperature", "-t", type=click.FloatRange(0, None), default=0.8, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--top-k", type=click.IntRange(0, None), default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None, help="Sampling seed [default: random].")
@click.option("--logits-out", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Save the float32 logits of the last prompt position (.npy).")
def infer(prompt, prompt_ids, steps, chat, temperature, top_p, top_k, seed, logits_out, **opts):
    """Generate text from a prompt; stdout carries only the generated text."""
    if (prompt is None) == (prompt_ids is None):
        fail("give exactly one of --prompt or --prompt-ids")
    ids = None
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            fail(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}")
        if chat:
            fail("--chat needs --prompt text, not --prompt-ids")
    if logits_out is not None and not logits_out.parent.is_dir():
        fail(f"--logits-out: folder {logits_out.parent} does not exist")
    from .generate import Generation, UsageError
    from .sampling import Sampler
    sampler = Sampler(temperature, top_k, top_p, seed)
    state = {}

    def root(engine):
        tok = load_tokenizer(engine)
        nonlocal ids
        if ids is None:
            ids = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]), add_bos=False) if chat \
                else tok.encode(prompt)
        bad = [i for i in ids if not 0 <= i < engine.config.vocab_size]
        if bad:
            raise UsageError(f"--prompt-ids: {bad[0]} is outside the vocabulary (0..{engine.config.vocab_size - 1})")
        gen = state["gen"] = Generation(engine, tok, sampler)

        def emit(text):
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
        gen.run(ids, steps, emit)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if logits_out is not None:
            save_npy(logits_out, gen.last_prompt_logits.astype("float32"))

    code, stats = run_job(opts, root)
    if code == 0:
        print_stats(state["gen"], stats, opts["buffer_float_type"])
    sys.exit(code)


@cli.command()
@runtime_options
@click.option("--file", "-f", "path", type=click.Path(dir_okay=False, path_type=pathlib.Path), required=True,
              help="UTF-8 text to score.")
def perplexity(path, **opts):
    """Teacher-forced perplexity of a text file; last stdout line is `perplexity: X`."""
    if not path.is_file():
        fail(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text")
    from .generate import perplexity as run_perplexity

    def root(engine):
        ids = load_tokenizer(engine).encode(text)
        ppl, n = run_perplexity(engine, ids, engine.max_seq_len)
        click.echo(f"scored {n} tokens of {len(ids)} in windows of {engine.max_seq_len}", err=True)
        click.echo(f"perplexity: {ppl:.4f}")

    code, _ = run_job(opts, root)
    sys.exit(code)


# -- plan -----------------------------------------------------------------------------------

@cli.command("plan")
@click.argument("model", required=False, type=click.Path(path_type=pathlib.Path))
@click.option("--shape", help="A named model shape instead of a file: "
              "smollm2-135m, llama3.1-8b, llama3.1-70b, llama3.1-405b, ... (see config.SHAPES).")
@click.option("--nodes", "-n", type=click.IntRange(1, 4096), required=True, help="Ranks (one per node).")
@click.option("--weights-float-type", type=click.Choice(WEIGHT_TYPES), default="auto", show_default=True,
              help="As for `slice` (a --shape takes auto as q40). Ignored for a slice-set folder.")
@click.option("--head-float-type", type=click.Choice(WEIGHT_TYPES), default="auto", show_default=True)
@click.option("--ram-per-node", metavar="SIZE", help="RAM of each node, e.g. 8GB, 16GB (binary: 8GB = 8 GiB).")
@click.option("--max-seq-len", type=click.IntRange(2, None), default=None,
              help="KV cache length [default: the model's context, at most 4096].")
@click.option("--buffer-float-type", type=click.Choice(["q80", "f32"]), default="q80", show_default=True,
              help="Wire format of the per-layer sync.")
@click.option("--link", default="1gbit", show_default=True, help="Network link rate per node (100mbit, 1gbit, 10gbit).")
@click.option("--latency-us", type=click.FloatRange(0, None), default=None,
              help="Latency per MPI message [default: 50 µs at 1gbit, 20 µs at 10gbit].")
@click.option("--bandwidth", type=click.FloatRange(0, None, min_open=True), default=None, metavar="GB/s",
              help="Speed a rank streams weights at [default: the q40 kernel, measured here on one thread].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_cmd(model, shape, nodes, weights_float_type, head_float_type, ram_per_node, max_seq_len,
             buffer_float_type, link, latency_us, bandwidth, as_json):
    """What each rank of an N-node job holds (weights, KV cache, buffers), whether it fits in
    --ram-per-node, the bytes each rank syncs per token, and an ESTIMATED decode speed."""
    from . import plan as P
    try:
        name, cfg, storage = P.open_target(None if model is None else str(model), shape, weights_float_type,
                                           head_float_type)
        ram = P.parse_size(ram_per_node) if ram_per_node else None
        link_bits = P.parse_link(link)
        job = P.plan_job(cfg, storage, nodes, max_seq_len, buffer_float_type, name)
    except (P.PlanError, ValueError) as e:
        fail(str(e))
    if latency_us is None:
        latency_us = P.LINK_LATENCY_US.get(link.lower().strip(), 50.0 if link_bits <= 1e9 else 20.0)
    if bandwidth:
        bw = bandwidth * 1e9
    else:  # how fast one rank's kernel streams weights here, one thread (unless OMP_NUM_THREADS says)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from . import kernels
        from .bench import kernel_streaming
        bw = kernel_streaming(kernels)
    est = P.estimate(job, bw, link_bits, latency_us)
    click.echo(P.to_json(job, est, ram) if as_json else P.report(job, est, ram, link))


@cli.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), help="Random weights of this model shape (no files).")
@click.option("--model", "-m", type=click.Path(path_type=pathlib.Path), help="A slice set instead of --shape.")
@click.option("--weights-float-type", type=click.Choice(["q40", "q41", "q80", "f32"]), default="q40", show_default=True,
              help="With --shape: the matrices' kind.")
@click.option("--head-float-type", type=click.Choice(["q40", "q41", "q80", "f32"]), default=None,
              help="With --shape: the LM head's kind [default: --weights-float-type].")
@click.option("--buffer-float-type", type=click.Choice(["q80", "f32"]), default="q80", show_default=True)
@click.option("--sync", type=click.Choice(["auto", "allgather", "ring"]), default="auto", show_default=True)
@click.option("--nthreads", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(1, 100), default=5, show_default=True, help="Repeats; the median is reported.")
@click.option("--prompt-tokens", type=click.IntRange(1, 8192), default=256, show_default=True, help="Prefill length.")
@click.option("--steps", type=click.IntRange(1, 8192), default=64, show_default=True,
              help="Decoded tokens per run, from an empty context and after the prompt.")
@click.option("--plan-only", is_flag=True, help="Print the bytes each rank syncs per token at --nodes; run nothing.")
@click.option("--nodes", type=click.IntRange(1, 4096), default=None, help="With --plan-only: the rank count.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def bench(shape, model, weights_float_type, head_float_type, buffer_float_type, sync, nthreads, runs, prompt_tokens,
          steps, plan_only, nodes, as_json):
    """Decode and prefill speed, next to the memory bandwidth measured in the same run. Run it
    under mpirun like infer; --shape needs no files."""
    if (shape is None) == (model is None):
        fail("give --shape NAME or --model SLICE_DIR (one of them)")
    if plan_only:
        from . import plan as P
        try:
            name, cfg, _ = P.open_target(None if model is None else str(model), shape)
        except P.PlanError as e:
            fail(str(e))
        from .partition import plan as partition_plan
        n = nodes or 1
        parts = [b - a for a, b in (s.vocab for s in partition_plan(cfg, n))]
        rows = [P.sync_bytes_per_token(cfg, n, r, parts, buffer_float_type, sync, topk=1) for r in range(n)]
        if as_json:
            click.echo(json.dumps({"shape": name, "ranks": n, "sent_bytes_per_token": [s for s, _ in rows],
                                   "recv_bytes_per_token": [r for _, r in rows]}))
        else:
            click.echo(f"{name} on {n} rank(s), sync {buffer_float_type}: bytes per decoded token")
            for r, (snt, rcv) in enumerate(rows):
                click.echo(f"  rank {r}: sent {snt}, received {rcv}")
        return
    from . import bench as B
    head = head_float_type or weights_float_type
    opts = {"model": model, "nthreads": nthreads, "max_seq_len": prompt_tokens + steps + 1,
            "buffer_float_type": buffer_float_type, "sync": sync}
    state = {}

    def make_slice(comm):
        return B.RandomSlice(SHAPES[shape], comm.size, comm.rank, weights_float_type, head)

    def setup(engine):
        from . import kernels
        comm = engine.comm
        bw = B.measure_bandwidth(kernels, comm)
        state["bandwidth"] = comm.gather_object(bw)
        state["weights"] = comm.gather_object(engine.slice.weight_bytes())
        state["kinds"] = engine.slice.weight_types

    def root(engine):
        state["speeds"] = B.run(engine, runs, prompt_tokens, steps)

    code, stats = run_job(opts, root, make_slice if shape else None, setup)
    if code:
        sys.exit(code)
    kinds = f"{weights_float_type} (LM head {head})" if shape else ", ".join(state["kinds"])
    res = B.report(shape or str(model), kinds, buffer_float_type, nthreads, prompt_tokens, steps, state["speeds"],
                   state["bandwidth"], state["weights"], stats)
    click.echo(B.to_json(res) if as_json else B.text(res))


@cli.command()
@click.argument("path", type=click.Path(path_type=pathlib.Path))
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="The .t tokenizer file that goes with a distributed-llama .m model.")
@click.option("--max-seq-len", type=click.IntRange(1, None), default=None,
              help="KV cache length counted in the RAM figures [default: the model's context, at most 4096].")
def info(path, tokenizer, max_seq_len):
    """What a model file, Hugging Face folder or slice set is: format, architecture, shapes,
    weight types, tokenizer, chat template, and RAM per rank for N = 1, 2, 4, 8."""
    from .info import describe
    from .plan import PlanError
    try:
        click.echo(describe(path, tokenizer, max_seq_len))
    except PlanError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
