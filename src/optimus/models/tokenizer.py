"""Tokenizer and chat templates from a Hugging Face model directory.

Built on the ``tokenizers`` library (``tokenizer.json``) plus the model's own settings in
``tokenizer_config.json`` (special tokens, bos/eos insertion, chat template) and
``generation_config.json`` (extra eos ids). Chat templates render in Jinja's immutable
sandbox, with the helpers Hugging Face templates expect (``raise_exception``,
``strftime_now``, a non-escaping ``tojson``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend


class TokenizerError(ValueError):
    """The tokenizer files are missing or malformed."""


class ChatTemplateError(ValueError):
    """No chat template, or the template failed (including sandbox refusals)."""


# Pre-tokenizer split patterns of the byte-level BPE families (Qwen2 splits digits one by one,
# Llama 3 in groups of up to three).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Slow tokenizer classes whose vocab.json + merges.txt we can rebuild (Dream ships no tokenizer.json).
_QWEN2_STYLE_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast", "DreamTokenizer")

# Tokens that end an assistant turn, by the names families give them.
_END_OF_TURN_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end_of_turn|>", "<end_of_turn>", "<|eot|>")
_ROLES = ("bos", "eos", "pad", "unk", "mask")


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclass(frozen=True)
class TokenizerSettings:
    """What ``tokenizer_config.json`` (+ ``generation_config.json``) says about special tokens."""

    special_tokens: Mapping[str, str] = field(default_factory=dict)  # role (bos, eos, ...) -> token
    added_tokens: Mapping[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (content, special)
    add_bos_token: bool = False
    add_eos_token: bool = False
    clean_up_tokenization_spaces: bool = False
    chat_templates: Mapping[str, str] = field(default_factory=dict)  # name -> source ("default" first)
    generation_eos_ids: tuple[int, ...] = ()

    @classmethod
    def from_dicts(cls, config: Mapping[str, Any], generation: Mapping[str, Any] | None = None,
                   extra_template: str | None = None) -> "TokenizerSettings":
        specials = {r: t for r in _ROLES if (t := _token_content(config.get(f"{r}_token")))}
        added = {int(i): (str(d["content"]), bool(d.get("special", True)))
                 for i, d in (config.get("added_tokens_decoder") or {}).items()}
        return cls(specials, added, bool(config.get("add_bos_token", False)),
                   bool(config.get("add_eos_token", False)),
                   bool(config.get("clean_up_tokenization_spaces", False)),
                   _parse_templates(config.get("chat_template"), extra_template),
                   _as_ids((generation or {}).get("eos_token_id")))


def _parse_templates(value: Any, extra: str | None) -> dict[str, str]:
    """``chat_template`` may be one string or a list of ``{"name", "template"}``; a separate
    ``chat_template.jinja`` file (newer HF layout) wins as the default."""
    templates: dict[str, str] = {}
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        for item in value:
            templates[str(item["name"])] = str(item["template"])
    elif value is not None:
        raise TokenizerError(f"chat_template must be a string or a list of named templates, got {type(value).__name__}")
    if extra is not None:
        templates["default"] = extra
    return templates


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _sandbox() -> ImmutableSandboxedEnvironment:
    # trim_blocks/lstrip_blocks and loop controls as transformers renders templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# The clean-up Hugging Face applies to decoded text when clean_up_tokenization_spaces is set.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Text <-> ids and chat rendering for one model. Immutable after construction."""

    def __init__(self, backend: _Backend, settings: TokenizerSettings) -> None:
        self._backend = backend
        self.settings = settings
        self._register_added_tokens()
        self._env = _sandbox()
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """``tokenizer.json``, or else a Qwen2-style ``vocab.json`` + ``merges.txt`` pair."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        jinja_file = path / "chat_template.jinja"
        extra = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        return cls(_load_backend(path, config), TokenizerSettings.from_dicts(config, generation, extra))

    def __getstate__(self) -> dict:
        # The sandbox and compiled templates hold functions: rebuilt on unpickling (a serving
        # engine process hands its tokenizer to the HTTP front-ends this way).
        return {"backend": self._backend, "settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"], state["settings"])

    def _register_added_tokens(self) -> None:
        """tokenizer_config's added_tokens_decoder and named specials must be tokens of the
        backend too (vocab.json tokenizers list them only in the config), at the ids it names."""
        known = self._backend.get_added_tokens_decoder()
        added = sorted(self.settings.added_tokens.items())
        missing = [content for i, (content, _) in added if i not in known or known[i].content != content]
        missing += [t for t in self.settings.special_tokens.values()
                    if self._backend.token_to_id(t) is None and t not in missing]
        specials = {c for _, (c, special) in added if special} | set(self.settings.special_tokens.values())
        self._backend.add_tokens([AddedToken(t, special=t in specials, normalized=False) for t in missing])
        for token_id, (content, _) in added:
            if self._backend.token_to_id(content) != token_id:
                raise TokenizerError(f"tokenizer_config.json puts {content!r} at id {token_id}, but the "
                                     f"tokenizer gives it id {self._backend.token_to_id(content)}")

    # ------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def _id_bound(self) -> int:
        """One past the largest id the tokenizer has (ids below it that it lacks are skipped
        by the backend; ids outside ``[0, bound)`` would not even convert)."""
        return max(self._backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def special_token(self, role: str) -> str | None:
        """The token string for a role: bos, eos, pad, unk or mask."""
        return self.settings.special_tokens.get(role)

    def _role_id(self, role: str) -> int | None:
        token = self.special_token(role)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_token_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_token_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def mask_token_id(self) -> int | None:
        return self._role_id("mask")

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The special token that closes a chat turn (``<|eot_id|>``, ``<|im_end|>``...), if any."""
        specials = set(self.all_special_ids)
        for name in _END_OF_TURN_NAMES:
            token_id = self.token_to_id(name)
            if token_id is not None and token_id in specials:
                return token_id
        return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: generation_config's eos list, then the tokenizer's eos."""
        own = () if self.eos_token_id is None else (self.eos_token_id,)
        return tuple(dict.fromkeys(self.settings.generation_eos_ids + own))

    @cached_property
    def all_special_ids(self) -> tuple[int, ...]:
        ids = [i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special]
        ids += [i for r in _ROLES if (i := self._role_id(r)) is not None]
        return tuple(sorted(set(ids)))

    # ------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.settings.add_bos_token and bos is not None and ids[:1] != [bos]:
                ids = [bos] + ids
            if self.settings.add_eos_token and eos is not None and ids[-1:] != [eos]:
                ids = ids + [eos]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids the tokenizer does not have decode to nothing: a model's vocabulary can be larger
        than its tokenizer's (padded embedding rows, random-weight models at a published shape)."""
        bound = self._id_bound
        text = self._backend.decode([i for i in ids if 0 <= i < bound], skip_special_tokens=skip_special_tokens)
        if self.settings.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    # ------------------------------------------------------------ chat

    @property
    def has_chat_template(self) -> bool:
        return bool(self.settings.chat_templates)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            template_name: str | None = None, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) with the model's template.

        Extra keyword arguments (``tools``, ``enable_thinking``...) reach the template as variables.
        """
        source = self._template_source(template_name)
        context = {f"{r}_token": t for r, t in self.settings.special_tokens.items()}
        context.update(kwargs, messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt)
        try:
            return self._compile(source).render(**context)
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template refused by the sandbox (unsafe access): {exc}") from exc
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def _template_source(self, name: str | None) -> str:
        templates = self.settings.chat_templates
        if not templates:
            raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json has no "
                                    "chat_template and there is no chat_template.jinja); pass a raw prompt")
        if name is None:
            name = "default" if "default" in templates else next(iter(templates))
        if name not in templates:
            raise ChatTemplateError(f"no chat template named {name!r}; available: {sorted(templates)}")
        return templates[name]

    def _compile(self, source: str) -> jinja2.Template:
        if source not in self._compiled:
            try:
                self._compiled[source] = self._env.from_string(source)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise ChatTemplateError(f"chat template does not parse: {exc}") from exc
        return self._compiled[source]


def _load_backend(path: Path, config: Mapping[str, Any]) -> _Backend:
    tok_file = path / "tokenizer.json"
    if tok_file.is_file():
        try:
            return _Backend.from_file(str(tok_file))
        except Exception as exc:  # the Rust library raises bare Exception subclasses
            raise TokenizerError(f"cannot parse {tok_file}: {exc}") from exc
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerError(f"missing file: {tok_file} (nor vocab.json + merges.txt)")
    cls = str(config.get("tokenizer_class", ""))
    if cls not in _QWEN2_STYLE_CLASSES:
        raise TokenizerError(f"missing file: {tok_file}; vocab.json + merges.txt are only understood for "
                             f"{', '.join(_QWEN2_STYLE_CLASSES)}, not tokenizer_class={cls!r}")
    return qwen2_style_backend(vocab, merges)


def qwen2_style_backend(vocab_file: Path, merges_file: Path) -> _Backend:
    """Byte-level BPE as Qwen2's tokenizer defines it: NFC, the Qwen2 split, byte mapping."""
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _read_json(path: Path) -> dict:
    """An optional JSON file: {} when absent, a clear error when malformed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data
