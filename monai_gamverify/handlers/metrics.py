"""Top-1 accuracy and macro-F1 for MONAI workflows (MONAI's ``ConfusionMatrix`` gives per-class binary scores).

:class:`ClassificationMetric` follows ``sklearn.metrics`` and is synchronised across ranks; :class:`Accuracy` and
:class:`MacroF1` are its ignite handlers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric

__all__ = ["ClassificationMetric", "Accuracy", "MacroF1"]


def _as_index(t: torch.Tensor) -> torch.Tensor:
    """(B, C>1) scores/one-hot -> argmax; (B,), (B, 1) or 0-d indices -> (B,) long."""
    t = torch.as_tensor(t)
    if t.ndim >= 2 and t.shape[1] > 1:
        return t.argmax(dim=1).reshape(-1).long()
    return t.reshape(-1).long()


class ClassificationMetric(CumulativeIterationMetric):
    """Top-1 accuracy, macro-F1 or balanced accuracy of a multi-class classifier (as ``sklearn.metrics``).

    ``y_pred``: (B, C) logits/probabilities/one-hot (argmax taken) or (B,) indices; ``y``: (B,) / (B, 1) indices or
    (B, C) one-hot. Predictions are accumulated over the epoch (and gathered across ranks) before the metric is
    computed. Macro averages run over the classes present in ``y`` or ``y_pred`` (sklearn's default labels).

    Args:
        metric_name: ``accuracy``, ``f1`` (macro-F1) or ``balanced_accuracy``.

    Example:
        >>> m = ClassificationMetric("f1")
        >>> m(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        >>> m.aggregate()
        tensor(0.3333)
    """

    names = ("accuracy", "f1", "balanced_accuracy")

    def __init__(self, metric_name: str = "accuracy") -> None:
        super().__init__()
        name = metric_name.lower().replace("macro_", "").replace("macro-", "").replace(" ", "_")
        if name not in self.names:
            raise ValueError(f"metric_name must be one of {self.names}, got {metric_name!r}")
        self.metric_name = name

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore
        if y is None:
            raise ValueError("ClassificationMetric needs ground-truth labels")
        p, t = _as_index(y_pred), _as_index(y).to(y_pred.device if isinstance(y_pred, torch.Tensor) else "cpu")
        if p.shape != t.shape:
            raise ValueError(f"{p.numel()} predictions but {t.numel()} labels")
        return torch.stack([p, t], dim=1).float()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("ClassificationMetric: no predictions accumulated")
        pred, true = data[:, 0].long(), data[:, 1].long()
        if self.metric_name == "accuracy":
            return (pred == true).float().mean()
        classes = torch.unique(torch.cat([pred, true]) if self.metric_name == "f1" else true)
        scores = []
        for c in classes:
            tp = ((pred == c) & (true == c)).sum().float()
            fp = ((pred == c) & (true != c)).sum().float()
            fn = ((pred != c) & (true == c)).sum().float()
            if self.metric_name == "f1":
                denom = 2 * tp + fp + fn
                scores.append(2 * tp / denom if denom > 0 else torch.zeros(()))
            else:
                scores.append(tp / (tp + fn) if tp + fn > 0 else torch.zeros(()))
        return torch.stack(scores).mean()


class Accuracy(IgniteMetricHandler):
    """Top-1 accuracy handler (``engine.state.metrics[name]``) from ``pred`` and ``label``.

    Args:
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output`` (default ``pred``, ``label``).
        save_details: store per-item (prediction, label) pairs in ``engine.state.metric_details``.

    Example:
        >>> Accuracy().attach(evaluator, "val_accuracy")
    """

    def __init__(self, output_transform: Callable = from_engine(["pred", "label"]), save_details: bool = True) -> None:
        super().__init__(ClassificationMetric("accuracy"), output_transform=output_transform, save_details=save_details)


class MacroF1(IgniteMetricHandler):
    """Macro-averaged F1 handler (``sklearn.metrics.f1_score(average="macro")``) from ``pred`` and ``label``.

    Args:
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output`` (default ``pred``, ``label``).
        save_details: store per-item (prediction, label) pairs in ``engine.state.metric_details``.

    Example:
        >>> MacroF1().attach(evaluator, "val_f1")
    """

    def __init__(self, output_transform: Callable = from_engine(["pred", "label"]), save_details: bool = True) -> None:
        super().__init__(ClassificationMetric("f1"), output_transform=output_transform, save_details=save_details)
