"""GPU correctness checks for the engine path: CUDA-graph replay and the Triton kernel must
give the same tokens as eager torch attention on a tiny model (run on the device machine)."""

import json
import sys

import torch

from optimus.engine.llm import LLM
from optimus.engine.params import SamplingParams
from optimus.testing.engine import tiny_loaded


def Loaded(family):
    loaded = tiny_loaded(family)
    loaded.model.cuda()
    return loaded


def outputs(family, **opts):
    llm = LLM(loaded=Loaded(family), device="cuda", num_pages=512, page_size=16, block_size=8, **opts)
    prompts = [[(7 * i + j) % 200 + 1 for j in range(3 + 5 * i)] for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    return [o.token_ids for o in outs]


def main(out_path: str) -> int:
    report = {}
    ok = True
    for family, policy in [("sdar", "fixed:8"), ("sdar", "fixed:3"), ("llada", "fixed:4"), ("dream", "fixed:4"),
                           ("llama", "ar")]:
        ref = outputs(family, policy=policy, cuda_graphs=False, attention_backend="torch")
        tri = outputs(family, policy=policy, cuda_graphs=False, attention_backend="triton")
        gra = outputs(family, policy=policy, cuda_graphs=True, attention_backend="triton")
        pre = outputs(family, policy=policy, cuda_graphs=True, graph_precapture=True, attention_backend="triton")
        same_tri, same_graph, same_pre = ref == tri, ref == gra, ref == pre
        ok &= same_tri and same_graph and same_pre
        report[f"{family}/{policy}"] = {"triton_equals_torch": same_tri, "graph_equals_torch": same_graph,
                                        "precaptured_graph_equals_torch": same_pre}
        print(family, policy, "triton==torch", same_tri, "graph==torch", same_graph, "precaptured==torch",
              same_pre, flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
