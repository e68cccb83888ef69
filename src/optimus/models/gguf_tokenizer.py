"""The tokenizer a GGUF file carries (``tokenizer.ggml.*`` metadata) as a ``tokenizers`` BPE.

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the vocabulary, merges and token types
of the file, with the pre-tokenizer its ``tokenizer.ggml.pre`` names, written as the original
Hugging Face tokenizer.json writes it (SmolLM's individual digits + GPT-2 byte level, Llama 3's
and Qwen2's split patterns). Control tokens become special tokens; bos/eos/pad/eot ids, the
add-bos flag and the chat template come from the same metadata.
"""

from __future__ import annotations

from typing import Any, Callable

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from optimus.models.errors import UnsupportedFormatError
from optimus.models.gguf import GGUFFile
from optimus.models.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, Tokenizer, TokenizerSettings

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 is a normal token)


def _gpt2(backend: _Backend) -> None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2(backend: _Backend) -> None:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _split(pattern: str, nfc: bool) -> Callable[[_Backend], None]:
    def apply(backend: _Backend) -> None:
        if nfc:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return apply


# tokenizer.ggml.pre -> how the text is split before BPE (llama.cpp groups these names by regex).
PRE_TOKENIZERS: dict[str, Callable[[_Backend], None]] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais"), _gpt2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), _digits_then_gpt2),
    **dict.fromkeys(("llama-bpe", "llama3"), _split(LLAMA3_SPLIT, nfc=False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _split(QWEN2_SPLIT, nfc=True)),
}


def tokenizer_from_gguf(file: GGUFFile) -> Tokenizer:
    model = str(file.get("tokenizer.ggml.model"))
    if model != "gpt2":
        raise UnsupportedFormatError(f"GGUF file {file.path}: tokenizer model {model!r} is not supported "
                                     "(only byte-level BPE, 'gpt2')")
    pre = str(file.get("tokenizer.ggml.pre", "gpt2"))
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedFormatError(f"GGUF file {file.path}: pre-tokenizer {pre!r} is not supported; "
                                     f"supported: {', '.join(PRE_TOKENIZERS)}")
    tokens = [str(t) for t in file.get("tokenizer.ggml.tokens")]
    types = list(file.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in file.get("tokenizer.ggml.merges")]
    backend = _Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                  fuse_unk=False, byte_fallback=False))
    PRE_TOKENIZERS[pre](backend)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, _settings(file, tokens, types))


def _settings(file: GGUFFile, tokens: list[str], types: list[int]) -> TokenizerSettings:
    def token(key: str) -> str | None:
        index = file.get(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    roles = {role: t for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
             if (t := token(key)) is not None}
    added = {i: (tokens[i], kind == _CONTROL) for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)}
    ends = tuple(int(i) for key in ("eos", "eot") if (i := file.get(f"tokenizer.ggml.{key}_token_id", None)) is not None)
    template: Any = file.get("tokenizer.chat_template", None)
    return TokenizerSettings(
        special_tokens=roles, added_tokens=added,
        add_bos_token=bool(file.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(file.get("tokenizer.ggml.add_eos_token", False)),
        chat_templates={"default": str(template)} if template else {},
        generation_eos_ids=tuple(dict.fromkeys(ends)))
