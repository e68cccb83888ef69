"""One-off experiments behind the committed results (``benchmarks/results/<card>/<benchmark>/``),
each runnable as ``python -m optimus.bench.experiments.<name>``. Most need a CUDA device when
run; importing them does not.

- ``gpu_check``: the CUDA-graph, Triton, pre-captured, PDL and overlapped paths give the same
  tokens as eager torch on a tiny model of each family.
- ``step_profile``: where a decoding step's time goes (body, LM head, host gaps, kernels).
- ``attention_micro``: the ragged attention kernel against SDPA (flash) on uniform cases.
- ``skinny_micro``: the skinny-linear kernel against cuBLAS on the 8B projection shapes.
- ``ab_kernels``: in-engine A/B of the decode-step options (cuBLAS, skinny, PDL, greedy, overlap).
- ``graph_limit_ab``: CUDA graphs up to 512 vs 1,024 tokens on the policy sweep's workload.
- ``fused_check``: the fused decoder-layer kernels against torch, and their timing.
- ``simulate_elastic``: closed-loop policy simulation on a measured profile (CPU).
- ``gpu_timing``: the CUDA-graph timing helper the micro-benchmarks share.
"""
