"""Pre-tokenise the corpus and the chat mixture into fixed-length uint16 rows.

Row format: ``[N, seq_len]`` uint16, ids < 2**15. Bit 15 (``CLEAN_FLAG``) marks a token that
is never noised and carries no loss (the prompt of a chat example); everything else is a
diffusion target. Chat examples start on a block boundary and their answer's last block is
filled with ``<|endoftext|>`` (a target), matching how the model is served.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from optimus_lab.train.chat import ENDOFTEXT, render_answer, render_prompt
from optimus_lab.train.chat_data import ChatPair

CLEAN_FLAG = 1 << 15


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
    return np.asarray(stream[: n * seq_len], dtype=np.uint16).reshape(n, seq_len)


def _example_ids(prompt: Sequence[int], answer: Sequence[int], eos: int, block: int) -> list[int]:
    ids = [t | CLEAN_FLAG for t in prompt] + list(answer)
    return ids + [eos] * (-len(ids) % block)


def pack_chat(tok: Tokenizer, pairs: Iterable[ChatPair], seq_len: int, block: int) -> np.ndarray:
    """Block-aligned chat examples packed greedily into rows; unused row tails are eos targets."""
    eos = tok.token_to_id(ENDOFTEXT)
    rows: list[list[int]] = []
    row: list[int] = []
    pairs = list(pairs)
    for start in range(0, len(pairs), 1024):
        chunk = pairs[start:start + 1024]
        prompts = tok.encode_batch([render_prompt(p.question) for p in chunk])
        answers = tok.encode_batch([render_answer(p.answer) for p in chunk])
        for p, a in zip(prompts, answers):
            ids = _example_ids(p.ids, a.ids, eos, block)
            if len(ids) > seq_len:
                continue
            if len(row) + len(ids) > seq_len:
                rows.append(row + [eos] * (seq_len - len(row)))
                row = []
            row.extend(ids)
    if row:
        rows.append(row + [eos] * (seq_len - len(row)))
    return np.asarray(rows, dtype=np.uint16)


def save_rows(rows: np.ndarray, path: Path) -> None:
    """gzip-compressed raw uint16 rows (digits and eos fills compress ~3x; the device copy is capped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(rows.astype(np.uint16).tobytes(), compresslevel=6))


def load_rows(path: Path, seq_len: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint16).reshape(-1, seq_len)
