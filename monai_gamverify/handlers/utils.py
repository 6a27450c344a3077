"""Helpers shared by the ignite handlers: batch items, the network's device, ranks and gathering across them."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from monai.utils import string_list_all_gather
from torch import nn

__all__ = ["batch_items", "network_device", "rank_and_world", "gather_strings"]


def batch_items(batch: Any) -> list[dict]:
    """The items of ``engine.state.batch``: a decollated list of dicts or a collated dict (split along axis 0).

    Args:
        batch: ``engine.state.batch`` or ``engine.state.output``.

    Returns:
        One dict per item (empty for ``None`` or anything else).

    Example:
        >>> batch_items({"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([0, 1])})[1]["label"]
        tensor(1)
    """
    if batch is None:
        return []
    if isinstance(batch, dict):
        n = next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0), 0)
        items = []
        for i in range(n):
            item = {}
            for k, v in batch.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == n:
                    item[k] = v[i]
                elif isinstance(v, (list, tuple)) and len(v) == n:
                    item[k] = v[i]
            items.append(item)
        return items
    if isinstance(batch, (list, tuple)):
        return [b for b in batch if isinstance(b, dict)]
    return []


def network_device(network: nn.Module) -> torch.device:
    """Device of the first parameter of ``network`` (CPU for a network without parameters)."""
    param = next(network.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside a multi-process run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_strings(strings: list[str]) -> list[str]:
    """All ranks' ``strings`` in rank order (MONAI's ``string_list_all_gather``); the input itself in one process.

    A collective call: every rank must call it. Strings must not contain a tab (JSON strings never do).
    """
    if rank_and_world()[1] <= 1:
        return list(strings)
    return [s for s in string_list_all_gather(list(strings)) if s]
