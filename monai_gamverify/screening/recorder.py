"""Record the screen's features during a forward pass that runs anyway (the CAM's), so screening costs no extra pass.

:class:`FeatureRecorder` hooks the early layers (their outputs) and the classifier head (its input: the penultimate
features) and keeps what the **first** forward pass after entering (or :meth:`FeatureRecorder.reset`) produced; the
later passes of Score-CAM (masked inputs) are ignored. With ``reduce="mean"`` (pooled early layers only) it averages
the pooled activations of every sample of every pass instead: the windows a ``SlidingWindowInferer`` cuts from one
volume or the slices a 2D network sees of a volume, each with equal weight (the head's input too). Hooks are removed
on exit, whatever happens.
``visualize.hooks`` records the last call of a layer's *output*; this recorder needs the first call and a
module's *input*, hence this small helper.

Example:
    >>> with FeatureRecorder(net, early_layers=["stem"], head="head") as rec:
    ...     result = GradCAM(net, "res4").explain(x)
    >>> rec.activations["stem"].shape, rec.activations[PENULTIMATE].shape
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from monai_gamverify.screening.detectors import pool_features
from monai_gamverify.visualize.hooks import resolve_layers

__all__ = ["FeatureRecorder", "PENULTIMATE"]

#: key of the classifier head's input in :attr:`FeatureRecorder.activations`
PENULTIMATE = "penultimate"


class FeatureRecorder:
    """Context manager recording early-layer outputs and the classifier head's input (detached copies).

    Args:
        model: the network.
        early_layers: names (``model.named_modules()``) whose outputs are recorded.
        head: name of the classifier head whose input is recorded under :data:`PENULTIMATE` (``None``: none).
        pool: store each early layer's output as its (B, 2C) float64 channel means then standard deviations (what
            the screen uses, :func:`~monai_gamverify.screening.detectors.pool_features` with ``moments=2``) instead
            of a whole copy: a copy of a 16-channel stem output of a 256^3 volume takes 1 GiB.
        reduce: ``"first"``: the first forward pass; ``"mean"`` (needs ``pool``): the mean of the pooled rows of every
            pass (a segmentation network run window by window: (1, 2C), the average over the windows; a 2D network
            run slice by slice: the head's input averaged over the slices too).

    Attributes:
        activations: dict name -> tensor from the first forward pass since entering or :meth:`reset`.
    """

    def __init__(
        self,
        model: nn.Module,
        early_layers: Sequence[str] = (),
        head: str | None = None,
        pool: bool = False,
        reduce: str = "first",
    ) -> None:
        if reduce not in ("first", "mean"):
            raise ValueError(f"reduce must be 'first' or 'mean', got {reduce!r}")
        if reduce == "mean" and not pool:
            raise ValueError("reduce='mean' averages pooled activations: pass pool=True")
        self.model = model
        self.pool = bool(pool)
        self.reduce = reduce
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.modules = resolve_layers(model, list(early_layers)) if early_layers else {}
        self.head = resolve_layers(model, head)[head] if head else None
        self.activations: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _out_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if self.reduce == "mean" and isinstance(output, torch.Tensor):
                rows = torch.from_numpy(pool_features(output.detach(), moments=2))
                total, count = self._sums.get(name, (0.0, 0))
                total, count = rows.sum(0, keepdim=True) + total, count + rows.shape[0]
                self._sums[name] = (total, count)
                self.activations[name] = total / count
            elif name not in self.activations and isinstance(output, torch.Tensor):
                out = output.detach()
                self.activations[name] = torch.from_numpy(pool_features(out, moments=2)) if self.pool else out.clone()

        return hook

    def _head_hook(self, module: nn.Module, inputs: tuple) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        if self.reduce == "mean":  # a 2D head applied slice by slice: the mean head input over every slice
            rows = inputs[0].detach().double().reshape(inputs[0].shape[0], -1).cpu()
            total, count = self._sums.get(PENULTIMATE, (0.0, 0))
            total, count = rows.sum(0, keepdim=True) + total, count + rows.shape[0]
            self._sums[PENULTIMATE] = (total, count)
            self.activations[PENULTIMATE] = total / count
        elif PENULTIMATE not in self.activations:
            self.activations[PENULTIMATE] = inputs[0].detach().clone()

    def __enter__(self) -> FeatureRecorder:
        self.reset()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._out_hook(name)))
        if self.head is not None:
            self._handles.append(self.head.register_forward_pre_hook(self._head_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def reset(self) -> None:
        """Forget what was recorded (the next forward pass is recorded)."""
        self.activations = {}
        self._sums = {}

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
