"""A quick check of a converted model against its AR base on held-out self-chat prompts.

For each decoding config: tokens committed per step (tau), the mean NLL of the answers under
the AR base (against the base's own greedy answers: their ratio is the quality measure the
block sweep picks by), the repeated-4-gram share and the answer length.
``python -m optimus_lab.train.convert_eval ADAPTER_DIR --data DIR --configs fixed:8,elastic``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from optimus.core.params import SamplingParams
from optimus_lab.evaluation.chat_suite import answer_nll, mean_of_finite, repeated_ngram_rate
from optimus_lab.train.selfchat import read_conversations


def _row(ar, prompts, answers: list[list[int]], steps: int, seconds: float) -> dict:
    tokens = sum(len(a) for a in answers)
    return {"nll_under_base": mean_of_finite(answer_nll(ar, prompts, answers)),
            "rep4": mean_of_finite([repeated_ngram_rate(a) for a in answers]),
            "length": round(tokens / len(answers), 1), "tau": round(tokens / max(1, steps), 3),
            "seconds": round(seconds, 1)}


def evaluate(adapter_dir: Path, data_dir: Path, configs: Sequence[str], n: int = 64, max_tokens: int = 256,
             device: str = "cuda") -> dict:
    from optimus.engine.llm import LLM
    from optimus.models.adapter import read_adapter_config
    from optimus.models.sources import resolve_base
    from optimus.models.loader import load_model
    convs = read_conversations(data_dir, val=True)[:n]
    prompts = [list(c.prompt_ids) for c in convs]
    ar = load_model(str(resolve_base(read_adapter_config(adapter_dir), progress=False)), device=device,
                    progress=False)
    eot = set(ar.spec.eos_ids)
    base_answers = [[t for t in c.answer_ids if t not in eot][:max_tokens] for c in convs]
    result = {"prompts": len(convs), "max_tokens": max_tokens,
              "ar_own": _row(ar, prompts, base_answers, sum(len(a) for a in base_answers), 0.0)}
    dllm = load_model(str(adapter_dir), device=device, progress=False)
    for name in configs:
        llm = LLM(loaded=dllm, policy=name, device=device, cuda_graphs=False)  # a quick check: no capture time
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        seconds = time.perf_counter() - start
        answers = [list(o.token_ids) for o in outs]
        steps = sum(o.stats.steps for o in outs)
        result[name] = _row(ar, prompts, answers, steps, seconds)
        result[name]["nll_ratio"] = round(result[name]["nll_under_base"] / result["ar_own"]["nll_under_base"], 3)
        result[name]["samples"] = [llm.tokenizer.decode(a) for a in answers[:3]]
        llm.engine.close()  # the next config's engine sizes its KV cache from the freed memory
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m optimus_lab.train.convert_eval")
    parser.add_argument("adapter")
    parser.add_argument("--data", required=True)
    parser.add_argument("--configs", default="elastic")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = evaluate(Path(args.adapter), Path(args.data), args.configs.split(","), args.n, args.max_tokens,
                      args.device)
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
