"""Small tensor helpers shared by every layer (no import of the package's other modules)."""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import convert_to_tensor

__all__ = ["plain_tensor"]


def plain_tensor(x: Any) -> Any:
    """``x`` without MONAI's ``MetaTensor`` bookkeeping: ``monai.utils.convert_to_tensor(x, track_meta=False)`` for a
    tensor (a MetaTensor's plain ``torch.Tensor`` view, sharing storage and autograd history; any other tensor
    unchanged), any other value unchanged (``convert_to_tensor`` would turn arrays and lists into tensors).

    Plain tensor operations skip MetaTensor's per-operation metadata handling, which is much faster in tight loops.

    Args:
        x: a tensor (MetaTensor or not), or any other value (returned as is).

    Returns:
        A plain ``torch.Tensor`` for a tensor, else ``x``.

    Example:
        >>> type(plain_tensor(MetaTensor(torch.zeros(2)))).__name__
        'Tensor'
    """
    return convert_to_tensor(x, track_meta=False) if isinstance(x, torch.Tensor) else x
