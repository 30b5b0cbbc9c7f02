"""Tokenizer (encode / decode / streaming decode) and chat-template rendering.

Built from a `TokenizerSpec` (see dllama_mpi.readers), so every host can rebuild the same tokenizer
from the JSON stored in its slice file:

    tok = Tokenizer(source.tokenizer)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Hi"}]))
    s = tok.stream(); text = "".join(s.push(i) for i in generated) + s.flush()

Chat templates are rendered with jinja2 the way transformers' `apply_chat_template` does
(sandboxed environment, trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`).
"""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache

from .readers import ModelError, TokenizerSpec

__all__ = ["Tokenizer", "StreamDecoder", "ChatTemplateError"]


class ChatTemplateError(ModelError):
    """The model has no chat template, or its template failed to render."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        from tokenizers import Tokenizer as _HFTokenizer

        self.spec = spec
        self._tok = _HFTokenizer.from_str(spec.tokenizer_json)
        # one past the largest id (a vocabulary can have unused ids, e.g. duplicate byte strings in
        # a distributed-llama .t, so the count of tokens can be smaller)
        self.vocab_size: int = max(self._tok.get_vocab_size(with_added_tokens=True),
                                   1 + max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1))
        self.bos_id: int | None = spec.bos_id
        self.eos_ids: frozenset[int] = frozenset(spec.eos_ids)
        decoder = json.loads(spec.tokenizer_json).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"
        self._token_bytes: list[bytes] | None = None

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.spec.add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` decodes to (byte-level vocabularies)."""
        return self._bytes_table()[int(i)]

    def _bytes_table(self) -> list[bytes]:
        if self._token_bytes is None:
            byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
            table = [b""] * self.vocab_size
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                if i in added:
                    table[i] = added[i].encode("utf-8")
                else:
                    table[i] = b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8")
                                        for c in token)
            self._token_bytes = table
        return self._token_bytes

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # ---- chat ---------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.spec.chat_template
        if not template:
            raise ChatTemplateError("model has no chat template; use a plain prompt instead of chat mode")
        import jinja2

        def tok(i):
            return None if i is None else self.id_to_token(i)

        try:
            return _compile_template(template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=tok(self.bos_id),
                eos_token=tok(self.spec.eos_ids[0]) if self.spec.eos_ids else None,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: push ids, get back only completed text.

    Byte-level vocabularies: each token maps to its bytes, fed to an incremental UTF-8 decoder
    that holds back an incomplete character (O(1) per token). Other decoders: decode a small
    window of ids and hold back text ending in U+FFFD until it completes (amortized O(1)).
    """

    def __init__(self, tokenizer: Tokenizer, *, byte_level: bool | None = None):
        self._t = tokenizer
        self._byte_level = tokenizer._byte_level if byte_level is None else byte_level
        if self._byte_level:
            self._table = tokenizer._bytes_table()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._ids: list[int] = []
            self._prefix = 0   # window start: ids before it are fully emitted
            self._read = 0     # ids[_prefix:_read] decode to text already emitted

    def push(self, token_id: int) -> str:
        if self._byte_level:
            return self._utf8.decode(self._table[int(token_id)])
        self._ids.append(int(token_id))
        done = self._t.decode(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        text = self._t.decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            out = text[len(done):]
            self._prefix, self._read = self._read, len(self._ids)
            return out
        return ""

    def flush(self) -> str:
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        done = self._t.decode(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        text = self._t.decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done):]


@lru_cache(maxsize=8)
def _compile_template(template: str):
    """Compile like transformers' `_compile_jinja_template` (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: no HTML escaping, json.dumps options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    class GenerationBlock(jinja2.ext.Extension):
        # transformers' `{% generation %}...{% endgeneration %}` tag (assistant-mask tracking); here
        # it only renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
