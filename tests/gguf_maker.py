"""Write small, deliberately broken GGUF files with the gguf package's own writer."""
from __future__ import annotations

import gguf
import numpy as np

DIM, HIDDEN, HEADS, KV, LAYERS = 64, 128, 4, 2, 1


def tiny_vocab():
    # a byte-level BPE vocabulary: the 256 byte symbols plus specials
    byte_symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(ord("¡"), ord("¬") + 1)] \
        + [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    extra = [chr(256 + i) for i in range(256 - len(byte_symbols))]
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_symbols + extra


def write(path, arch="llama", drop=(), shapes=None, types=None, vocab_size=None, tokens=None):
    """A 1-layer llama-shaped GGUF. drop: tensor names to leave out; shapes: name -> numpy shape;
    types: name -> GGMLQuantizationType (bytes written raw); vocab_size: model rows vs tokenizer."""
    tokens = tokens or tiny_vocab()
    vocab = vocab_size or len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if vocab_size:
        w.add_vocab_size(vocab_size)
    hd = DIM // HEADS
    want = {"token_embd.weight": (vocab, DIM), "output_norm.weight": (DIM,),
            "blk.0.attn_norm.weight": (DIM,), "blk.0.ffn_norm.weight": (DIM,),
            "blk.0.attn_q.weight": (HEADS * hd, DIM), "blk.0.attn_k.weight": (KV * hd, DIM),
            "blk.0.attn_v.weight": (KV * hd, DIM), "blk.0.attn_output.weight": (DIM, HEADS * hd),
            "blk.0.ffn_gate.weight": (HIDDEN, DIM), "blk.0.ffn_up.weight": (HIDDEN, DIM),
            "blk.0.ffn_down.weight": (DIM, HIDDEN)}
    rng = np.random.default_rng(0)
    for name, shape in want.items():
        if name in drop:
            continue
        shape = (shapes or {}).get(name, shape)
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.02)
        else:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 255, size=shape[:-1] + (shape[-1] // block * nbytes,), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
