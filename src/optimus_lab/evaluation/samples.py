"""Chat samples and the CPU latency of a 64-token answer for the default model's docs.

``python -m optimus_lab.evaluation.samples --out PATH``: answers a few prompts (engine, fixed:32,
threshold 0.9) and times 64-token answers (eos ignored, so exactly 64 tokens are decoded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from optimus.core.params import SamplingParams

PROMPTS = ("Hello!", "Who are you?", "What is 482 + 397?", "What is 905 - 268?",
           "Sort these numbers from smallest to largest: 42 7 19 88 3", "Reverse the order of these words: river stone cloud",
           "What does the word \"harbor\" mean?", "Tell me a saying.", "Define courage.")


def chat_samples(llm, prompts=PROMPTS) -> list[dict]:
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    outs = llm.chat(msgs, SamplingParams(max_tokens=96, temperature=0.0))
    return [{"prompt": p, "answer": o.text, "steps": o.stats.steps, "tokens": o.stats.tokens_committed}
            for p, o in zip(prompts, outs)]


def answer_latency(llm, tokens: int = 64, repeats: int = 5) -> dict:
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a saying."}]))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up
    times, steps = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        times.append(time.perf_counter() - start)
        steps.append(out.stats.steps)
        assert len(out.token_ids) == tokens
    return {"answer_tokens": tokens, "seconds_median": round(statistics.median(times), 3),
            "seconds": [round(t, 3) for t in times], "steps": steps, "threads": torch.get_num_threads()}


def main() -> None:
    from optimus.engine.llm import LLM
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--policy", default="fixed:32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    llm = LLM(model=args.model, policy=args.policy, device="cpu")
    result = {"policy": args.policy, "samples": chat_samples(llm), "latency_64": answer_latency(llm)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
