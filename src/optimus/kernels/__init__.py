"""Attention and KV-cache kernels: typed wrappers, private Triton kernels, torch references."""

from optimus.kernels.group_attention import group_attention, visible_key_end
from optimus.kernels.groups import request_start_rows
from optimus.kernels.kv_write import write_kv

__all__ = ["group_attention", "request_start_rows", "visible_key_end", "write_kv"]
