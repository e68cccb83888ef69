"""CUDA-graph timing shared by the GPU experiments (``python -m optimus.bench.experiments.<name>``)."""

import torch


def time_graph_ms(fn, calls: int = 20, rounds: int = 5, replays: int = 5) -> float:
    """Per-call GPU time: ``calls`` back-to-back calls captured in one CUDA graph, replayed;
    median over ``rounds`` of ``replays`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * calls))
    return sorted(times)[len(times) // 2]
