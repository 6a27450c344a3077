"""Post-hoc out-of-distribution scores of a classifier and how well they separate in- from out-of-distribution data.

Maximum softmax probability, energy score, the K+1 model's ``1 - garbage probability``, and the Mahalanobis distance
on penultimate features (:class:`MahalanobisDetector`, features from :func:`extract_features`), with AUROC and FPR at
95 % TPR (:func:`ood_metrics`). Every score follows one convention: **higher = more in-distribution**.

Example:
    >>> ood_metrics(msp_score(logits_in), msp_score(logits_out))["auroc"]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from monai_gamverify.networks.heads import find_classifier_head
from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.hooks import preserved_state, record_activations

__all__ = [
    "as_scores",
    "msp_score",
    "energy_score",
    "kplus1_score",
    "extract_features",
    "MahalanobisDetector",
    "ood_metrics",
]


def as_scores(x: Any, name: str = "logits", min_classes: int = 1) -> torch.Tensor:
    """(B, C) or (C,) floating tensor from a tensor / array / list, with a clear error otherwise.

    Args:
        x: scores (logits or probabilities).
        name: what ``x`` is, for the error message.
        min_classes: smallest accepted C.

    Returns:
        A floating tensor (a ``MetaTensor`` becomes a plain tensor).

    Raises:
        TypeError: ``x`` is not array-like.
        ValueError: a wrong shape, or NaN / infinite values.

    Example:
        >>> as_scores([[1.0, 2.0]]).shape
        torch.Size([1, 2])
    """
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from err
    x = plain_tensor(x)
    if x.ndim not in (1, 2) or x.shape[-1] < min_classes:
        raise ValueError(f"{name} must have shape (C,) or (B, C) with C >= {min_classes}, got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def msp_score(logits: Any) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel, 2017) per sample: (B, K) logits -> (B,).

    Example:
        >>> msp_score(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
        tensor([0.8808, 0.5000])
    """
    logits = as_scores(logits)
    return torch.softmax(logits, dim=-1).amax(dim=-1)


def energy_score(logits: Any, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` (Liu et al., 2020) per sample: (B, K) -> (B,).

    Example:
        >>> energy_score(torch.zeros(1, 4))
        tensor([1.3863])
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    logits = as_scores(logits)
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


def kplus1_score(logits: Any, garbage_index: int = -1) -> torch.Tensor:
    """In-distribution score of a K+1 model: ``1 - softmax garbage probability``, (B, K+1) -> (B,).

    Example:
        >>> kplus1_score(torch.tensor([[0.0, 0.0]]))
        tensor([0.5000])
    """
    logits = as_scores(logits, min_classes=2)
    return 1.0 - torch.softmax(logits, dim=-1)[..., garbage_index]


def _is_pair(data: Any) -> bool:
    """An ``(images, labels)`` batch: image batch (B, C, *spatial) and labels (B,) or (B, K) (not two image batches)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not isinstance(data[0], torch.Tensor):
        return False
    labels = data[1]
    if isinstance(labels, (list, tuple)):
        labels = np.asarray(labels) if all(isinstance(v, (int, np.integer)) for v in labels) else None
    return isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim <= 2 < data[0].ndim


def _batches(data: Any, image_key: str, label_key: str) -> Iterable[tuple[torch.Tensor, Any]]:
    """(image, label-or-None) pairs from a tensor, a dict batch, an (x, y) pair, or an iterable of those."""
    if isinstance(data, torch.Tensor):
        yield data, None
        return
    if isinstance(data, Mapping):
        if image_key not in data:
            raise ValueError(f"batch has no {image_key!r} field (keys: {list(data)})")
        yield data[image_key], data.get(label_key)
        return
    if _is_pair(data):
        yield data[0], data[1]
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor, a batch or an iterable of batches, got {type(data).__name__}")
    for batch in data:
        yield from _batches(batch, image_key, label_key)


def _labels_1d(y: Any) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(dim=1)
    return y.reshape(-1).long()


def _head_input(model: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``head`` during one no-grad eval-mode forward (the hook is removed whatever happens)."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].detach()))
    try:
        with preserved_state(model), torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the classifier head of {type(model).__name__} did not run in the forward pass")
    return captured[-1]


def extract_features(
    model: nn.Module,
    data: Any,
    layer: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Penultimate features of ``model`` on ``data``, globally average-pooled to (N, D).

    Args:
        model: the classifier (run in eval mode without gradients; its modes are restored).
        data: a tensor batch, a dict batch, an ``(x, y)`` pair, or an iterable of those (a ``DataLoader``).
        layer: name of the layer whose output is taken (via ``record_activations``); ``None``
            takes the input of the classifier head (:func:`find_classifier_head`).
        image_key: image field of dict batches.
        label_key: label field of dict batches.

    Returns:
        (features (N, D) float32 on the model's device, labels (N,) or ``None`` when the data has no labels).

    Example:
        >>> feats, labels = extract_features(net, val_loader, layer="avgpool")
    """
    device = next((p.device for p in model.parameters()), None)
    head = None if layer is not None else find_classifier_head(model)[1]
    feats, labels, unlabelled = [], [], False
    for x, y in _batches(data, image_key, label_key):
        x = torch.as_tensor(x)
        x = x.to(device) if device is not None else x
        if layer is not None:
            f = record_activations(model, x, layer)[layer]
        else:
            f = _head_input(model, head, x)
        f = f.reshape(f.shape[0], f.shape[1], -1).mean(-1) if f.ndim > 2 else f.reshape(f.shape[0], -1)
        feats.append(f.float())
        if y is None:
            unlabelled = True
        else:
            labels.append(_labels_1d(y).to(f.device))
    if not feats:
        raise ValueError("data yielded no batches")
    return torch.cat(feats), None if unlabelled else torch.cat(labels)


class MahalanobisDetector:
    """Class-conditional Gaussians with a shared covariance on penultimate features (Lee et al., 2018).

    Score = minus the smallest squared Mahalanobis distance to a class mean (higher = more in-distribution).

    Args:
        layer: feature layer for :meth:`fit_model` / :meth:`score_model` (``None``: the head's input).
        reg: ridge added to the covariance diagonal, relative to its mean variance (features often outnumber samples).
        image_key: image field of dict batches.
        label_key: label field of dict batches.

    Example:
        >>> det = MahalanobisDetector(layer="avgpool").fit_model(net, train_loader)
        >>> scores = det.score_model(net, test_images)
    """

    def __init__(
        self, layer: str | None = None, reg: float = 1e-6, image_key: str = "image", label_key: str = "label"
    ) -> None:
        self.layer = layer
        self.reg = reg
        self.image_key = image_key
        self.label_key = label_key

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments (scikit-learn convention)."""
        return {"layer": self.layer, "reg": self.reg, "image_key": self.image_key, "label_key": self.label_key}

    def set_params(self, **params: Any) -> MahalanobisDetector:
        """Set constructor arguments (scikit-learn convention)."""
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"unknown parameter {key!r}")
            setattr(self, key, value)
        return self

    @staticmethod
    def _features(x: Any) -> torch.Tensor:
        x = torch.as_tensor(x).detach()
        if x.ndim < 2:
            raise ValueError(f"features must have shape (N, D) or (N, C, *spatial), got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], x.shape[1], -1).mean(-1) if x.ndim > 2 else x
        return x.to(torch.float64)

    def fit(self, features: Any, labels: Any) -> MahalanobisDetector:
        """Fit class means and the shared covariance.

        Args:
            features: (N, D) or (N, C, *spatial) (globally average-pooled).
            labels: (N,) integer classes (one-hot (N, K) accepted).

        Returns:
            self.
        """
        if not self.reg >= 0:
            raise ValueError(f"reg must be >= 0, got {self.reg!r}")
        x = self._features(features)
        y = _labels_1d(labels).to(x.device)
        if y.numel() != x.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.numel()} labels")
        classes = torch.unique(y)
        if x.shape[0] <= classes.numel():
            raise ValueError(f"need more samples ({x.shape[0]}) than classes ({classes.numel()}) to fit a covariance")
        means = torch.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[torch.searchsorted(classes, y)]
        cov = centred.T @ centred / x.shape[0]
        ridge = self.reg * cov.diagonal().mean().clamp_min(torch.finfo(cov.dtype).tiny)
        cov = cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        self.classes_ = classes
        self.means_ = means
        self.covariance_ = cov
        self.precision_ = torch.linalg.pinv(cov, hermitian=True)
        self.n_features_in_ = x.shape[1]
        return self

    def distances(self, features: Any) -> torch.Tensor:
        """Squared Mahalanobis distance of each sample to each class mean, (N, n_classes)."""
        if not hasattr(self, "precision_"):
            raise RuntimeError("MahalanobisDetector is not fitted; call fit or fit_model first")
        x = self._features(features).to(self.means_.device)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {x.shape[1]}")
        diff = x[:, None, :] - self.means_[None]  # (N, K, D)
        return torch.einsum("nkd,de,nke->nk", diff, self.precision_, diff)

    def score(self, features: Any) -> torch.Tensor:
        """In-distribution score ``-min_k d_k^2`` per sample, (N,) float64."""
        return -self.distances(features).amin(dim=1)

    def fit_model(self, model: nn.Module, data: Any) -> MahalanobisDetector:
        """Fit on the features of ``model`` at ``self.layer`` over labelled ``data`` (see :func:`extract_features`)."""
        feats, labels = extract_features(model, data, self.layer, self.image_key, self.label_key)
        if labels is None:
            raise ValueError(f"fit_model needs labelled data ({self.label_key!r} field or (x, y) pairs)")
        return self.fit(feats, labels)

    def score_model(self, model: nn.Module, data: Any) -> torch.Tensor:
        """Score ``data`` through ``model`` at ``self.layer``."""
        return self.score(extract_features(model, data, self.layer, self.image_key, self.label_key)[0])


def _as_1d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def ood_metrics(scores_in: Any, scores_out: Any, tpr: float = 0.95, higher_is_in: bool = True) -> dict[str, float]:
    """AUROC and FPR at a fixed TPR for separating in-distribution (positive) from out-of-distribution samples.

    Args:
        scores_in: scores of in-distribution samples.
        scores_out: scores of out-of-distribution samples.
        tpr: the true-positive rate (fraction of in-distribution samples accepted) at which the FPR (fraction of OOD
            samples accepted) is read.
        higher_is_in: ``True`` when higher scores mean in-distribution (all scores of this module); ``False`` for
            anomaly scores (e.g. a garbage probability).

    Returns:
        ``{"auroc", "fpr_at_tpr", "tpr", "threshold"}``; ties count half in the AUROC, and the threshold is the
        largest one that accepts at least ``tpr`` of the in-distribution samples.

    Example:
        >>> ood_metrics([0.9, 0.8, 0.7], [0.1, 0.75])
        {'auroc': 0.8333333333333334, 'fpr_at_tpr': 0.5, 'tpr': 0.95, 'threshold': 0.7}
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    s_in, s_out = _as_1d(scores_in, "scores_in"), _as_1d(scores_out, "scores_out")
    if not higher_is_in:
        s_in, s_out = -s_in, -s_out
    n_in, n_out = s_in.size, s_out.size
    ranks = rankdata(np.concatenate([s_in, s_out]))  # average ranks: ties count half (Mann-Whitney U)
    auroc = (ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)
    k = min(max(int(math.ceil(tpr * n_in - 1e-9)), 1), n_in)  # in-distribution samples that must be accepted
    threshold = np.sort(s_in)[::-1][k - 1]
    fpr = float(np.mean(s_out >= threshold))
    return {
        "auroc": float(auroc),
        "fpr_at_tpr": fpr,
        "tpr": float(tpr),
        "threshold": float(threshold if higher_is_in else -threshold),
    }
