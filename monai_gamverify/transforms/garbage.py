"""K+1 "garbage" class at inference: :class:`RejectGarbaged` flags predictions of the garbage class."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform

from monai_gamverify.metrics.ood import as_scores

__all__ = ["RejectGarbaged", "RejectGarbageD", "RejectGarbageDict"]


class RejectGarbaged(MapTransform):
    """Dictionary post-transform flagging predictions of the garbage class (K+1 models).

    For each key (the prediction: logits or probabilities, shape (C,) for one item or (B, C) for a batch) it adds

    - ``rejected`` (bool): argmax is the garbage class, or the garbage probability is ``>= threshold``;
    - ``garbage_prob``: softmax probability of the garbage class;
    - ``best_real_class``: argmax over the real classes only (the answer the model would give without garbage);
    - ``best_real_prob``: that class's probability (under the softmax over all C classes).

    Outputs are tensors of shape () for one item and (B,) for a batch, on the prediction's device. Their keys are the
    names above, renamed by ``output_keys`` (e.g. ``{"rejected": "garbage_rejected"}``) and prefixed by ``prefix``
    (default: none for one key, ``"{key}_"`` with several). An output key already in the data raises ``KeyError``
    (so a caller's field is never silently replaced) unless ``allow_overwrite=True``.

    Args:
        keys: prediction key(s).
        garbage_index: index of the garbage class; ``None`` = the last one (K).
        threshold: optional garbage-probability threshold that also rejects; ``None`` = argmax only.
        logits: apply softmax first (``False`` when the values are already probabilities).
        prefix: prefix of the output keys.
        allow_missing_keys: skip absent keys.
        output_keys: new names of some of the four outputs (``None``: the names above).
        allow_overwrite: replace existing fields of the data with the outputs instead of raising.

    Example:
        >>> RejectGarbaged(keys="pred")({"pred": torch.tensor([0.1, 0.2, 3.0])})["rejected"]
        tensor(True)
    """

    #: the outputs, in order
    OUTPUTS = ("rejected", "garbage_prob", "best_real_class", "best_real_prob")

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        garbage_index: int | None = None,
        threshold: float | None = None,
        logits: bool = True,
        prefix: str | None = None,
        allow_missing_keys: bool = False,
        output_keys: Mapping[str, str] | None = None,
        allow_overwrite: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] or None, got {threshold!r}")
        names = dict(zip(self.OUTPUTS, self.OUTPUTS))
        unknown = set(output_keys or {}) - set(names)
        if unknown:
            raise ValueError(f"output_keys may rename {list(self.OUTPUTS)}, got unknown {sorted(unknown)}")
        names.update(output_keys or {})
        if len(set(names.values())) != len(names):
            raise ValueError(f"output_keys give two outputs the same key: {names}")
        self.garbage_index = garbage_index
        self.threshold = threshold
        self.logits = logits
        self.prefix = prefix
        self.output_keys = names
        self.allow_overwrite = allow_overwrite

    def reject(self, pred: Any) -> dict[str, torch.Tensor]:
        """The four outputs for one prediction (C,) or a batch (B, C)."""
        pred = as_scores(pred, "prediction", min_classes=2)
        c = pred.shape[-1]
        g = c - 1 if self.garbage_index is None else self.garbage_index
        if not -c <= g < c:
            raise ValueError(f"garbage_index {self.garbage_index} out of range for predictions with {c} classes")
        g %= c
        if self.logits:
            probs = torch.softmax(pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred, dim=-1)
        else:
            if (pred < -1e-6).any() or (pred > 1 + 1e-6).any():
                raise ValueError("logits=False but the prediction has values outside [0, 1]; pass logits=True")
            probs = pred
        garbage_prob = probs[..., g]
        real = torch.cat([probs[..., :g], probs[..., g + 1 :]], dim=-1)
        best_prob, best = real.max(dim=-1)
        best = best + (best >= g).long()  # back to the original class indices
        rejected = probs.argmax(dim=-1) == g
        if self.threshold is not None:
            rejected = rejected | (garbage_prob >= self.threshold)
        return {
            "rejected": rejected,
            "garbage_prob": garbage_prob,
            "best_real_class": best,
            "best_real_prob": best_prob,
        }

    def output_key(self, key: Hashable, name: str) -> str:
        """Data key of output ``name`` for prediction ``key``."""
        prefix = self.prefix if self.prefix is not None else (f"{key}_" if len(self.keys) > 1 else "")
        return f"{prefix}{self.output_keys[name]}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        targets = [self.output_key(key, name) for key in keys for name in self.OUTPUTS]
        if len(set(targets)) != len(targets):
            raise ValueError(f"RejectGarbaged outputs collide ({targets}); give a prefix per key")
        clash = [t for t in targets if t in d]
        if clash and not self.allow_overwrite:
            raise KeyError(
                f"RejectGarbaged would overwrite {clash} already in the data: rename its outputs with output_keys= or "
                "prefix=, or pass allow_overwrite=True"
            )
        for key in keys:
            for name, value in self.reject(d[key]).items():
                d[self.output_key(key, name)] = value
        return d


RejectGarbageD = RejectGarbageDict = RejectGarbaged
