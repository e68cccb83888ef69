"""``python -m optimus_lab.train prepare|selfchat|fit``: rebuild the shipped models' data and weights.

prepare: cleaned sources -> tokenizer + packed rows (see ``prepare.py``).
selfchat: an AR chat model writes and answers its own questions -> packed rows (``selfchat.py``).
fit: train on packed rows and write an HF directory (see ``loop.py``); ``--preset tiny`` is the
CPU smoke configuration; ``--base MODEL`` converts a pretrained AR model instead (an adapter
directory, ``convert.py``).
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


def _selfchat(args) -> None:
    from optimus.engine.llm import LLM
    from optimus_lab.train.selfchat import SelfChatConfig, generate_conversations, write_dataset
    llm = LLM(args.base, policy="ar", device=args.device, max_running=args.max_running,
              max_waiting=max(1024, args.round_size))  # generate() queues a round's requests at once
    tok = llm.tokenizer
    ids = {"mask_id": args.mask_id, "eos_id": tok.end_of_turn_id, "fill_id": tok.token_to_id(args.fill_token)}
    if None in ids.values():
        raise SystemExit(f"{args.base}: the tokenizer lacks an end-of-turn token or {args.fill_token!r}: {ids}")
    cfg = SelfChatConfig(conversations=args.conversations, max_answer_tokens=args.max_answer_tokens, seed=args.seed,
                         seconds=args.seconds, round_size=args.round_size)
    convs = generate_conversations(llm, cfg, ids["eos_id"])
    print(json.dumps(write_dataset(convs, Path(args.out), cfg, ids, args.seq_len, args.block)))


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
    shape = replace(PRESETS[args.preset], vocab_size=args.vocab_size, max_position=args.seq_len, block_size=args.block)
    cfg = TrainConfig(data_dir=Path(args.data), out_dir=Path(args.out), shape=shape, seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps,
                      train_seconds=args.seconds, device=args.device, compile=not args.no_compile,
                      attention=args.attention, log_every=args.log_every, val_every=args.val_every,
                      keep_best=args.keep_best, text_fraction=args.text_fraction, chunk_mix=args.chunk_mix,
                      max_shard_bytes=args.shard_mb * 2**20 if args.shard_mb else None,
                      init_dir=Path(args.init) if args.init else None, conversion=_conversion(args),
                      heldout="chat_val" if args.base else "text_val")
    trainer, summary = _train_with_fallback(cfg)
    summary["heldout_text_loss" if cfg.conversion is None else "heldout_loss"] = trainer.heldout_loss()
    summary["params"] = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps(summary), flush=True)
    trainer.save(Path(args.out), {"summary": summary})


def _conversion(args):
    if not args.base:
        return None
    from optimus_lab.train.convert import Conversion
    return Conversion(args.base, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.base_name)


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
    f.add_argument("--seconds", type=float, default=float("inf"), help="training time after the first (compiling) step")
    f.add_argument("--device", default="cuda")
    f.add_argument("--no-compile", action="store_true")
    f.add_argument("--attention", choices=("flex", "mask"), default="flex")
    f.add_argument("--log-every", type=int, default=50)
    f.add_argument("--val-every", type=int, default=0)
    f.add_argument("--keep-best", action="store_true",
                   help="save the weights of the lowest held-out loss seen at --val-every, not the last")
    f.add_argument("--text-fraction", type=float, default=0.3)
    f.add_argument("--chunk-mix", type=float, default=0.0,
                   help="share of blocks trained as decoding chunks (robust chunked decoding)")
    f.add_argument("--init", default=None, help="fine-tune: start from this HF directory's weights")
    f.add_argument("--shard-mb", type=int, default=0, help="split weights into shards of this size")
    f.add_argument("--base", default=None, help="convert this AR model (what --model takes) with a low-rank adapter")
    f.add_argument("--base-name", default=None, help="the base's name in the adapter (default: --base)")
    f.add_argument("--lora-rank", type=int, default=16)
    f.add_argument("--lora-alpha", type=float, default=0.0, help="default: 2 x rank")
    c = sub.add_parser("selfchat")
    c.add_argument("--base", required=True, help="the AR chat model that writes the conversations")
    c.add_argument("--out", required=True)
    c.add_argument("--conversations", type=int, default=20_000)
    c.add_argument("--max-answer-tokens", type=int, default=512)
    c.add_argument("--mask-id", type=int, required=True, help="a token id the tokenizer never emits for text")
    c.add_argument("--fill-token", default="<|endoftext|>", help="fills an answer's last block")
    c.add_argument("--max-running", type=int, default=512)
    c.add_argument("--device", default="cuda")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--seconds", type=float, default=0.0,
                   help="time budget: no round starts that would end past it (0: none)")
    c.add_argument("--round-size", type=int, default=4096, help="question prompts per round")
    for q in (p, f, c):
        q.add_argument("--vocab-size", type=int, default=8192)
        q.add_argument("--seq-len", type=int, default=512)
    for q in (f, c):
        q.add_argument("--block", type=int, default=32, help="denoising block (selfchat: examples align to it)")
    args = parser.parse_args(argv)
    {"prepare": _prepare, "selfchat": _selfchat, "fit": _fit}[args.cmd](args)


if __name__ == "__main__":
    main()
