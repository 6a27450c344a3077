"""Processes of a cohort run: ``torch.distributed`` set-up under ``torchrun``, barriers, gathering, sharding."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["dist_setup", "barrier", "gather", "shard"]


def dist_setup(device: str | torch.device | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, initialised here); initialises torch.distributed only under torchrun.

    Example:
        >>> rank, world, dev, initialised = dist_setup("cpu")
    """
    initialised = False
    env = os.environ
    wanted = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and int(env["WORLD_SIZE"]) > 1
    local_rank = int(env.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if wanted and dist.is_available() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        initialised = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device(device or "cpu")
    else:
        rank, world = 0, 1
        dev = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    return rank, world, dev, initialised


def barrier(world: int) -> None:
    """Wait for every rank (nothing in a single-process run)."""
    if world > 1:
        dist.barrier()


def gather(obj: Any, world: int) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single-process run)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)  # works on gloo and NCCL (the device is set); rows are small
    return out


def shard(n: int, rank: int, world: int) -> list[int]:
    """Item indices of ``rank``: ``DistributedSampler(shuffle=False)`` order without its padding duplicates (what
    ``monai.data.DistributedSampler(even_divisible=False)`` gives, also when there are fewer items than ranks)."""
    return list(range(rank, n, world))
