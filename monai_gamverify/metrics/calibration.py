"""Is the model's confidence honest? ECE/MCE, reliability diagrams, temperature scaling (Guo et al. 2017)."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from sklearn.exceptions import NotFittedError

from monai_gamverify.visualize.plots import new_figure, save_figure

__all__ = [
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "reliability_diagram_png",
    "TemperatureScaler",
    "TemperatureScale",
    "TemperatureScaled",
]


def _probs_labels(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float64 probabilities and (N,) long labels; a (N,) input is the positive-class probability."""
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).detach()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).detach()
    p = p.to(torch.float64).cpu()
    if p.ndim == 1:
        p = torch.stack([1 - p, p], dim=1)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N, K) or (N,), got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs must be finite probabilities in [0, 1] (apply softmax to logits first)")
    if not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-3):
        raise ValueError("each row of probs must sum to 1 (apply softmax to logits first)")
    y = y.reshape(-1).cpu()
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("labels must be integer class indices")
    y = y.long()
    if y.numel() != p.shape[0]:
        raise ValueError(f"got {p.shape[0]} probability rows but {y.numel()} labels")
    if ((y < 0) | (y >= p.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}]")
    return p, y


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> Any:
    """Per-bin statistics of the top-class confidence in equal-width bins (lo, hi] on [0, 1].

    Args:
        probs: (N, K) class probabilities (or (N,) positive-class probabilities).
        labels: (N,) true class indices.
        n_bins: number of bins.

    Returns:
        ``pandas.DataFrame`` with ``lower``, ``upper``, ``count``, ``accuracy``, ``confidence`` (NaN for empty bins).

    Example:
        >>> reliability_bins(torch.softmax(logits, 1), y, n_bins=10)
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p, y = _probs_labels(probs, labels)
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False): edges[i-1] < c <= edges[i]; confidence 0 cannot occur (max of a distribution)
    idx = (torch.bucketize(conf, edges) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / count
    mean_conf = torch.bincount(idx, weights=conf, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "lower": edges[:-1].numpy(),
            "upper": edges[1:].numpy(),
            "count": count.long().numpy(),
            "accuracy": acc.numpy(),
            "confidence": mean_conf.numpy(),
        }
    )


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_bins |bin| / N · |accuracy − mean confidence| on the top-class confidence.

    Args:
        probs: (N, K) class probabilities (or (N,) positive-class probabilities), tensor or array.
        labels: (N,) true class indices.
        n_bins: equal-width bins on [0, 1].

    Returns:
        ECE in [0, 1].

    Example:
        >>> expected_calibration_error(torch.softmax(logits, 1), y)
    """
    bins = reliability_bins(probs, labels, n_bins)
    full = bins[bins["count"] > 0]
    gap = (full["accuracy"] - full["confidence"]).abs()
    return float((full["count"] / full["count"].sum() * gap).sum())


def maximum_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Maximum calibration error: the largest |accuracy − mean confidence| over non-empty bins (as ECE otherwise).

    Example:
        >>> maximum_calibration_error(torch.softmax(logits, 1), y)
    """
    bins = reliability_bins(probs, labels, n_bins)
    full = bins[bins["count"] > 0]
    return float((full["accuracy"] - full["confidence"]).abs().max())


def reliability_diagram_png(
    probs: Any, labels: Any, path: str | os.PathLike, n_bins: int = 15, title: str | None = None
) -> Path:
    """Save a reliability diagram: accuracy per confidence bin against the diagonal, gaps shaded, ECE/MCE in the title.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) true classes.
        path: PNG file (written atomically).
        n_bins: equal-width bins.
        title: optional title prefix.

    Returns:
        The written path.

    Example:
        >>> reliability_diagram_png(torch.softmax(logits, 1), y, "reliability.png")
    """
    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    mce = maximum_calibration_error(probs, labels, n_bins)
    width = 1.0 / n_bins
    full = bins["count"] > 0
    fig = new_figure(figsize=(4.2, 5.2))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=True)
    ax.bar(bins["lower"][full], bins["accuracy"][full], width=width, align="edge", color="tab:blue", label="accuracy")
    ax.bar(
        bins["lower"][full],
        (bins["confidence"] - bins["accuracy"])[full],
        bottom=bins["accuracy"][full],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.35,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.3f}, MCE {mce:.3f}", fontsize=9)
    ax_hist.bar(bins["lower"], bins["count"], width=width, align="edge", color="gray")
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("confidence (top class)")
    ax_hist.set_ylabel("count")
    fig.tight_layout()
    return save_figure(fig, path)


def _logits_labels(logits: Any, labels: Any | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    z = z.detach()
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, K) with K >= 2, got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    z = z.double() if z.device.type != "mps" else z.float()  # MPS has no float64
    if labels is None:
        return z, None
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.detach().reshape(-1).to(z.device).long()
    if y.numel() != z.shape[0]:
        raise ValueError(f"got {z.shape[0]} logit rows but {y.numel()} labels")
    if ((y < 0) | (y >= z.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {z.shape[1] - 1}]")
    return z, y


def _like(result: torch.Tensor, reference: Any) -> Any:
    """Return ``result`` in the type of ``reference``: numpy in → numpy out; tensors keep their dtype."""
    if isinstance(reference, torch.Tensor):
        return result.to(reference.dtype if reference.is_floating_point() else torch.float32)
    return result.cpu().numpy()


class TemperatureScaler:
    """Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on validation logits by minimising the NLL.

    ``softmax(logits / T)`` keeps every prediction (argmax) and only changes the confidence. T is optimised as
    ``log T`` with L-BFGS (strong-Wolfe line search). scikit-learn conventions: ``__init__`` only stores arguments,
    fitted attributes end with ``_``.

    Args:
        init_temperature: starting value of T.
        max_iter: L-BFGS iterations.

    Attributes:
        temperature_: the fitted T.
        nll_before_, nll_after_: validation NLL at T = 1 and at the fitted T.

    Example:
        >>> scaler = TemperatureScaler().fit(val_logits, val_labels)
        >>> probs = scaler.predict_proba(test_logits)
    """

    def __init__(self, init_temperature: float = 1.0, max_iter: int = 100) -> None:
        self.init_temperature = init_temperature
        self.max_iter = max_iter

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments (scikit-learn API)."""
        return {"init_temperature": self.init_temperature, "max_iter": self.max_iter}

    def set_params(self, **params: Any) -> TemperatureScaler:
        """Set constructor arguments (scikit-learn API)."""
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"unknown parameter {key!r} for TemperatureScaler")
            setattr(self, key, value)
        return self

    def fit(self, logits: Any, labels: Any) -> TemperatureScaler:
        """Fit T on validation ``logits`` (N, K) and integer ``labels`` (N,); returns ``self``."""
        if not self.init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {self.init_temperature}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {self.max_iter!r}")
        z, y = _logits_labels(logits, labels)
        log_t = torch.tensor(math.log(self.init_temperature), dtype=z.dtype, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe", tolerance_change=1e-12
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        with torch.enable_grad():  # callers may be inside no_grad (inference code)
            opt.step(closure)
        with torch.no_grad():
            self.temperature_ = float(log_t.exp())
            self.nll_before_ = float(F.cross_entropy(z, y))
            self.nll_after_ = float(F.cross_entropy(z / self.temperature_, y))
        if not math.isfinite(self.temperature_) or self.temperature_ <= 0:
            raise RuntimeError(f"temperature fit diverged (T = {self.temperature_})")
        return self

    def _check_fitted(self) -> float:
        if not hasattr(self, "temperature_"):
            raise NotFittedError("TemperatureScaler is not fitted yet: call fit(logits, labels) first")
        return self.temperature_

    def transform(self, logits: Any) -> Any:
        """Scaled logits ``logits / T`` (same type as the input)."""
        t = self._check_fitted()
        z, _ = _logits_labels(logits, None)
        return _like(z / t, logits)

    def predict_proba(self, logits: Any) -> Any:
        """Calibrated probabilities ``softmax(logits / T)`` (same type as the input)."""
        t = self._check_fitted()
        z, _ = _logits_labels(logits, None)
        return _like(torch.softmax(z / t, dim=1), logits)

    def __repr__(self) -> str:
        fitted = f", temperature_={self.temperature_:.4f}" if hasattr(self, "temperature_") else ""
        return f"TemperatureScaler(init_temperature={self.init_temperature}, max_iter={self.max_iter}{fitted})"


def _temperature_of(temperature: float | TemperatureScaler) -> float:
    t = temperature._check_fitted() if isinstance(temperature, TemperatureScaler) else temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0 or a fitted TemperatureScaler, got {temperature!r}")
    return float(t)


class TemperatureScale(Transform):
    """Divide logits by a temperature (array post-transform); any shape, the class axis untouched.

    Args:
        temperature: T > 0, or a fitted :class:`TemperatureScaler`.

    Example:
        >>> TemperatureScale(1.8)(torch.tensor([2.0, 0.0]))  # tensor([1.1111, 0.0000])
    """

    def __init__(self, temperature: float | TemperatureScaler) -> None:
        self.temperature = _temperature_of(temperature)

    def __call__(self, logits: Any) -> Any:
        if isinstance(logits, torch.Tensor):
            return logits / self.temperature if logits.is_floating_point() else logits.float() / self.temperature
        return np.asarray(logits, dtype=np.float64) / self.temperature


class TemperatureScaled(MapTransform):
    """Dictionary version of :class:`TemperatureScale`: calibrate the network output at inference.

    Put it before ``Activationsd(keys="pred", softmax=True)`` in a bundle's post-transforms.

    Args:
        keys: keys of the logits to scale (default ``"pred"``).
        temperature: T > 0 (e.g. ``scaler.temperature_`` written into the bundle config) or a fitted scaler.
        allow_missing_keys: do not raise when a key is absent.

    Example:
        >>> post = Compose([TemperatureScaled(keys="pred", temperature=1.8), Activationsd(keys="pred", softmax=True)])
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        temperature: float | TemperatureScaler = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = TemperatureScale(temperature)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d
