"""The one hook manager of the package: record (and optionally re-root) named layers' outputs during a forward pass.

Every hook registered here is removed when the context exits, whatever happens inside it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["resolve_layers", "LayerHooks", "record_activations", "model_state", "preserved_state"]


def resolve_layers(model: nn.Module, names: str | Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names (as in ``model.named_modules()``) to modules, with close-match suggestions on a typo.

    Args:
        model: the network.
        names: one name or a sequence of names.

    Returns:
        Ordered dict name -> module (duplicates removed, order kept).

    Example:
        >>> resolve_layers(net, ["layer1", "layer4"])
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("no target layer given")
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}")
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown layer name {name!r} in {type(model).__name__}{hint}")
        out[name] = modules[name]
    return out


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every wanted layer has run."""


class LayerHooks:
    """Context manager recording named layers' outputs; all hooks are removed on exit.

    Args:
        model: the network.
        layers: names of the layers to record.
        transform: optional ``f(name, output) -> output``; its return value replaces the layer's output in the
            forward pass (used by the CAM engine to make the activation a differentiable leaf).
        stop_early: raise internally after the last wanted layer has run, so later layers are never computed;
            use :meth:`run` to swallow that signal.
        keep_copy: store a copy of each output, safe from in-place operations of later layers.

    Example:
        >>> with LayerHooks(net, ["layer1"]) as hooks:
        ...     hooks.run(x)
        >>> hooks.outputs["layer1"].shape
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        stop_early: bool = False,
        keep_copy: bool = False,
    ) -> None:
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.transform = transform
        self.stop_early = stop_early
        self.keep_copy = keep_copy
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> object:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer {name!r} returns {type(output).__name__}, not a tensor; choose another layer")
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.transform is not None:
                output = self.transform(name, output)
            self.outputs[name] = output.detach().clone() if self.keep_copy else output
            if self.stop_early and len(self.outputs) == len(self.modules):
                raise _StopForward
            return output

        return hook

    def __enter__(self) -> LayerHooks:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, x: torch.Tensor) -> object | None:
        """Forward ``x``; returns the model output, or ``None`` when the pass was stopped early."""
        self.outputs.clear()
        self.calls.clear()
        try:
            return self.model(x)
        except _StopForward:
            return None


def model_state(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    """Snapshot of every module's ``training`` flag and every parameter's ``requires_grad``."""
    training = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return training, grads


@contextmanager
def preserved_state(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode and parameters frozen; restore the caller's flags exactly afterwards.

    Freezing keeps autograd from building parameter-gradient graphs (memory) and from writing ``.grad``.
    """
    # one traversal each; flags are written back only where they changed (Module.__setattr__ is slow, and a
    # per-request server call pays this twice)
    modules = [(m, m.training) for _, m in model.named_modules()]
    params = [(p, p.requires_grad) for _, p in model.named_parameters()]
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for p, flag in params:
                if flag:
                    p.requires_grad_(False)
        yield model
    finally:
        for m, flag in modules:
            if m.training != flag:
                m.training = flag
        for p, flag in params:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def record_activations(
    model: nn.Module, x: torch.Tensor, layers: str | Sequence[str], *, stop_early: bool = True
) -> dict[str, torch.Tensor]:
    """One no-grad forward in eval mode that returns the named layers' outputs (detached).

    Args:
        model: the network (its modes and flags are restored afterwards).
        x: input batch.
        layers: layer names.
        stop_early: stop the forward after the last wanted layer (later layers are never computed).

    Returns:
        Dict name -> activation tensor, in the order given.

    Example:
        >>> acts = record_activations(net, x, ["layer1", "layer2"])
    """
    hooks = LayerHooks(model, layers, stop_early=stop_early, keep_copy=True)
    with preserved_state(model), torch.no_grad(), hooks:
        hooks.run(x)
    missing = [n for n in hooks.modules if n not in hooks.outputs]
    if missing:
        raise ValueError(f"layer(s) {missing} were not executed in the forward pass")
    return {name: hooks.outputs[name].detach() for name in hooks.modules}
