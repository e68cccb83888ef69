"""GPU correctness checks for the engine path: CUDA-graph replay and the Triton kernel must
give the same tokens as eager torch attention on a tiny model, and overlapped steps (the
default) and pipelined diffusion steps (two halves in flight) the same as synchronous ones
(run on the device machine):

  PYTHONPATH=src python -m optimus.bench.experiments.gpu_check gpu_check.json
"""

import json
import sys

import torch

from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from optimus import toggles
from optimus.kernels import pdl
from optimus.reference import fast_dllm
from fixtures.engine import tiny_loaded


def Loaded(family):
    loaded = tiny_loaded(family)
    loaded.model.cuda()
    return loaded


PROMPTS = [[(7 * i + j) % 200 + 1 for j in range(3 + 5 * i)] for i in range(6)]


def outputs(family, **opts):
    llm = LLM(loaded=Loaded(family), device="cuda", num_pages=512, page_size=16, block_size=8, **opts)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def dual_cache_equals_fast_dllm() -> bool:
    """The engine's default LLaDA mode (dual cache, C = block, Triton + CUDA graphs) against the
    reference Fast-dLLM dual-cache loop, threshold 0.9, on the GPU."""
    loaded = Loaded("llada")
    want = [fast_dllm.generate_with_dual_cache(loaded.model, [p], steps=24, gen_length=24, block_length=8,
                                               threshold=0.9).generated[0].tolist() for p in PROMPTS]
    return outputs("llada", policy="fixed:8") == want


def main(out_path: str) -> int:
    report = {"device": torch.cuda.get_device_name(), "pdl": pdl.launch_pdl(torch.device("cuda"))}
    ok = True
    # LLaDA and Dream run their default dual cache (chunk 4 < block 8: mid-block stores too),
    # LLaDA also its prefix cache and the prefix-block mode.
    for family, policy, mode in [("sdar", "fixed:8", "auto"), ("sdar", "fixed:3", "auto"),
                                 ("llada", "fixed:4", "auto"), ("llada", "fixed:8", "prefix-cache"),
                                 ("llada", "fixed:4", "prefix-block"), ("dream", "fixed:4", "auto"),
                                 ("llama", "ar", "auto")]:
        run = lambda **o: outputs(family, policy=policy, cache_mode=mode, **o)  # noqa: E731
        ref = run(cuda_graphs=False, attention_backend="torch")
        tri = run(cuda_graphs=False, attention_backend="triton")
        gra = run(cuda_graphs=True, attention_backend="triton")
        pre = run(cuda_graphs=True, graph_precapture=True, attention_backend="triton")
        with toggles.override(pdl=False):  # the same graphs with every kernel launched the ordinary way
            no_pdl = run(cuda_graphs=True, graph_precapture=True, attention_backend="triton")
        sync = run(cuda_graphs=True, graph_precapture=True, attention_backend="triton", overlap=False,
                   pipeline="off")
        halves = run(cuda_graphs=True, graph_precapture=True, attention_backend="triton", pipeline="2")
        checks = {"overlap_equals_sync": pre == sync, "pipeline_equals_sync": halves == sync, "triton_equals_torch": ref == tri, "graph_equals_torch": ref == gra,
                  "precaptured_graph_equals_torch": ref == pre, "pdl_equals_no_pdl": pre == no_pdl}
        ok &= all(checks.values())
        report[f"{family}/{policy}/{mode}"] = checks
        print(family, policy, mode, *(f"{k}={v}" for k, v in checks.items()), flush=True)
    exact = dual_cache_equals_fast_dllm()
    report["llada/fixed:8/dual-cache"] = {"equals_fast_dllm_reference_loop": exact}
    print("llada dual cache equals the Fast-dLLM reference loop:", exact, flush=True)
    ok &= exact
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
