"""The `dllama-mpi` command line: thin click commands that parse options and call the package."""
from __future__ import annotations

import os
import pathlib
import sys
import traceback

import click

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

@cli.command("slice")
@click.argument("source", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--nodes", "-n", type=click.IntRange(1, 4096), required=True, help="Number of ranks of the job that will run it.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=pathlib.Path), required=True, help="Folder for rank-R-of-N.h5.")
@click.option("--weights-float-type", type=click.Choice(WEIGHT_TYPES), default="auto", show_default=True,
              help="auto keeps each matrix's blocks when a kernel reads them, else requantizes to q40.")
@click.option("--head-float-type", type=click.Choice(WEIGHT_TYPES), default="auto", show_default=True,
              help="LM head: auto follows --weights-float-type but keeps 8 bits (q80) when that is 4-bit.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def slice_cmd(source, nodes, out, weights_float_type, head_float_type, quiet):
    """Pre-split a model file (GGUF) into one HDF5 slice file per rank."""
    from .readers import ModelError, open_model
    from .slicefile import SliceError, write_slices
    if not source.is_file():
        fail(f"{source}: no such model file")
    try:
        model = open_model(source)
        bar = None
        if not quiet:
            from tqdm import tqdm
            bar = tqdm(total=1, unit="tensor", file=sys.stderr, desc="slicing")

        def progress(i, total, name):
            bar.total = total
            bar.set_postfix_str(name, refresh=False)
            bar.update(i - bar.n)

        paths = write_slices(model, nodes, out, weights_float_type, progress=progress if bar else None,
                             head_type=head_float_type)
        if bar:
            bar.close()
    except (ModelError, SliceError, ValueError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write slices to {out}: {e.strerror or e}")
    for p in paths:
        click.echo(f"{p} ({p.stat().st_size / 1e6:.1f} MB)", err=True)


# -- running jobs ---------------------------------------------------------------------------

def runtime_options(f):
    f = click.option("--model", "-m", type=click.Path(path_type=pathlib.Path), required=True,
                     help="Folder holding the slice set (rank-R-of-N.h5).")(f)
    f = click.option("--buffer-float-type", type=click.Choice(["q80", "f32"]), default="q80", show_default=True,
                     help="Wire format of the per-layer all-reduce.")(f)
    f = click.option("--nthreads", type=click.IntRange(1, 1024), default=1, show_default=True,
                     help="OpenMP threads per rank.")(f)
    f = click.option("--max-seq-len", type=click.IntRange(2, None), default=None,
                     help="KV cache length [default: the model's context, at most 4096].")(f)
    return f


def run_job(opts: dict, root_fn):
    """Start the engine on every rank; the root runs root_fn(engine), workers serve it.
    Any rank's failure ends the whole job: collectively when it can, by MPI_Abort if not."""
    os.environ["OMP_NUM_THREADS"] = str(opts["nthreads"])  # before the kernels are loaded
    from .collectives import Collectives
    from .engine import Engine, StartupError
    from .generate import UsageError
    comm = Collectives()
    try:
        engine = Engine(opts["model"], comm, opts["max_seq_len"], opts["buffer_float_type"])
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


if __name__ == "__main__":
    main()
