"""`dllama-mpi info`: what a model file, model folder or slice set is, and what it needs per rank."""
from __future__ import annotations

import collections
import pathlib

from . import plan as planning
from .config import ModelConfig


def _model_lines(cfg: ModelConfig) -> list[str]:
    feats = [f for f, on in (("tied embeddings", cfg.tied_embeddings), ("q/k/v biases", cfg.attn_bias),
                             ("per-head q/k RMSNorm", cfg.qk_norm)) if on]
    ffn = (f"{cfg.n_experts} experts x FFN {cfg.moe_hidden_dim}, {cfg.n_active_experts} active per token"
           if cfg.n_experts else f"FFN {cfg.hidden_dim}")
    return [
        f"architecture: {cfg.arch}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV "
        f"heads of {cfg.head_dim}, {ffn}, vocab {cfg.vocab_size}, context {cfg.context_length}",
        f"rope: theta {cfg.rope_theta:g}, {'interleaved' if cfg.rope_interleaved else 'half-split'} pairs"
        f"{', llama3 frequency scaling' if cfg.rope_freq_divisors else ''}; norm eps {cfg.norm_eps:.3g}",
        "features: " + (", ".join(feats) if feats else "plain Llama"),
    ]


def _tokenizer_line(spec) -> str:
    import json
    n = len(json.loads(spec.tokenizer_json)["model"]["vocab"])
    return (f"tokenizer: {n} tokens, bos {spec.bos_id}, end ids {spec.eos_ids}, add bos {spec.add_bos}; "
            f"chat template {'present' if spec.chat_template else 'absent'}")


def describe(path, tokenizer=None, max_seq_len: int | None = None) -> str:
    """Raises planning.PlanError (one line) for anything unreadable."""
    path = pathlib.Path(path)
    name, cfg, storage = planning.open_target(str(path), None, tokenizer=tokenizer)
    lines = [f"{path}:"]
    if path.is_dir() and any(path.glob("rank-0-of-*.h5")):
        from .readers import TokenizerSpec
        from .slicefile import SliceFile
        ranks = sorted(path.glob("rank-*-of-*.h5"))
        sf = SliceFile(sorted(path.glob("rank-0-of-*.h5"))[0])
        lines.append(f"format: slice set for {sf.n_ranks} rank(s), {len(ranks)} file(s) here; source {sf.source_name} "
                     f"(sha256 {sf.digest[:16]}...)")
        lines += _model_lines(cfg)
        lines.append(f"weight types: {', '.join(sf.weight_types)}")
        lines.append(_tokenizer_line(TokenizerSpec.from_json(sf.tokenizer_json)))
        sizes = [p.stat().st_size for p in ranks]
        lines.append("files: " + ", ".join(f"{p.name} {s / 2**20:.1f} MiB" for p, s in zip(ranks, sizes)))
    else:
        from .readers import ModelError, open_model
        try:
            source = open_model(path, tokenizer=tokenizer)
        except ModelError as e:
            raise planning.PlanError(str(e)) from None
        import gguf
        types = collections.Counter(gguf.GGMLQuantizationType(source.tensor(n).ggml_type).name for n in source.names())
        lines.append(f"format: {source.format}")
        lines += _model_lines(cfg)
        lines.append("tensor types: " + ", ".join(f"{t} x{c}" for t, c in types.most_common()))
        lines.append(_tokenizer_line(source.tokenizer))
    seq = max_seq_len or min(cfg.context_length, 4096)
    lines.append(f"RAM per rank ({storage.description}; KV cache for {seq} positions):")
    for n, per_rank in planning.ram_per_rank(cfg, storage, max_seq_len=seq).items():
        lines.append(f"  N={n}: " + ", ".join(f"{b / 2**30:.2f}" for b in per_rank) + " GiB")
    return "\n".join(lines)
