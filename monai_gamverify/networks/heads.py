"""Finding a classifier's final linear layer (the head that K+1 widening changes and OOD features feed)."""

from __future__ import annotations

from torch import nn

__all__ = ["find_classifier_head"]


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
