"""A classifier's final linear layer: finding it (the head that OOD features feed), widening it by K+1
"garbage" rows (:func:`widen_classifier`), loading a K-class checkpoint into a K+N-class model
(:func:`init_from_checkpoint`)."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["find_classifier_head", "widen_classifier", "init_from_checkpoint"]


def find_classifier_head(model: nn.Module, layer_name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier's final linear layer: ``layer_name``, or the last ``nn.Linear`` in module order.

    The last linear layer is ``fc`` for MONAI ``resnet*``, ``class_layers.out`` for ``DenseNet121`` and ``head`` for
    :class:`monai_gamverify.networks.nets.ConvNeXt`.

    Args:
        model: the classifier.
        layer_name: name as in ``model.named_modules()``; ``None`` finds it automatically.

    Returns:
        (name, module).

    Raises:
        ValueError: no linear layer (e.g. a segmentation network or a convolutional head), or ``layer_name`` unknown
            or not an ``nn.Linear``.

    Example:
        >>> find_classifier_head(monai.networks.nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=5))
        ('fc', Linear(in_features=512, out_features=5, bias=True))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if layer_name is not None:
        if layer_name not in modules:
            raise ValueError(f"no layer named {layer_name!r} in {type(model).__name__}")
        module = modules[layer_name]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {layer_name!r} is a {type(module).__name__}, not an nn.Linear classifier head")
        return layer_name, module
    linear = [(name, m) for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so there is no classifier head to widen to K+1 "
            "(a model with a convolutional head or a segmentation network cannot get a garbage class this way)"
        )
    return linear[-1]


def widen_classifier(
    model: nn.Module,
    num_new: int = 1,
    layer_name: str | None = None,
    init: str = "mean",
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Widen a trained K-class classifier's final linear layer to K + ``num_new`` outputs.

    The K existing rows of weight and bias are copied bit-exactly, so the old classes' logits do not change; the
    new rows are initialised by ``init``. Integer ``out_channels`` / ``num_classes`` attributes of the model equal to
    K are updated.

    Args:
        model: the trained classifier (any ``nn.Module`` whose last ``nn.Linear`` is the head, or give ``layer_name``).
        num_new: number of classes added (1 for one garbage class).
        layer_name: the head's name; ``None`` takes the last ``nn.Linear`` in module order.
        init: ``"mean"`` (mean of the existing rows: the new logit starts as the mean of the old ones), ``"zeros"``,
            or ``"random"`` (``nn.Linear``'s default uniform init, drawn with ``seed``).
        seed: seed of the ``"random"`` init.
        inplace: modify ``model`` itself; by default a deep copy is widened and ``model`` stays usable.

    Returns:
        The widened model (``model`` itself if ``inplace``).

    Example:
        >>> net6 = widen_classifier(net5, init="mean")
        >>> torch.equal(net6.eval()(x)[:, :5], net5.eval()(x))
        True
    """
    if int(num_new) != num_new or num_new < 1:
        raise ValueError(f"num_new must be a positive integer, got {num_new!r}")
    if init not in ("mean", "zeros", "random"):
        raise ValueError(f"init must be 'mean', 'zeros' or 'random', got {init!r}")
    name, _ = find_classifier_head(model, layer_name)  # validate before copying
    target = model if inplace else copy.deepcopy(model)
    old = target.get_submodule(name)
    k, d = old.out_features, old.in_features
    w, b = old.weight, old.bias
    new = nn.Linear(d, k + num_new, bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if init == "mean":
            new_w = w.mean(0, keepdim=True).expand(num_new, d)
            new_b = b.mean().expand(num_new) if b is not None else None
        elif init == "zeros":
            new_w, new_b = torch.zeros(num_new, d), torch.zeros(num_new)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / math.sqrt(d) if d > 0 else 0.0  # nn.Linear's default range
            new_w = torch.empty(num_new, d).uniform_(-bound, bound, generator=gen)
            new_b = torch.empty(num_new).uniform_(-bound, bound, generator=gen)
        new.weight[:k].copy_(w)
        new.weight[k:].copy_(new_w.to(w))
        if b is not None:
            new.bias[:k].copy_(b)
            new.bias[k:].copy_(new_b.to(b))
    new.weight.requires_grad_(w.requires_grad)
    if b is not None:
        new.bias.requires_grad_(b.requires_grad)
    new.train(old.training)
    parent_name, _, child = name.rpartition(".")
    setattr(target.get_submodule(parent_name) if parent_name else target, child, new)
    for attr in ("out_channels", "num_classes"):
        if isinstance(getattr(target, attr, None), int) and getattr(target, attr) == k:
            setattr(target, attr, k + num_new)
    return target


def init_from_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    layer_name: str | None = None,
    init: str = "mean",
    seed: int = 0,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a K-class checkpoint into a K+N-class ``model``, widening its head with :func:`widen_classifier`.

    The checkpoint (``torch.load(weights_only=True)``; a state dict, or a dict with a ``"model"`` state dict as MONAI's
    ``CheckpointSaver`` writes with several objects) must match ``model`` except for the head's number of rows. A
    checkpoint that already has the model's number of classes is loaded as is. The first K logits of the result equal
    the K-class model's exactly; the new rows are initialised by ``init``.

    Args:
        model: the K+N-class network (modified in place and returned; e.g. a bundle's ``network_def`` with 6 outputs).
        path: the K-class (or K+N-class) checkpoint.
        layer_name: the head's name; ``None`` takes the last ``nn.Linear``.
        init: initialisation of the new rows (see :func:`widen_classifier`).
        seed: seed of the ``"random"`` init.
        map_location: where tensors are loaded.

    Returns:
        ``model`` with the loaded (and widened) weights.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the checkpoint does not fit the model (other layers differ, or it has more classes than the model).

    Example:
        >>> net6 = init_from_checkpoint(SmallCNN(3, 1, 6), "models/model.pt")   # trained 5-stage model + garbage row
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    name, head = find_classifier_head(model, layer_name)
    weight_key = f"{name}.weight"
    if weight_key not in state:
        raise ValueError(f"{path} has no {weight_key!r}: it was not saved from a {type(model).__name__}")
    k, total = int(state[weight_key].shape[0]), head.out_features
    if k > total:
        raise ValueError(f"{path} has {k} classes but the model only {total}; cannot narrow a classifier")
    narrow = model
    if k < total:
        narrow = copy.deepcopy(model)
        parent_name, _, child = name.rpartition(".")
        small = nn.Linear(head.in_features, k, bias=head.bias is not None)
        setattr(narrow.get_submodule(parent_name) if parent_name else narrow, child, small)
    try:
        narrow.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {type(model).__name__} (apart from the head): {err}") from err
    if k < total:
        widen_classifier(narrow, num_new=total - k, layer_name=name, init=init, seed=seed, inplace=True)
        model.load_state_dict(narrow.state_dict(), strict=True)
    return model
