"""Ignite handlers for MONAI workflows: CAM images in TensorBoard, CAM NIfTI writer, prediction CSV, metrics, LR.

- :class:`CAMImageHandler` (training/validation): every ``interval`` epochs, the CAM of a few images of the current
  batch overlaid on the image (3D: three orthogonal slices through the map peak, tiled) as TensorBoard images.
- :class:`CAMWriter` (evaluation/inference): each item's normalised map as NIfTI aligned with its input image
  (optionally resampled back onto the original grid by inverting the preprocessing), plus an optional PNG.
- :class:`PredictionCSVWriter`: one CSV row per image with the prediction, class name, probabilities and label.
- :class:`ClassificationMetric` with the handlers :class:`Accuracy` and :class:`MacroF1` (sklearn's definitions,
  synchronised across ranks), since MONAI's ``ConfusionMatrix`` gives per-class binary scores, not top-1 accuracy.
- :class:`LearningRateLogger`: the optimizer's learning rate as a TensorBoard scalar.

All CAMs leave the network exactly as it was (mode, ``requires_grad``, no ``.grad``), so training is undisturbed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.utils import min_version, optional_import
from torch import nn

from monai_gamverify.transforms.dictionary import image_name, make_cam
from monai_gamverify.visualize.registry import unwrap_network

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = [
    "CAMImageHandler",
    "CAMWriter",
    "PredictionCSVWriter",
    "ClassificationMetric",
    "Accuracy",
    "MacroF1",
    "LearningRateLogger",
    "cam_overlay_rgb",
    "batch_items",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- helpers
def batch_items(batch: Any) -> list[dict]:
    """The items of ``engine.state.batch``: a decollated list of dicts or a collated dict (split along axis 0)."""
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


def _device_of(network: nn.Module) -> torch.device:
    param = next(network.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img, dtype=np.float32)


def cam_overlay_rgb(image: Any, cam: Any, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """RGB (H, W, 3) float image in [0, 1]: ``cam`` (in [0, 1]) over ``image``.

    3D: the three orthogonal slices through the map's maximum, side by side (padded to a common height); 2D: one
    panel.

    Args:
        image: (*spatial) or (1, *spatial) image (its first channel is shown).
        cam: map of the same spatial shape.
        alpha: opacity of the map.
        cmap: matplotlib colormap name.

    Returns:
        float32 array (H, W, 3).

    Example:
        >>> cam_overlay_rgb(torch.rand(1, 16, 16, 16), torch.rand(1, 16, 16, 16)).shape
        (16, 48, 3)
    """
    from matplotlib import colormaps

    def arr(x: Any) -> np.ndarray:
        a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        return a

    img, heat = arr(image), arr(cam)
    spatial = heat.ndim - 1 if heat.ndim == img.ndim and heat.shape[0] == 1 else heat.ndim
    img = img.reshape(img.shape[-spatial:]) if img.ndim == spatial else img[0]
    heat = heat.reshape(heat.shape[-spatial:])
    if img.shape != heat.shape:
        raise ValueError(f"map shape {heat.shape} differs from image shape {img.shape}")
    img = _window(img)
    if img.ndim == 2:
        pairs = [(img, heat)]
    elif img.ndim == 3:
        peak = (
            np.unravel_index(int(np.argmax(heat)), heat.shape)
            if heat.max() > heat.min()
            else tuple(s // 2 for s in heat.shape)
        )
        pairs = [(np.take(img, peak[a], axis=a), np.take(heat, peak[a], axis=a)) for a in range(3)]
    else:
        raise ValueError(f"expected a 2D or 3D image, got spatial shape {img.shape}")
    colour = colormaps[cmap]
    height = max(p[0].shape[0] for p in pairs)
    panels = []
    for im, hm in pairs:
        rgb = (1 - alpha) * np.repeat(im[..., None], 3, axis=-1) + alpha * colour(np.clip(hm, 0, 1))[..., :3]
        pad = height - rgb.shape[0]
        panels.append(np.pad(rgb, ((0, pad), (0, 0), (0, 0))))
    return np.concatenate(panels, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- CAM images
class CAMImageHandler:
    """Log CAM overlays of the current batch's images to TensorBoard every ``interval`` epochs.

    The CAM is computed with ``engine.network`` (DDP wrappers removed) or ``network``; the network's mode and flags
    are restored after each call, so training continues exactly as without the handler.

    Args:
        layer: target layer name (as in the bare network's ``named_modules()``).
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        summary_writer: a ``SummaryWriter``; if ``None``, one is created in ``log_dir``.
        log_dir: TensorBoard directory when no writer is given (default ``./runs``).
        interval: epochs (or iterations with ``epoch_level=False``) between logs.
        max_images: images of the batch to show.
        image_key: key of the image in the batch items.
        tag: TensorBoard tag prefix (``{tag}/{i}``).
        network: network to explain instead of ``engine.network``.
        epoch_level: log at epoch ends (``True``) or every ``interval`` iterations.

    Example:
        >>> CAMImageHandler("stages.2", log_dir="runs", interval=5).attach(trainer)
    """

    def __init__(
        self,
        layer: str,
        method: str = "gradcam",
        summary_writer: Any = None,
        log_dir: str | os.PathLike | None = None,
        interval: int = 1,
        max_images: int = 2,
        image_key: str = "image",
        tag: str = "cam",
        network: nn.Module | None = None,
        epoch_level: bool = True,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.layer = layer
        self.method = method
        self._writer = summary_writer
        self._own_writer = summary_writer is None
        self.log_dir = str(log_dir) if log_dir is not None else "./runs"
        self.interval = int(interval)
        self.max_images = int(max_images)
        self.image_key = image_key
        self.tag = tag
        self.network = network
        self.epoch_level = epoch_level
        make_cam(network, layer, method) if network is not None else None  # fail early on a bad layer

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED`` (or ``ITERATION_COMPLETED``) every ``interval``; close on ``COMPLETED``."""
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _close(self, engine: Engine) -> None:
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    def images(self, engine: Engine) -> list[np.ndarray]:
        """The overlays (H, W, 3) for the current batch (what :meth:`__call__` logs)."""
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("CAMImageHandler needs a network: the engine has none, pass network=")
        items = [it for it in batch_items(engine.state.batch) if self.image_key in it][: self.max_images]
        if not items:
            return []
        net = unwrap_network(network)
        x = torch.stack([torch.as_tensor(it[self.image_key]).float() for it in items]).to(_device_of(net))
        if hasattr(x, "as_tensor"):
            x = x.as_tensor()
        with torch.inference_mode(False), torch.enable_grad():
            maps = make_cam(net, self.layer, self.method)(x)
        return [cam_overlay_rgb(x[i].cpu(), maps[i].cpu()) for i in range(len(items))]

    def __call__(self, engine: Engine) -> None:
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        for i, rgb in enumerate(self.images(engine)):
            self.writer.add_image(f"{self.tag}/{i}", rgb, global_step=step, dataformats="HWC")
        self.writer.flush()


# ---------------------------------------------------------------------------------------------------- CAM NIfTI
class CAMWriter:
    """Write each item's normalised CAM as NIfTI aligned with its input image (and optionally an overlay PNG).

    File names come from the image's ``filename_or_obj`` (``<stem>_<postfix>.nii.gz`` in ``output_dir``). The map
    carries the affine of the preprocessed image, so it overlays the input in 3D Slicer / ITK-SNAP; with
    ``invert_transform`` (the preprocessing ``Compose``) it is also resampled back onto the input's original grid
    (same shape and affine as the file on disk).

    Args:
        layer: target layer name.
        output_dir: directory for the maps.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        image_key: key of the image in the batch items.
        postfix: file-name postfix.
        network: network to explain instead of ``engine.network``.
        class_idx_key: key whose argmax (``"pred"``) or value (``"label"``) is explained; ``None``: predicted class.
        invert_transform: preprocessing to invert so the map lies on the input's original grid.
        overlay: also write ``<stem>_<postfix>.png`` (three orthogonal slices through the peak).
        normalize: write maps scaled to [0, 1] (``False``: raw values, e.g. for attribution energy).

    Example:
        >>> CAMWriter("stages.2", "eval/cams", invert_transform=preprocessing).attach(evaluator)
    """

    def __init__(
        self,
        layer: str,
        output_dir: str | os.PathLike,
        method: str = "gradcam",
        image_key: str = "image",
        postfix: str = "cam",
        network: nn.Module | None = None,
        class_idx_key: str | None = None,
        invert_transform: Callable | None = None,
        overlay: bool = False,
        normalize: bool = True,
    ) -> None:
        self.layer = layer
        self.output_dir = Path(output_dir)
        self.method = method
        self.image_key = image_key
        self.postfix = postfix
        self.network = network
        self.class_idx_key = class_idx_key
        self.invert_transform = invert_transform
        self.overlay = overlay
        self.normalize = normalize
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        """Register on ``ITERATION_COMPLETED``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _class_idx(self, items: list[dict]) -> list[int] | None:
        if self.class_idx_key is None:
            return None
        out = []
        for it in items:
            t = torch.as_tensor(it[self.class_idx_key])
            out.append(int(t.argmax()) if t.numel() > 1 else int(t.reshape(()).item()))
        return out

    def _invert(self, cam: torch.Tensor, img: Any) -> Any:
        from monai_gamverify.io.grid import invert_to_input

        return invert_to_input(cam, img, self.invert_transform)

    def __call__(self, engine: Engine) -> None:
        from monai_gamverify.io import save_nifti

        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("CAMWriter needs a network: the engine has none, pass network=")
        items = [it for it in batch_items(engine.state.batch) if self.image_key in it]
        if not items:
            return
        net = unwrap_network(network)
        imgs = [it[self.image_key] for it in items]
        x = torch.stack([torch.as_tensor(im).float() for im in imgs]).to(_device_of(net))
        if hasattr(x, "as_tensor"):
            x = x.as_tensor()
        with torch.inference_mode(False), torch.enable_grad():
            maps = make_cam(net, self.layer, self.method)(
                x, class_idx=self._class_idx(items), normalize=self.normalize
            ).cpu()
        for i, img in enumerate(imgs):
            name = image_name(img, default=f"item{engine.state.iteration}_{i}")
            stem = Path(name).name.split(".")[0]
            cam = maps[i]
            ref = img
            if self.invert_transform is not None and hasattr(img, "applied_operations"):
                cam = self._invert(cam, img)
                ref = cam
            path = save_nifti(cam, self.output_dir / f"{stem}_{self.postfix}.nii.gz", reference=ref)
            self.written.append(path)
            if self.overlay:
                from monai_gamverify.visualize.plots import overlay_png

                overlay_png(img[0], maps[i][0], self.output_dir / f"{stem}_{self.postfix}.png", title=stem)


# ---------------------------------------------------------------------------------------------------- predictions
class PredictionCSVWriter:
    """One CSV row per image: id, image path, label (if any), prediction, class name and per-class probabilities.

    Args:
        output_dir: directory of the CSV.
        filename: CSV file name.
        class_names: names of the output columns (default ``class0``, ``class1``, ...).
        pred_key: key of the prediction in ``engine.state.output`` items (probabilities, or logits with
            ``softmax=True``).
        label_key: key of the ground truth (optional).
        image_key: key of the image (its ``filename_or_obj`` gives the id and path).
        softmax: apply a softmax to ``pred`` first.

    Example:
        >>> PredictionCSVWriter("eval", class_names=["stage1", "stage2"]).attach(evaluator)
    """

    def __init__(
        self,
        output_dir: str | os.PathLike = "./",
        filename: str = "predictions.csv",
        class_names: Sequence[str] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        softmax: bool = False,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = list(class_names) if class_names is not None else None
        self.pred_key = pred_key
        self.label_key = label_key
        self.image_key = image_key
        self.softmax = softmax
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        """Register: reset on ``STARTED``, collect on ``ITERATION_COMPLETED``, write on ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        outputs = batch_items(engine.state.output)
        inputs = batch_items(engine.state.batch)
        for i, out in enumerate(outputs):
            pred = torch.as_tensor(out[self.pred_key]).detach().float().cpu().flatten()
            probs = pred.softmax(0) if self.softmax else pred
            img = out.get(self.image_key, inputs[i].get(self.image_key) if i < len(inputs) else None)
            path = image_name(img, default="")
            names = self.class_names or [f"class{k}" for k in range(len(probs))]
            idx = int(probs.argmax())
            row: dict[str, Any] = {"id": Path(path).name.split(".")[0] if path else f"item{len(self.rows)}"}
            row["image"] = path
            label = out.get(self.label_key, inputs[i].get(self.label_key) if i < len(inputs) else None)
            if label is not None:
                lab = torch.as_tensor(label).flatten()
                row["label"] = int(lab.argmax()) if lab.numel() > 1 else int(lab.item())
            row["prediction"] = idx
            row["prediction_name"] = names[idx] if idx < len(names) else str(idx)
            row["confidence"] = float(probs[idx])
            for k, p in enumerate(probs.tolist()):
                row[f"prob_{names[k] if k < len(names) else k}"] = p
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        import pandas as pd

        from monai_gamverify.io import write_csv

        write_csv(pd.DataFrame(self.rows), self.path)
        logger.info(f"wrote {len(self.rows)} predictions to {self.path}")


# ---------------------------------------------------------------------------------------------------- metrics
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


# ---------------------------------------------------------------------------------------------------- learning rate
class LearningRateLogger:
    """Write the learning rate of each parameter group of ``optimizer`` to TensorBoard (``{tag}`` / ``{tag}_g{i}``).

    Args:
        optimizer: the optimizer (default: ``engine.optimizer``).
        summary_writer: a ``SummaryWriter``; if ``None``, one is created in ``log_dir``.
        log_dir: TensorBoard directory when no writer is given.
        tag: scalar tag.
        epoch_level: log at epoch starts (``True``) or every iteration.

    Example:
        >>> LearningRateLogger(log_dir="runs").attach(trainer)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        summary_writer: Any = None,
        log_dir: str | os.PathLike | None = None,
        tag: str = "lr",
        epoch_level: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self._writer = summary_writer
        self._own_writer = summary_writer is None
        self.log_dir = str(log_dir) if log_dir is not None else "./runs"
        self.tag = tag
        self.epoch_level = epoch_level

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_STARTED`` (or ``ITERATION_STARTED``); the writer is closed on ``COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_STARTED if self.epoch_level else Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _close(self, engine: Engine) -> None:
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    def __call__(self, engine: Engine) -> None:
        optimizer = self.optimizer if self.optimizer is not None else getattr(engine, "optimizer", None)
        if optimizer is None:
            raise ValueError("LearningRateLogger needs an optimizer: the engine has none, pass optimizer=")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            tag = self.tag if len(groups) == 1 else f"{self.tag}_g{i}"
            self._writer.add_scalar(tag, float(group["lr"]), step)
        self._writer.flush()
