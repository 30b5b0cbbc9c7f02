"""Tokenizer built from GGUF metadata vs transformers' tokenizer loaded from the same GGUF, the
fixture reference ids, streaming decode and chat templates."""
from __future__ import annotations

import json
import warnings

import gguf
import pytest
from gguf import GGUFReader

from dllama_mpi.readers import ModelError, TokenizerSpec, open_model
from dllama_mpi.readers.gguf import build_tokenizer_spec
from dllama_mpi.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Pi is 3.14159 and 2024-11-28 is a date; 1,000,000 people.",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f'{x!r}')",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "emoji 😀🦙👍🏽 and CJK 日本語のテキスト 中文 한국어",
    "Ünïcödé çàfé naïve — “quotes” …",
    "   leading spaces, trailing   ",
    "tabs\t\tand\n\n\nnewlines\r\n  \n",
    "",
    " ",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "I'm, you're, they've, we'll, she'd, it's DON'T",
]


@pytest.fixture(scope="module")
def source(smollm2_gguf):
    return open_model(smollm2_gguf)


@pytest.fixture(scope="module")
def tok(source) -> Tokenizer:
    return Tokenizer(source.tokenizer)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_spec_values(source, tok):
    spec = source.tokenizer
    assert spec.bos_id == 1 and spec.add_bos is False
    assert spec.eos_ids == [2, 0]  # <|im_end|> (the file's eos) first, then <|endoftext|>
    assert tok.eos_ids == frozenset({0, 2})
    assert tok.vocab_size == 49152
    assert tok.id_to_token(2) == "<|im_end|>" and tok.id_to_token(0) == "<|endoftext|>"
    assert spec.chat_template and "<|im_start|>" in spec.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_gguf_tokenizer(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_specials_in_text_are_single_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # individual digits (smollm pre-tokenizer)


def test_add_bos(tok):
    assert tok.encode("hi", add_bos=True) == [1] + tok.encode("hi")
    assert tok.encode("hi", add_bos=False) == tok.encode("hi")
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)  # the file says add_bos_token=false


@pytest.mark.parametrize("model", ["llama_tied/llama_tied-q4_0.gguf", "llama31/llama31-f16.gguf"])
def test_fixture_reference_prompt(fixtures_dir, model):
    folder = (fixtures_dir / model).parent
    ref = json.loads((folder / "reference.json").read_text())
    t = Tokenizer(open_model(fixtures_dir / model).tokenizer)
    assert t.encode(ref["prompt_text"], add_bos=False) == ref["prompt_ids"]
    assert t.decode(ref["prompt_ids"]) == ref["prompt_text"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids)


def test_rebuilt_from_json_is_identical(source, tok):
    again = Tokenizer(TokenizerSpec.from_json(source.tokenizer.to_json()))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


STREAM_TEXT = "Llamas 🦙 love 日本語 and 👍🏽 emoji 😀!\nÜber café — done."


@pytest.mark.parametrize("byte_level", [True, False])
def test_stream_decoder_holds_split_characters(tok, byte_level):
    ids = tok.encode(STREAM_TEXT)
    # the text must contain characters split across tokens, or this test proves nothing
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)
    s = tok.stream() if byte_level else StreamDecoder(tok, byte_level=False)
    chunks = [s.push(i) for i in ids]
    tail = s.flush()
    assert "".join(chunks) + tail == STREAM_TEXT
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks  # something was held back until its character completed
    # every emitted chunk is a prefix-consistent piece of the text, in order
    pos = 0
    for c in chunks:
        assert STREAM_TEXT.startswith(c, pos)
        pos += len(c)


def test_stream_decoder_emits_each_token_when_complete(tok):
    ids = tok.encode("hello world, 123")
    s = tok.stream()
    assert [s.push(i) for i in ids] == [tok.decode([i]) for i in ids]
    assert s.flush() == ""


def test_stream_decoder_specials_and_invalid_bytes(tok):
    s = tok.stream()
    out = s.push(2)
    assert out == "<|im_end|>"
    # a lone lead byte followed by a complete token: decoded like the full decode does (one U+FFFD)
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    text = s.push(emoji[0]) + s.push(tok.encode("a")[0]) + s.flush()
    assert text == tok.decode([emoji[0]] + tok.encode("a"))


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. What do you need?"},
     {"role": "user", "content": "Name a prime number."}],
]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert tok.encode(ours) == hf_tok.encode(theirs, add_special_tokens=False)


def test_render_chat_first_message(tok):
    out = tok.render_chat(CHATS[0])
    assert out.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_template_features(source):
    tpl = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
           "{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
           "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}"
           "{{ ns.n }}|{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}")
    spec = TokenizerSpec.from_json(source.tokenizer.to_json())
    spec.chat_template = tpl
    t = Tokenizer(spec)
    assert t.render_chat([{"role": "user", "content": "<é>"}]) == '"<é>"1|<|im_start|>|<|im_end|>|4'
    with pytest.raises(ModelError, match="bad role"):
        t.render_chat([{"role": "bad", "content": "x"}])


def test_no_chat_template(source):
    spec = TokenizerSpec.from_json(source.tokenizer.to_json())
    spec.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        Tokenizer(spec).render_chat(CHATS[0])


# ---- tokenizer metadata we reject -------------------------------------------------------------------
def _tokenizer_gguf(path, model="gpt2", pre="gpt2"):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["<s>", "</s>", "a", "b", "ab"])
    w.add_token_types([3, 3, 1, 1, 1])
    if model == "llama":
        w.add_token_scores([0.0, 0.0, -1.0, -2.0, -0.5])
    else:
        w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFReader(path).fields


def test_unknown_pre_tokenizer(tmp_path):
    p = tmp_path / "pre.gguf"
    fields = _tokenizer_gguf(p, pre="mystery-pre")
    with pytest.raises(ModelError, match="mystery-pre"):
        build_tokenizer_spec(fields, p)


SPM_PIECES = ["\u2581", "a", "b", "c", "h", "e", "l", "o", "w", "r", "d", "\u2581a", "ab", "\u2581ab", "bc",
              "\u2581abc", "he", "ll", "llo", "hello", "\u2581hello", "\u2581w", "or", "\u2581wor", "\u2581world",
              "ld", "lo", "\u2581he"]


def test_sentencepiece_matches_transformers(tmp_path):
    """A small SentencePiece (tokenizer.ggml.model=llama) vocabulary with byte fallback."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = build_tokenizer_spec(GGUFReader(tmp_path / "spm.gguf").fields, tmp_path / "spm.gguf")
    assert spec.add_bos is True and spec.bos_id == 1 and spec.eos_ids == [2]
    t = Tokenizer(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", "abc", " hello  world ", "hello<s>world", "h\u00e9llo \U0001F600 x", "", "a\nb"]:
        ids = t.encode(text)
        assert ids == hf.encode(text), text
        assert t.decode(ids) == hf.decode(ids)
        s = t.stream()
        assert "".join(s.push(i) for i in ids) + s.flush() == t.decode(ids)
    assert t.encode("hello world") == [1, tokens.index("\u2581hello"), tokens.index("\u2581world")]


def test_unknown_tokenizer_model(tmp_path):
    p = tmp_path / "bert.gguf"
    fields = _tokenizer_gguf(p, model="bert")
    with pytest.raises(ModelError, match="tokenizer type 'bert' is not supported"):
        build_tokenizer_spec(fields, p)


@pytest.mark.parametrize("pre", ["gpt2", "default", "llama-bpe", "qwen2", "smollm"])
def test_supported_pre_tokenizers_build(tmp_path, pre):
    p = tmp_path / "ok.gguf"
    spec = build_tokenizer_spec(_tokenizer_gguf(p, pre=pre), p)
    t = Tokenizer(spec)
    assert t.encode("ab<s>") == [4, 0]
    assert t.eos_ids == {1} and t.bos_id is None
