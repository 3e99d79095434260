"""One process or many (torchrun): where this process stands among the run's processes, and the few collective
operations the package needs. With one process every operation is a no-op, so callers never branch on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Place:
    """This process among the run's processes: its rank, their number, its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints progress (rank 0: the others compute the same results)."""
        return self.rank == 0


LOCAL = Place()


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def distributed(device: str | torch.device) -> Iterator[Place]:
    """This process's place; under torchrun, inside the process group (NCCL on GPUs, gloo on CPU)."""
    dev = torch.device(device)
    if not launched():
        yield Place(0, 1, dev)
        return
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    try:
        yield Place(dist.get_rank(), dist.get_world_size(), dev)
    finally:
        dist.destroy_process_group()


def current(device: str | torch.device) -> Place:
    """This process's place in the process group already initialized (by `distributed` or the caller), or alone."""
    if dist.is_initialized():
        return Place(dist.get_rank(), dist.get_world_size(), torch.device(device))
    return Place(0, 1, torch.device(device))


def all_reduce(t: Tensor, place: Place) -> None:
    """Sum `t` over the processes, in place (through the process's device: NCCL reduces GPU tensors only)."""
    if place.world == 1:
        return
    on_device = t.to(place.device)
    dist.all_reduce(on_device)
    if on_device is not t:
        t.copy_(on_device)


def on_any(flag: bool, place: Place) -> bool:
    """Whether `flag` is set in any process: all must take the same branch at the same step."""
    if place.world == 1:
        return flag
    t = torch.tensor(float(flag), device=place.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def broadcast_buffers(module: torch.nn.Module, place: Place) -> None:
    """Give every process rank 0's buffers (DDP leaves each with BatchNorm statistics of its own share)."""
    if place.world > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def barrier(place: Place) -> None:
    """Wait for every process."""
    if place.world > 1:
        dist.barrier()
