"""Hugging Face folder reader: tiny models of every supported architecture saved by transformers'
own `save_pretrained` (single file and sharded, f32 / f16 / bf16), compared tensor by tensor with
the torch state dict; tokenizer files; bad input."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from dllama_mpi.config import ModelConfig, llama3_freq_divisors
from dllama_mpi.readers import ModelError, TokenizerSpec, canonical_names, open_model
from dllama_mpi.readers.hf import open_hf
from dllama_mpi.tokenizer import Tokenizer

VOCAB = 400
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world! 123", "<|im_start|>user\nhi<|im_end|>\n",
         "héllo 😀 wörld", ""]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE trained here, saved by transformers (tokenizer.json,
    tokenizer_config.json, chat_template.jinja)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog. Hello world!",
              "Distributed inference splits every layer across ranks.", "héllo wörld 123 456"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    out = tmp_path_factory.mktemp("tok")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    t.chat_template = TEMPLATE
    t.save_pretrained(out)
    return out


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("bias") else 0.02))


def _save(kind, folder, tokenizer_dir, *, dtype=torch.float32, shard=None, seed=0, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "qwen3moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        }[kind]
        model = model_cls(config_cls(**{**BASE, **cfg}))
        _randomize(model, seed)
        model = model.to(dtype)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, **kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _hf_name(canon: str) -> str:
    """Our own (independent) canonical -> HF name mapping for dense tensors."""
    if canon == "tok_embd":
        return "model.embed_tokens.weight"
    if canon == "output":
        return "lm_head.weight"
    if canon == "out_norm":
        return "model.norm.weight"
    _, l, short = canon.split(".", 2)
    return f"model.layers.{l}." + {
        "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
        "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
        "w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj.weight", "w3": "mlp.up_proj.weight",
        "router": "mlp.gate.weight",
    }[short]


def _expected(canon: str, sd: dict, moe_hidden: int = 0) -> np.ndarray:
    if ".experts." in canon:  # the in-memory transformers 5 layout: fused gate_up [E, 2m, dim], down [E, dim, m]
        _, l, _, e, w = canon.split(".")
        p = f"model.layers.{l}.mlp.experts."
        if w == "w2":
            return sd[p + "down_proj"][int(e)]
        gate_up = sd[p + "gate_up_proj"][int(e)]
        return gate_up[:moe_hidden] if w == "w1" else gate_up[moe_hidden:]
    return sd[_hf_name(canon)]


def _check_all_tensors(src, sd, moe_hidden=0):
    c = src.config
    assert sorted(src.names()) == sorted(canonical_names(c))
    for name in src.names():
        t = src.tensor(name)
        want = _expected(name, sd, moe_hidden)
        assert t.shape == want.shape == src.expected_shape(name), name
        assert t.raw.dtype == np.uint8 and not t.raw.flags.owndata, name
        got = t.float32()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=name)
        if len(t.shape) == 2:
            np.testing.assert_array_equal(t.float32(slice(1, 3)), want[1:3], err_msg=name)


def _check_tokenizer(src, tokenizer_dir):
    from tokenizers import Tokenizer as HFTok
    ref = HFTok.from_file(str(tokenizer_dir / "tokenizer.json"))
    spec = src.tokenizer
    assert spec.chat_template == TEMPLATE
    assert spec.bos_id == ref.token_to_id("<|im_start|>") == 1
    assert spec.eos_ids[0] == ref.token_to_id("<|im_end|>") == 2
    assert ref.token_to_id("<|endoftext|>") in spec.eos_ids
    assert spec.add_bos is False
    tok = Tokenizer(TokenizerSpec.from_json(spec.to_json()))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---- every architecture, saved by transformers -------------------------------------------------------
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def test_llama3_rope_scaling_untied_f32(tmp_path, tokenizer_dir):
    sd = _save("llama", tmp_path, tokenizer_dir, rope_parameters=dict(LLAMA3), tie_word_embeddings=False,
               rms_norm_eps=1e-5)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "llama3"
    assert (tmp_path / "model.safetensors").is_file()
    src = open_model(tmp_path)
    c = src.config
    assert src.format == "hf" and isinstance(c, ModelConfig)
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == \
        ("llama", 64, 128, 2, 4, 2, 16, VOCAB)
    assert (c.context_length, c.norm_eps, c.rope_theta) == (256, 1e-5, 500000.0)
    assert c.rope_interleaved is False and c.tied_embeddings is False
    assert (c.attn_bias, c.qk_norm, c.n_experts) == (False, False, 0)
    assert c.rope_freq_divisors == llama3_freq_divisors(16, 500000.0, 8.0, 1.0, 4.0, 64)
    assert "output" in src.names()
    assert src.tensor("tok_embd").ggml_type == int(T.F32)
    _check_all_tensors(src, sd)
    _check_tokenizer(src, tokenizer_dir)
    assert ModelConfig.from_json(c.to_json()) == c


def test_legacy_rope_scaling_key(tmp_path, tokenizer_dir):
    _save("llama", tmp_path, tokenizer_dir, tie_word_embeddings=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = open_model(tmp_path).config
    assert c.rope_theta == 500000.0
    assert c.rope_freq_divisors == llama3_freq_divisors(16, 500000.0, 8.0, 1.0, 4.0, 64)
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert open_model(tmp_path).config.rope_freq_divisors == [2.0] * 8
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="config.json.*rope scaling type 'yarn'"):
        open_model(tmp_path)


def test_mistral_bf16_sharded(tmp_path, tokenizer_dir):
    sd = _save("mistral", tmp_path, tokenizer_dir, dtype=torch.bfloat16, shard="40KB", head_dim=16,
               sliding_window=None, tie_word_embeddings=False)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    src = open_model(tmp_path)
    c = src.config
    assert c.arch == "llama" and c.rope_interleaved is False and c.rope_freq_divisors is None
    assert c.context_length == 256 and c.tied_embeddings is False
    assert src.tensor("layers.1.wq").ggml_type == int(T.BF16)
    _check_all_tensors(src, sd)
    _check_tokenizer(src, tokenizer_dir)
    # raw is the file's bytes
    from safetensors import safe_open
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(tmp_path / index[name]), framework="pt") as f:
        stored = f.get_tensor(name)
    assert bytes(src.tensor("layers.1.w2").raw) == stored.view(torch.uint8).numpy().tobytes()


def test_mistral_sliding_window_caps_context(tmp_path, tokenizer_dir):
    _save("mistral", tmp_path, tokenizer_dir, head_dim=16, sliding_window=128)
    assert open_model(tmp_path).config.context_length == 128


def test_qwen2_biases_f16_tied(tmp_path, tokenizer_dir):
    sd = _save("qwen2", tmp_path, tokenizer_dir, dtype=torch.float16, tie_word_embeddings=True, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    src = open_model(tmp_path)
    c = src.config
    assert (c.arch, c.attn_bias, c.qk_norm, c.tied_embeddings, c.rope_interleaved) == ("qwen2", True, False, True, False)
    assert c.rope_theta == 1e6 and c.norm_eps == 1e-6 and c.head_dim == 16
    assert "output" not in src.names()
    with pytest.raises(ModelError, match="tied"):
        src.tensor("output")
    for b, n in (("bq", 64), ("bk", 32), ("bv", 32)):
        t = src.tensor(f"layers.1.{b}")
        assert t.shape == (n,) and t.ggml_type == int(T.F16)
        assert np.any(t.float32() != 0)
    _check_all_tensors(src, sd)


def test_qwen3_head_dim_and_qk_norm_sharded(tmp_path, tokenizer_dir):
    sd = _save("qwen3", tmp_path, tokenizer_dir, shard="60KB", head_dim=32, tie_word_embeddings=True,
               rms_norm_eps=1e-6)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    src = open_model(tmp_path / "config.json")  # the config file itself also opens the folder
    c = src.config
    assert (c.arch, c.head_dim, c.q_dim, c.kv_dim, c.qk_norm, c.attn_bias) == ("qwen3", 32, 128, 64, True, False)
    assert src.tensor("layers.0.wq").shape == (128, 64) and src.tensor("layers.0.wo").shape == (64, 128)
    assert src.tensor("layers.1.q_norm").shape == (32,) and src.tensor("layers.1.k_norm").shape == (32,)
    _check_all_tensors(src, sd)


MOE = dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
           tie_word_embeddings=True, rms_norm_eps=1e-6)


def test_qwen3moe_per_expert_files(tmp_path, tokenizer_dir):
    sd = _save("qwen3moe", tmp_path, tokenizer_dir, shard="50KB", **MOE)
    src = open_model(tmp_path)
    c = src.config
    assert (c.arch, c.n_experts, c.n_active_experts, c.moe_hidden_dim, c.hidden_dim, c.norm_topk_prob) == \
        ("qwen3moe", 4, 2, 32, 128, True)
    assert c.qk_norm and c.ffn_dim == 32
    names = src.names()
    assert "layers.0.w1" not in names and "layers.1.router" in names
    assert src.tensor("layers.1.router").shape == (4, 64)
    assert src.tensor("layers.0.experts.3.w2").shape == (64, 32)
    _check_all_tensors(src, sd, moe_hidden=32)
    # what transformers wrote: per-expert gate/up/down files (gate = first half of gate_up_proj)
    from safetensors import safe_open
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    with safe_open(str(tmp_path / index[name]), framework="pt") as f:
        np.testing.assert_array_equal(f.get_tensor(name).numpy(), src.tensor("layers.1.experts.2.w3").float32())


def test_qwen3moe_fused_expert_format(tmp_path, tokenizer_dir):
    """The transformers 5 in-memory layout written as is: gate_up_proj [E, 2m, dim], down_proj [E, dim, m]."""
    from safetensors.torch import save_file
    sd_model = tmp_path / "orig"
    sd_model.mkdir()
    sd = _save("qwen3moe", sd_model, tokenizer_dir, seed=3, **MOE)
    out = tmp_path / "fused"
    out.mkdir()
    for f in sd_model.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    save_file({k: torch.from_numpy(v.copy()) for k, v in sd.items() if k != "lm_head.weight"},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    src = open_model(out)
    _check_all_tensors(src, sd, moe_hidden=32)
    t = src.tensor("layers.0.experts.1.w3")
    assert t.raw.shape == (32, 64 * 4) and not t.raw.flags.owndata


@pytest.mark.parametrize("extra,message", [
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
])
def test_qwen3moe_unsupported_layouts(tmp_path, tokenizer_dir, extra, message):
    _save("qwen3moe", tmp_path, tokenizer_dir, **MOE)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(extra)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=message):
        open_model(tmp_path)


# ---- tokenizer files --------------------------------------------------------------------------------
def test_tokenizer_config_template_generation_eos_and_add_bos(tmp_path, tokenizer_dir):
    _save("llama", tmp_path, tokenizer_dir)
    (tmp_path / "chat_template.jinja").unlink()
    tcfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tcfg.update(chat_template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                add_bos_token=True, eos_token={"content": "<|endoftext|>", "special": True})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    spec = open_model(tmp_path).tokenizer
    assert spec.chat_template.startswith("{{ bos_token }}")
    assert spec.eos_ids[:3] == [0, 7, 2] and len(set(spec.eos_ids)) == len(spec.eos_ids)
    assert spec.add_bos is True and spec.bos_id == 1
    tok = Tokenizer(spec)
    assert tok.encode("hi")[0] == 1
    assert tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=False) == "<|im_start|>x"


def test_digest(tmp_path, tokenizer_dir):
    a = tmp_path / "a"
    _save("llama", a, tokenizer_dir)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert open_model(a).digest() == open_model(b).digest()
    cfg = json.loads((b / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (b / "config.json").write_text(json.dumps(cfg))
    assert open_model(a).digest() != open_model(b).digest()


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.fixture
def llama_dir(tmp_path, tokenizer_dir):
    _save("llama", tmp_path, tokenizer_dir)
    return tmp_path


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="config.json: unsupported architecture 'GPT2LMHeadModel'") as e:
        open_model(llama_dir)
    _one_line(e)


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    for n in (len(data) - 100, 1000, 5):
        f.write_bytes(data[:n])
        with pytest.raises(ModelError, match="model.safetensors.*truncated") as e:
            open_model(llama_dir)
        _one_line(e)


def test_missing_tensor(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(llama_dir / "model.safetensors"))
    del sd["model.layers.1.self_attn.v_proj.weight"]
    save_file(sd, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"missing tensors layers\.1\.wv") as e:
        open_model(llama_dir)
    _one_line(e)


def test_unsupported_dtype(llama_dir):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(llama_dir / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].double()
    save_file(sd, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has dtype F64"):
        open_model(llama_dir)


def test_shape_mismatch(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\], expected"):
        open_model(llama_dir)


def test_tokenizer_larger_than_model_vocab(llama_dir):
    from safetensors.torch import load_file, save_file
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["vocab_size"] = 100
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(llama_dir / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            sd[k] = sd[k][:100].contiguous()
    save_file(sd, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="tokenizer has \\d+ tokens but the model's vocab_size is 100"):
        open_model(llama_dir)


def test_missing_files(llama_dir):
    (llama_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer.json"):
        open_model(llama_dir)
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        open_hf(llama_dir)
    (llama_dir / "config.json").unlink()
    with pytest.raises(ModelError, match="directory"):
        open_model(llama_dir)


def test_tokenizer_option_rejected_for_hf(llama_dir):
    with pytest.raises(ModelError, match="only for distributed-llama"):
        open_model(llama_dir, tokenizer=llama_dir / "tokenizer.json")
