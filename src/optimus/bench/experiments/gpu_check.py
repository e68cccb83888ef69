"""GPU correctness checks for the engine path: CUDA-graph replay and the Triton kernel must
give the same tokens as eager torch attention on a tiny model, and overlapped steps (the
default) the same as synchronous ones (run on the device machine):

  PYTHONPATH=src python -m optimus.bench.experiments.gpu_check gpu_check.json
"""

import json
import sys

import torch

from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from optimus import toggles
from optimus.kernels import pdl
from fixtures.engine import tiny_loaded


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
    report = {"device": torch.cuda.get_device_name(), "pdl": pdl.launch_pdl(torch.device("cuda"))}
    ok = True
    for family, policy in [("sdar", "fixed:8"), ("sdar", "fixed:3"), ("llada", "fixed:4"), ("dream", "fixed:4"),
                           ("llama", "ar")]:
        ref = outputs(family, policy=policy, cuda_graphs=False, attention_backend="torch")
        tri = outputs(family, policy=policy, cuda_graphs=False, attention_backend="triton")
        gra = outputs(family, policy=policy, cuda_graphs=True, attention_backend="triton")
        pre = outputs(family, policy=policy, cuda_graphs=True, graph_precapture=True, attention_backend="triton")
        with toggles.override(pdl=False):  # the same graphs with every kernel launched the ordinary way
            no_pdl = outputs(family, policy=policy, cuda_graphs=True, graph_precapture=True,
                             attention_backend="triton")
        sync = outputs(family, policy=policy, cuda_graphs=True, graph_precapture=True, attention_backend="triton",
                       overlap=False)
        checks = {"overlap_equals_sync": pre == sync, "triton_equals_torch": ref == tri, "graph_equals_torch": ref == gra,
                  "precaptured_graph_equals_torch": ref == pre, "pdl_equals_no_pdl": pre == no_pdl}
        ok &= all(checks.values())
        report[f"{family}/{policy}"] = checks
        print(family, policy, *(f"{k}={v}" for k, v in checks.items()), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
