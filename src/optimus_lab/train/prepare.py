"""Data preparation: cleaned sources -> tokenizer files -> packed uint16 rows.

Outputs in ``out_dir``: tokenizer.json, tokenizer_config.json, text_train.bin.gz,
text_val.bin.gz (every ``VAL_EVERY``-th document, never trained on), chat_train.bin.gz,
meta.json.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from optimus_lab.train import corpus
from optimus_lab.train.chat_data import chat_pairs
from optimus_lab.train.pack import pack_chat, pack_text, save_rows
from optimus_lab.train.tokenizer_train import save_tokenizer, train_tokenizer

VAL_EVERY = 50


@dataclass(frozen=True)
class PrepareConfig:
    extracted: Path | None  # unpacked sources; None = chat tasks only (tests)
    out_dir: Path
    vocab_size: int = 8192
    seq_len: int = 512
    block_size: int = 32
    text_scale: float = 1.0  # fraction of each source's character cap
    chat_scale: float = 1.0  # fraction of chat_data.MIXTURE
    seed: int = 0


def _split_docs(cfg: PrepareConfig) -> tuple[list[str], list[str]]:
    if cfg.extracted is None:
        return [], []
    docs = [d for _, d in corpus.documents(cfg.extracted, scale=cfg.text_scale)]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    return train, val


def prepare(cfg: PrepareConfig) -> dict:
    train_docs, val_docs = _split_docs(cfg)
    pairs = list(chat_pairs(cfg.extracted, cfg.chat_scale, cfg.seed))
    random.Random(cfg.seed).shuffle(pairs)
    # Role names appear in every chat prompt: include them so they become single tokens.
    tok_texts = train_docs + [f"user\n{p.question}\nassistant\n{p.answer}" for p in pairs[:200_000]]
    tok = train_tokenizer(tok_texts, cfg.vocab_size)
    save_tokenizer(tok, cfg.out_dir, cfg.seq_len)
    parts = {
        "text_train": pack_text(tok, train_docs, cfg.seq_len),
        "text_val": pack_text(tok, val_docs, cfg.seq_len),
        "chat_train": pack_chat(tok, pairs, cfg.seq_len, cfg.block_size),
    }
    for name, rows in parts.items():
        save_rows(rows, cfg.out_dir / f"{name}.bin.gz")
    meta = {"config": {k: str(v) for k, v in asdict(cfg).items()},
            "rows": {k: int(v.shape[0]) for k, v in parts.items()},
            "vocab_size": tok.get_vocab_size()}
    (cfg.out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
