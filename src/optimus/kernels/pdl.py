"""Programmatic dependent launch (PDL, Hopper and newer) for the engine's Triton kernels.

A small decode step is a chain of ~10 dependent kernels per layer, and in a CUDA graph each
boundary still costs a launch plus the next grid's ramp. With PDL a kernel is launched
while its predecessor runs: its programs become resident and wait on the device, so the
boundary costs less. H100, Llama-8B AR
(benchmarks/results/h100/ab_kernels/history/2026-11-26_adbab9d_pdl_l2_prefetch.json): batch 1
143.7 -> 146.5 tok/s, batch 8 1,044 -> 1,068; LLaDA-8B at 32 rows per step (cuBLAS projections) unchanged.
Prefetching the skinny linear's weights into L2 before the wait gained nothing and was
dropped.

Contract of every kernel launched with ``launch_pdl=True`` (the ``PDL`` constexpr):
  1. nothing the predecessor writes is read, and nothing it reads is written, before
     ``gdc_wait()`` (which returns once the predecessor finished and its writes are visible);
  2. ``gdc_launch_dependents()`` comes right after the wait, so at most one grid runs
     ahead: the next kernel's programs can only take SM slots once all of ours are placed.
Kernels launched without the flag (cuBLAS, torch ops) are ordinary stream dependencies.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from optimus import toggles



def launch_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (read on every launch, so on capture)."""
    return toggles.active().pdl and device.type == "cuda" and _supported(device.index)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the kernel's ``PDL`` prologue and the launch
    attribute, always on or off together (the attribute is left out when off: Triton
    releases before 3.4 do not know it)."""
    return {"PDL": True, "launch_pdl": True} if launch_pdl(device) else {"PDL": False}


@functools.lru_cache(maxsize=None)
def _supported(index: int | None) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    fields = {f.name for f in dataclasses.fields(CUDAOptions)}
    return "launch_pdl" in fields and hasattr(tl.extra.cuda, "gdc_wait")


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    """Kernel prologue under the contract above (a no-op when not launched with PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
