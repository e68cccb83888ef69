"""The process group of one tensor-parallel model: collectives on the model's device (NCCL on
GPUs, gloo on CPU) and a gloo side group for rank 0's commands (plain Python objects)."""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that waits longer has lost a peer


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device: torch.device
    commands: object  # the gloo group that carries rank 0's commands

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks, in place (a row-parallel layer's partial outputs)."""
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` (same shape on every rank), in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return parts

    def all_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def send(self, message: object) -> None:
        """Rank 0: hand ``message`` to every worker (in order)."""
        dist.broadcast_object_list([message], src=0, group=self.commands)

    def receive(self) -> object:
        """A worker: the next message rank 0 sent."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(base: torch.device, rank: int) -> torch.device:
    """One GPU per rank (``cuda:rank`` counted from ``base``'s index); every rank on the CPU."""
    if base.type == "cuda":
        return torch.device("cuda", (base.index or 0) + rank)
    return base


def join_group(rank: int, size: int, address: str, device: torch.device) -> TPGroup:
    """Join the group at ``address`` (``tcp://host:port``); blocks until every rank has."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=TIMEOUT)
    commands = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return TPGroup(rank, size, device, commands)


def free_address() -> str:
    """A ``tcp://127.0.0.1:PORT`` rendezvous no process listens on now (ranks of one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
