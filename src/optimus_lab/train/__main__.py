"""``python -m optimus_lab.train prepare|fit``: rebuild the default model's data and weights.

prepare: cleaned sources -> tokenizer + packed rows (see ``prepare.py``).
fit: train on packed rows and write an HF directory (see ``loop.py``); ``--preset tiny`` is the
CPU smoke configuration.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from optimus_lab.train.checkpoint import ModelShape

PRESETS = {
    "default": ModelShape(),
    "tiny": ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                       intermediate_size=128),
}


def _prepare(args) -> None:
    from optimus_lab.train.prepare import PrepareConfig, prepare
    cfg = PrepareConfig(extracted=Path(args.extracted) if args.extracted else None, out_dir=Path(args.out),
                        vocab_size=args.vocab_size, seq_len=args.seq_len, text_scale=args.text_scale,
                        chat_scale=args.chat_scale)
    print(json.dumps(prepare(cfg)))


def _train_with_fallback(cfg):
    """flex_attention under torch.compile is the fast path; if it fails to build on this
    torch/GPU, fall back to compiled dense-mask SDPA, then to eager, rather than lose the run."""
    import sys
    import time
    from optimus_lab.train.loop import Trainer
    attempts = [cfg, replace(cfg, attention="mask"), replace(cfg, attention="mask", compile=False)]
    deadline = time.monotonic() + cfg.train_seconds  # fallbacks share one wall-clock budget
    for attempt in dict.fromkeys(attempts):
        try:
            attempt = replace(attempt, train_seconds=max(1.0, deadline - time.monotonic()))
            trainer = Trainer(attempt)
            return trainer, {**trainer.train(), "attention": attempt.attention, "compiled": attempt.compile}
        except Exception as exc:  # noqa: BLE001 - any build failure moves to the next fallback
            if attempt.compile is False and attempt.attention == "mask":
                raise
            print(f"training with attention={attempt.attention} compile={attempt.compile} failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    raise RuntimeError("unreachable")


def _fit(args) -> None:
    from optimus_lab.train.loop import TrainConfig
    shape = replace(PRESETS[args.preset], vocab_size=args.vocab_size, max_position=args.seq_len)
    cfg = TrainConfig(data_dir=Path(args.data), out_dir=Path(args.out), shape=shape, seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps,
                      train_seconds=args.seconds, device=args.device, compile=not args.no_compile,
                      attention=args.attention, log_every=args.log_every, val_every=args.val_every,
                      text_fraction=args.text_fraction, chunk_mix=args.chunk_mix,
                      max_shard_bytes=args.shard_mb * 2**20 if args.shard_mb else None,
                      init_dir=Path(args.init) if args.init else None)
    trainer, summary = _train_with_fallback(cfg)
    summary["heldout_text_loss"] = trainer.heldout_loss("text_val")
    summary["params"] = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps(summary), flush=True)
    trainer.save(Path(args.out), {"summary": summary})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m optimus_lab.train")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--extracted", default=None, help="unpacked sources (scripts/data/fetch.sh)")
    p.add_argument("--out", required=True)
    p.add_argument("--text-scale", type=float, default=1.0)
    p.add_argument("--chat-scale", type=float, default=1.0)
    f = sub.add_parser("fit")
    f.add_argument("--data", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--preset", choices=sorted(PRESETS), default="default")
    f.add_argument("--batch-size", type=int, default=128)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--warmup", type=int, default=300)
    f.add_argument("--steps", type=int, default=10**9)
    f.add_argument("--seconds", type=float, default=float("inf"))
    f.add_argument("--device", default="cuda")
    f.add_argument("--no-compile", action="store_true")
    f.add_argument("--attention", choices=("flex", "mask"), default="flex")
    f.add_argument("--log-every", type=int, default=50)
    f.add_argument("--val-every", type=int, default=0)
    f.add_argument("--text-fraction", type=float, default=0.3)
    f.add_argument("--chunk-mix", type=float, default=0.0,
                   help="share of blocks trained as decoding chunks (robust chunked decoding)")
    f.add_argument("--init", default=None, help="fine-tune: start from this HF directory's weights")
    f.add_argument("--shard-mb", type=int, default=0, help="split weights into shards of this size")
    for q in (p, f):
        q.add_argument("--vocab-size", type=int, default=8192)
        q.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    _prepare(args) if args.cmd == "prepare" else _fit(args)


if __name__ == "__main__":
    main()
