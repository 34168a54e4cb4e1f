"""Many processes, one model: PyTorch DistributedDataParallel under `torchrun` (NCCL on GPUs, gloo on CPUs).

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UnnoiseError


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """'auto' takes this process's CUDA device when there is one, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnnoiseError(f"--device {choice}: no CUDA device is available here")
        return torch.device(choice if ":" in choice else f"cuda:{local_rank}")
    if choice != "cpu":
        raise UnnoiseError(f"unknown device {choice!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device_choice: str = "auto") -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size == 1:
        return Distributed(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def barrier(setup: Distributed) -> None:
    if setup.world_size > 1:
        dist.barrier()


def mean_across(value: torch.Tensor, setup: Distributed) -> torch.Tensor:
    """The mean of a tensor over all processes (itself with one process)."""
    if setup.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= setup.world_size
    return value


def shutdown(setup: Distributed) -> None:
    if setup.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
