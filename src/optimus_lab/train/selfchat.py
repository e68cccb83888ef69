"""Self-generated conversations: an AR chat model writes its own questions, then answers them.

A question is a sampled continuation of the chat template's system turn and an open user
turn, up to the end-of-turn token; its answer is the model's greedy reply, which is what a
block-diffusion model converted from it learns to reproduce. Replies that hit the token limit
(mostly loops) are dropped. No corpus is read, so the data carries the base model's licence.

Output (``write_dataset``): ``chat_train.bin.gz`` / ``chat_val.bin.gz`` packed rows (prompt
tokens flagged clean, see ``pack.py``), ``meta.json`` (the special ids the trainer needs) and
``conversations.jsonl.gz`` (questions, token ids and the held-out mark).
"""

from __future__ import annotations

import gzip
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from optimus.core.params import SamplingParams
from optimus_lab.train.pack import pack_examples, save_rows

_SENTINEL = "\u2063QUESTION\u2063"  # a text no template rewrites, to cut the rendered turn at


@dataclass(frozen=True)
class Conversation:
    question: str
    prompt_ids: tuple[int, ...]  # the rendered chat prompt, ending with the assistant header
    answer_ids: tuple[int, ...]  # the reply, ending with the end-of-turn id


@dataclass(frozen=True)
class SelfChatConfig:
    conversations: int = 20_000
    max_question_tokens: int = 96
    max_answer_tokens: int = 512
    temperature: float = 1.0  # questions only; answers are greedy
    top_p: float = 0.95
    seed: int = 0
    val_every: int = 50  # every n-th conversation is held out
    seconds: float = 0.0  # > 0: stop starting rounds once the next would end past this budget
    round_size: int = 4096  # question prompts per round (a round's answers are generated before the next)


def question_prefix(tokenizer) -> str:
    """The rendered chat up to where a user's words begin (system turn included, if the template adds one)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=False)
    return rendered[:rendered.index(_SENTINEL)]


def _questions(llm, cfg: SelfChatConfig, first: int, count: int, end_of_turn: int) -> list[str]:
    """Questions sampled for prompts ``first .. first + count`` (each prompt's own seed)."""
    prefix = llm.tokenizer.encode(question_prefix(llm.tokenizer))
    params = [SamplingParams(max_tokens=cfg.max_question_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             seed=cfg.seed * 1_000_003 + i, stop_token_ids=(end_of_turn,))
              for i in range(first, first + count)]
    outs = llm.generate([prefix] * count, params)
    return [q for o in outs if o.finish_reason == "stop" and len(q := o.text.strip()) >= 8]


def _answers(llm, cfg: SelfChatConfig, questions: list[str], end_of_turn: int) -> list[Conversation]:
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in questions]
    outs = llm.generate(prompts, SamplingParams(max_tokens=cfg.max_answer_tokens, temperature=0.0,
                                                stop_token_ids=(end_of_turn,)))
    return [Conversation(q, tuple(p), tuple(o.token_ids) + (end_of_turn,))
            for q, p, o in zip(questions, prompts, outs) if o.finish_reason == "stop" and o.token_ids]


def generate_conversations(llm, cfg: SelfChatConfig, end_of_turn: int, log=print) -> list[Conversation]:
    """``llm``: an ``optimus.engine.llm.LLM`` over an AR chat model (policy ``ar``). Rounds of
    ``cfg.round_size`` prompts (questions, then their answers) until ``cfg.conversations``
    prompts are used or, with ``cfg.seconds``, the next round would overrun the budget: a
    bounded run keeps everything finished so far. Questions are distinct across rounds."""
    start, seen, convs, first = time.perf_counter(), set(), [], 0
    while first < cfg.conversations:
        round_start = time.perf_counter()
        count = min(cfg.round_size, cfg.conversations - first)
        fresh = [q for q in dict.fromkeys(_questions(llm, cfg, first, count, end_of_turn)) if q not in seen]
        seen.update(fresh)
        done = _answers(llm, cfg, fresh, end_of_turn)
        convs += done
        first += count
        took, elapsed = time.perf_counter() - round_start, time.perf_counter() - start
        log(f"round to prompt {first}: {len(fresh)} new questions, {len(done)} finished answers "
            f"({sum(len(c.answer_ids) for c in done)} tokens) in {took:.0f}s; {len(convs)} in all, {elapsed:.0f}s")
        if cfg.seconds and elapsed + took > cfg.seconds:
            break
    tokens = sum(len(c.answer_ids) for c in convs)
    log(f"answers: {len(convs)} finished of {len(seen)} questions from {first} prompts, {tokens} tokens, "
        f"{tokens / max(1e-9, time.perf_counter() - start):.0f} tok/s")
    return convs


def write_dataset(convs: list[Conversation], out_dir: Path, cfg: SelfChatConfig, ids: dict[str, int],
                  seq_len: int, block: int) -> dict:
    """Pack and save; ``ids``: mask_id, eos_id (end of turn) and fill_id (fills an answer's last block)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    val = [c for i, c in enumerate(convs) if i % cfg.val_every == cfg.val_every - 1]
    train = [c for i, c in enumerate(convs) if i % cfg.val_every != cfg.val_every - 1]
    random.Random(cfg.seed).shuffle(train)
    rows = {}
    for name, part in (("chat_train", train), ("chat_val", val)):
        rows[name] = pack_examples(((c.prompt_ids, c.answer_ids) for c in part), ids["fill_id"], seq_len, block)
        save_rows(rows[name], out_dir / f"{name}.bin.gz")
    with gzip.open(out_dir / "conversations.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, c in enumerate(convs):
            f.write(json.dumps({"question": c.question, "prompt_ids": c.prompt_ids, "answer_ids": c.answer_ids,
                                "val": i % cfg.val_every == cfg.val_every - 1}) + "\n")
    meta = {"source": "selfchat", "config": asdict(cfg), "ids": ids, "seq_len": seq_len, "block": block,
            "rows": {k: int(v.shape[0]) for k, v in rows.items()}, "conversations": len(convs),
            "answer_tokens": sum(len(c.answer_ids) for c in convs)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_conversations(data_dir: Path, val: bool | None = None) -> list[Conversation]:
    with gzip.open(data_dir / "conversations.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [Conversation(r["question"], tuple(r["prompt_ids"]), tuple(r["answer_ids"]))
            for r in rows if val is None or r["val"] == val]
