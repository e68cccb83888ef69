"""Pre-tokenise the corpus and the chat mixture into fixed-length rows.

Row format: ``[N, seq_len]`` integers, ids < 2**30. Bit 30 (``CLEAN_FLAG``) marks a token that
is never noised and carries no loss (the prompt of a chat example); everything else is a
diffusion target. On disk: a gzip-compressed ``.npy`` of uint32 (files written before large
vocabularies were supported hold raw uint16 with the flag in bit 15; ``load_rows`` reads both). Chat examples start on a block boundary and their answer's last block is
filled with ``<|endoftext|>`` (a target), matching how the model is served.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from optimus_lab.train.chat import ENDOFTEXT, render_answer, render_prompt
from optimus_lab.train.chat_data import ChatPair

CLEAN_FLAG = 1 << 30
_LEGACY_FLAG = 1 << 15  # raw uint16 files


def pack_text(tok: Tokenizer, docs: Iterable[str], seq_len: int) -> np.ndarray:
    """Documents joined by <|endoftext|> into one stream, cut into rows (the tail is dropped)."""
    eos = tok.token_to_id(ENDOFTEXT)
    stream: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for enc in tok.encode_batch(batch):
            stream.extend(enc.ids)
            stream.append(eos)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= 256:
            flush()
    flush()
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.uint32).reshape(n, seq_len)


def _example_ids(prompt: Sequence[int], answer: Sequence[int], fill: int, block: int) -> list[int]:
    ids = [t | CLEAN_FLAG for t in prompt] + list(answer)
    return ids + [fill] * (-len(ids) % block)


def pack_examples(examples: Iterable[tuple[Sequence[int], Sequence[int]]], fill: int, seq_len: int,
                  block: int) -> np.ndarray:
    """(prompt ids, answer ids ending in its end-of-turn) pairs packed greedily into rows: each
    starts on a block boundary, its last block is filled with ``fill`` (targets, as SDAR serves
    them); an example longer than a row is dropped; unused row tails are ``fill`` targets."""
    rows: list[list[int]] = []
    row: list[int] = []
    for prompt, answer in examples:
        ids = _example_ids(prompt, answer, fill, block)
        if len(ids) > seq_len:
            continue
        if len(row) + len(ids) > seq_len:
            rows.append(row + [fill] * (seq_len - len(row)))
            row = []
        row.extend(ids)
    if row:
        rows.append(row + [fill] * (seq_len - len(row)))
    return np.asarray(rows, dtype=np.uint32).reshape(-1, seq_len)


def pack_chat(tok: Tokenizer, pairs: Iterable[ChatPair], seq_len: int, block: int) -> np.ndarray:
    """The default model's chat mixture, rendered in its ChatML format and packed."""
    eos = tok.token_to_id(ENDOFTEXT)
    pairs = list(pairs)

    def examples():
        for start in range(0, len(pairs), 1024):
            chunk = pairs[start:start + 1024]
            prompts = tok.encode_batch([render_prompt(p.question) for p in chunk])
            answers = tok.encode_batch([render_answer(p.answer) for p in chunk])
            yield from ((p.ids, a.ids) for p, a in zip(prompts, answers))
    return pack_examples(examples(), eos, seq_len, block)


def save_rows(rows: np.ndarray, path: Path) -> None:
    """gzip-compressed uint32 ``.npy`` (prompt flags and eos fills compress well)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, dtype=np.uint32))
    path.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6))


def load_rows(path: Path, seq_len: int) -> np.ndarray:
    """[N, seq_len] int64 rows with ``CLEAN_FLAG`` marking prompt tokens."""
    raw = gzip.decompress(path.read_bytes())
    if raw.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(raw)).astype(np.int64).reshape(-1, seq_len)
    legacy = np.frombuffer(raw, dtype=np.uint16).astype(np.int64).reshape(-1, seq_len)
    return np.where(legacy & _LEGACY_FLAG, (legacy & (_LEGACY_FLAG - 1)) | CLEAN_FLAG, legacy)
