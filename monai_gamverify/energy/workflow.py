"""Attribution energy inside MONAI workflows: a slice-aggregating inferer, a dictionary transform and an ignite handler.

The CBCT image-quality study applies a 2D network to the axial slices of a volume. In a MONAI bundle this needs:

- :class:`SliceAggregateInferer` — runs the 2D network on every slice of a (B, C, D, H, W) batch, a chunk of slices
  at a time, and aggregates the slice outputs to one prediction per volume (mean by default);
- :class:`AttributionEnergyd` — per volume, the attribution energy (AE: sum of raw Grad-CAM values over all slices)
  of every output column in one streamed pass (:func:`monai_gamverify.energy.attribution.volume_energy_multi`);
- :class:`AttributionEnergyHandler` — collects per-volume predictions, consensus scores and AE during an evaluator
  run and at the end of the epoch writes the per-category regression metrics (MAE, Spearman of prediction vs
  consensus), the AE table with leave-one-out Spearman analysis, atypical cases and a scatter PNG per category
  (:func:`monai_gamverify.energy.report.energy_report`), and logs them as TensorBoard scalars.

Example (``evaluate.json`` of the ``cbct_quality`` bundle, abridged)::

    "inferer": {"_target_": "monai_gamverify.energy.workflow.SliceAggregateInferer", "spatial_dim": 2},
    "postprocessing": {"_target_": "monai_gamverify.energy.workflow.AttributionEnergyd", "keys": "image",
                       "network": "@network", "target_layer": "stages.2", "columns": "@categories"},
    "handlers": [{"_target_": "monai_gamverify.energy.workflow.AttributionEnergyHandler",
                  "categories": "@categories", "output_dir": "@output_dir"}]
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from ignite.engine import Events
from monai.config import KeysCollection
from monai.data import MetaTensor, decollate_batch
from monai.inferers import Inferer
from monai.transforms import MapTransform
from scipy import stats
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.energy.attribution import volume_energy_multi
from monai_gamverify.energy.report import energy_report
from monai_gamverify.io import load_image, write_csv
from monai_gamverify.io.names import OutputNamer
from monai_gamverify.transforms.dictionary import image_name, make_cam
from monai_gamverify.visualize.registry import unwrap_network

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "SliceAggregateInferer",
    "AttributionEnergyd",
    "SliceCAMd",
    "AttributionEnergyHandler",
    "regression_metrics",
    "bundle_energy",
]

logger = logging.getLogger(__name__)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


# ----------------------------------------------------------------------------------------------------------- inferer
class SliceAggregateInferer(Inferer):
    """Apply a 2D network to every slice of a 3D batch and aggregate the slice outputs per volume.

    A (B, C, D, H, W) input is cut along spatial axis ``spatial_dim`` into 2D slices that are fed to the network
    ``sw_batch_size`` at a time (so a volume's slices are never all on the device at once); the per-slice outputs
    (B * S, K) are reduced over the S slices of each volume. A 2D input (B, C, H, W) is passed through unchanged, so
    the same inferer serves slice-level and volume-level evaluation.

    Args:
        spatial_dim: spatial axis to slice along (0, 1 or 2; 2 is axial for RAS-oriented volumes).
        sw_batch_size: slices per network call.
        reduction: ``"mean"`` (the study's aggregation), ``"median"`` or ``"none"`` (keep (B, S, K)).
        device: where slice chunks are sent (default: the input's device).

    Example:
        >>> inferer = SliceAggregateInferer(spatial_dim=2, sw_batch_size=16)
        >>> inferer(torch.rand(2, 1, 48, 48, 40), net2d).shape  # net2d: 5 outputs
        torch.Size([2, 5])
    """

    def __init__(
        self,
        spatial_dim: int = 2,
        sw_batch_size: int = 16,
        reduction: str = "mean",
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if isinstance(spatial_dim, bool) or spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim must be 0, 1 or 2, got {spatial_dim!r}")
        if int(sw_batch_size) != sw_batch_size or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
        if reduction not in ("mean", "median", "none"):
            raise ValueError(f"reduction must be 'mean', 'median' or 'none', got {reduction!r}")
        self.spatial_dim = int(spatial_dim)
        self.sw_batch_size = int(sw_batch_size)
        self.reduction = reduction
        self.device = None if device is None else torch.device(device)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Slice-wise predictions of ``network`` on ``inputs`` aggregated per volume.

        Args:
            inputs: (B, C, D, H, W) volumes or (B, C, H, W) slices.
            network: a 2D network returning (N, K) (or (N,)) per slice.
            args, kwargs: passed on to ``network``.

        Returns:
            (B, K) aggregated outputs ((B, S, K) with ``reduction="none"``; for a 2D input the network's output).
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.ndim == 4:
            return network(inputs, *args, **kwargs)
        if inputs.ndim != 5:
            raise ValueError(
                "SliceAggregateInferer expects (B, C, D, H, W) volumes or (B, C, H, W) slices, "
                f"got {tuple(inputs.shape)}"
            )
        x = _plain(inputs)
        b = x.shape[0]
        slices = x.movedim(2 + self.spatial_dim, 1)  # (B, S, C, h, w) view
        s = slices.shape[1]
        if s == 0:
            raise ValueError(f"the input has no slice along spatial axis {self.spatial_dim}: {tuple(inputs.shape)}")
        flat = slices.reshape(b * s, *slices.shape[2:])
        outs = []
        for start in range(0, b * s, self.sw_batch_size):
            chunk = flat[start : start + self.sw_batch_size]
            if self.device is not None:
                chunk = chunk.to(self.device)
            out = network(chunk, *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the network returned {type(out).__name__}; SliceAggregateInferer needs a tensor")
            outs.append(out.reshape(out.shape[0], -1))
        per_slice = torch.cat(outs).reshape(b, s, -1)
        if self.reduction == "mean":
            return per_slice.mean(dim=1)
        if self.reduction == "median":
            return per_slice.median(dim=1).values
        return per_slice


# --------------------------------------------------------------------------------------------------------- transform
def _columns(columns: Mapping[str, int] | Sequence[str] | Sequence[int]) -> dict[Any, int]:
    """name -> output column from a mapping, a list of names (columns 0..K-1) or a list of column indices."""
    if isinstance(columns, Mapping):
        cols = {k: int(v) for k, v in columns.items()}
    elif isinstance(columns, Sequence) and not isinstance(columns, str):
        items = list(columns)
        if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in items):
            cols = {int(c): int(c) for c in items}
        else:
            cols = {str(c): i for i, c in enumerate(items)}
    else:
        raise TypeError(f"columns must be a mapping name -> column or a list of names/columns, got {columns!r}")
    if not cols:
        raise ValueError("columns is empty")
    return cols


class AttributionEnergyd(MapTransform):
    """Dictionary transform: attribution energy of each output column of a (2D, slice-wise) model on a volume.

    For every key, ``data[key]`` (one volume (C, D, H, W), or a batch of one) is explained slice by slice along
    ``slice_axis`` with raw Grad-CAM (``normalize=False``) and the maps are summed per column while streaming
    (:func:`monai_gamverify.energy.volume_energy_multi`: one forward and one backward per chunk of slices for all
    columns). The result, a dict column name -> AE (Python floats), is stored under ``output_key`` (for several keys:
    ``f"{key}_{output_key}"``). With ``slice_axis=None`` the model takes the whole image (a 3D model).

    Args:
        keys: image key(s).
        network: the model (its state is left untouched by the CAM).
        target_layer: CAM layer name as in ``network.named_modules()``.
        columns: category -> output column, a list of category names (columns 0..K-1) or a list of columns.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        slice_axis: spatial axis of the slices (2 = axial for RAS volumes) or ``None`` for a 3D model.
        batch_size: slices per CAM call (each call holds ``len(columns) * batch_size`` slices).
        output_key: where the AE dict is stored.
        device: where slice batches are sent (default: the network's device).
        allow_missing_keys: skip absent keys.

    Example:
        >>> aed = AttributionEnergyd("image", net2d, "stages.2", ["parotid", "submandibular", "larynx"])
        >>> aed({"image": volume})["energy"]
        {'parotid': 812.3, 'submandibular': 640.1, 'larynx': 233.9}
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module,
        target_layer: str,
        columns: Mapping[str, int] | Sequence[str] | Sequence[int],
        method: str = "gradcam",
        slice_axis: int | None = 2,
        batch_size: int = 16,
        output_key: str = "energy",
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(target_layer, str):
            raise TypeError(f"target_layer must be one layer name, got {target_layer!r}")
        self.network = unwrap_network(network)
        self.cam = make_cam(self.network, target_layer, method)
        self.columns = _columns(columns)
        self.slice_axis = slice_axis
        self.batch_size = batch_size
        self.output_key = output_key
        self.device = device

    def _device(self) -> torch.device | None:
        if self.device is not None:
            return torch.device(self.device)
        param = next(self.network.parameters(), None)
        return None if param is None else param.device

    def energy(self, volume: Any) -> dict[Any, float]:
        """AE of one volume for every column (see the class docstring)."""
        return volume_energy_multi(
            self.cam,
            volume,
            self.columns,
            slice_axis=self.slice_axis,
            batch_size=self.batch_size,
            device=self._device(),
            progress=False,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            try:
                ae = self.energy(d[key])
            except ValueError as err:
                name = _source_name(d[key])
                raise ValueError(f"attribution energy of {key!r}{f' ({name})' if name else ''}: {err}") from err
            d[self.output_key if len(keys) == 1 else f"{key}_{self.output_key}"] = ae
        return d


def _source_name(x: Any) -> str:
    return image_name(x, default="") if x is not None else ""


class SliceCAMd(MapTransform):
    """Dictionary transform: the CAM of a 2D model applied slice by slice, stacked back into a volume.

    Each slice along ``slice_axis`` of ``data[key]`` (C, D, H, W) is explained (``batch_size`` slices per CAM call)
    for output column ``column``; the (1, D, H, W) stack is stored under ``output_key`` as a MetaTensor carrying the
    image's meta (affine), so ``SaveImaged`` writes it aligned with the volume. With ``normalize=False`` the raw maps
    are kept and their sum is the volume's attribution energy for that column.

    Args:
        keys: image key(s).
        network: the 2D model.
        target_layer: CAM layer name.
        column: output column (or category index) to explain; ``None`` = argmax per slice.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        slice_axis: spatial axis of the slices.
        batch_size: slices per CAM call.
        normalize: scale each slice's map to [0, 1] (``False``: raw values).
        output_key: where the stacked map is stored (for several keys: ``f"{key}_{output_key}"``).
        allow_missing_keys: skip absent keys.

    Example:
        >>> SliceCAMd("image", net2d, "stages.2", column=4, output_key="cam")({"image": volume})["cam"].shape
        torch.Size([1, 48, 48, 48])
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module,
        target_layer: str,
        column: int | None = None,
        method: str = "gradcam",
        slice_axis: int = 2,
        batch_size: int = 16,
        normalize: bool = True,
        output_key: str = "cam",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(slice_axis, bool) or slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.network = unwrap_network(network)
        self.cam = make_cam(self.network, target_layer, method)
        self.column, self.slice_axis, self.batch_size = column, int(slice_axis), int(batch_size)
        self.normalize, self.output_key = normalize, output_key

    def maps(self, volume: Any) -> torch.Tensor:
        """(1, D, H, W) stacked slice maps of one (C, D, H, W) volume, on the volume's device."""
        x = _plain(torch.as_tensor(volume))
        if x.ndim != 4:
            raise ValueError(f"SliceCAMd expects one volume (C, D, H, W), got shape {tuple(x.shape)}")
        param = next(self.network.parameters(), None)
        device = param.device if param is not None else x.device
        slices = x.float().movedim(1 + self.slice_axis, 0)  # (S, C, h, w)
        out = []
        for start in range(0, slices.shape[0], self.batch_size):
            xb = slices[start : start + self.batch_size].contiguous().to(device)
            with torch.inference_mode(False), torch.enable_grad():
                m = self.cam(xb, class_idx=self.column, normalize=self.normalize)
            out.append(_plain(m)[:, 0].to(x.device))
        return torch.cat(out).movedim(0, self.slice_axis).unsqueeze(0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            img = d[key]
            try:
                cam = self.maps(img)
            except ValueError as err:
                name = _source_name(img)
                raise ValueError(f"slice CAM of {key!r}{f' ({name})' if name else ''}: {err}") from err
            if hasattr(img, "meta"):
                cam = MetaTensor(cam, meta=dict(img.meta))
            d[self.output_key if len(keys) == 1 else f"{key}_{self.output_key}"] = cam
        return d


# ----------------------------------------------------------------------------------------------------------- metrics
def regression_metrics(pred: Any, target: Any, categories: Sequence[str]) -> pd.DataFrame:
    """Per-category volume-level regression metrics: n, MAE, RMSE, bias, Spearman rho (and p) of pred vs target.

    Args:
        pred: (n, K) predictions.
        target: (n, K) reference scores (consensus).
        categories: K names.

    Returns:
        DataFrame ``category, n, mae, rmse, bias, spearman_rho, spearman_p`` (rho and p are NaN when fewer than 3
        volumes or a constant column make them undefined).

    Example:
        >>> regression_metrics(np.array([[1.0], [2.0], [3.5]]), np.array([[1.0], [2.5], [3.0]]), ["overall"])
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    p, t = (a.reshape(-1, 1) if a.ndim == 1 else a for a in (p, t))
    if p.shape != t.shape or p.shape[1] != len(categories):
        raise ValueError(f"pred {p.shape} and target {t.shape} must both be (n, {len(categories)})")
    rows = []
    for j, cat in enumerate(categories):
        err = p[:, j] - t[:, j]
        rho = pv = math.nan
        if len(err) >= 3 and np.ptp(p[:, j]) > 0 and np.ptp(t[:, j]) > 0:
            r = stats.spearmanr(p[:, j], t[:, j])
            rho, pv = float(r.statistic), float(r.pvalue)
        rows.append(
            {
                "category": cat,
                "n": len(err),
                "mae": float(np.abs(err).mean()) if len(err) else math.nan,
                "rmse": float(np.sqrt((err**2).mean())) if len(err) else math.nan,
                "bias": float(err.mean()) if len(err) else math.nan,
                "spearman_rho": rho,
                "spearman_p": pv,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------- handler
def _items(x: Any) -> list[Any]:
    """Decollated list of per-item dicts from an engine's batch/output (list of dicts or one collated dict)."""
    if isinstance(x, list):
        return x
    if isinstance(x, Mapping):
        return decollate_batch(x, detach=True)
    return []


def _vector(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = _plain(x).detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


class AttributionEnergyHandler:
    """Ignite handler: per-volume predictions, consensus scores and AE of an evaluator run, analysed at the end.

    During the run it collects, per item, the id (``batch[id_key]``, else the image file name, else a running
    index), the prediction ``output[pred_key]`` (K values), the consensus ``output[label_key]`` (K values, optional)
    and the AE dict ``output[energy_key]`` written by :class:`AttributionEnergyd` (optional; ``energy_key=None``
    skips the AE analysis). At ``EPOCH_COMPLETED`` it writes to ``output_dir``:

    - ``volume_scores.csv``: id, ``pred_<cat>``, ``consensus_<cat>``, ``ae_<cat>``;
    - ``regression_metrics.csv``: per category n, MAE, RMSE, bias, Spearman rho/p of prediction vs consensus;
    - with AE and consensus for at least 4 volumes: ``energy.csv``, ``consensus.csv`` and everything
      :func:`monai_gamverify.energy.energy_report` writes (``energy_table.csv``/``.json`` with full-sample and median
      leave-one-out rho/p, bootstrap interval and Holm adjustment, ``energy_loo.csv``, ``energy_atypical.csv``,
      ``energy_scatter_<cat>.png``);

    stores ``<prefix>mae_<cat>``, ``<prefix>spearman_<cat>``, ``<prefix>ae_rho_<cat>`` and
    ``<prefix>ae_median_loo_rho_<cat>`` in ``engine.state.metrics`` (so ``StatsHandler``/``MetricsSaver`` attached
    after it report them) and, with a summary writer or ``log_dir``, logs them (plus the mean AE per category) as
    TensorBoard scalars at the engine's epoch (or ``global_epoch_transform(epoch)``).

    In distributed runs attach it on rank 0 only; it sees that rank's items.

    Args:
        categories: output names in column order (e.g. the five quality categories).
        output_dir: where files are written (``None``: only metrics and TensorBoard).
        energy_key: output key of the AE dict (``None``: no AE analysis).
        pred_key, label_key: output keys of the prediction and consensus.
        id_key: batch key of the volume id.
        summary_writer: a TensorBoard ``SummaryWriter`` (shared with other handlers), or
        log_dir: directory for a writer of its own (closed when the engine completes).
        prefix: prefix of metric names and TensorBoard tags (e.g. ``"val_"``).
        n_boot, ci, seed, alpha, k: settings of the AE analysis (see :func:`energy_report`).
        plots: write the scatter PNGs.
        global_epoch_transform: maps the engine's epoch to the TensorBoard step (e.g. the trainer's epoch).

    Example:
        >>> AttributionEnergyHandler(["parotid", "overall"], "eval/energy", log_dir="eval").attach(evaluator)
    """

    def __init__(
        self,
        categories: Sequence[str],
        output_dir: str | os.PathLike | None = None,
        energy_key: str | None = "energy",
        pred_key: str = "pred",
        label_key: str = "label",
        id_key: str = "id",
        summary_writer: Any = None,
        log_dir: str | os.PathLike | None = None,
        prefix: str = "",
        n_boot: int = 2000,
        ci: float = 0.95,
        seed: int = 0,
        alpha: float = 0.05,
        k: float = 1.5,
        plots: bool = True,
        global_epoch_transform: Callable[[int], int] = lambda e: e,
    ) -> None:
        if isinstance(categories, str) or not categories:
            raise ValueError(f"categories must be a non-empty list of names, got {categories!r}")
        self.categories = [str(c) for c in categories]
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"duplicate categories: {self.categories}")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.energy_key, self.pred_key, self.label_key, self.id_key = energy_key, pred_key, label_key, id_key
        self._writer = summary_writer
        self._own_writer = False
        self.log_dir = log_dir
        self.prefix = prefix
        self.n_boot, self.ci, self.seed, self.alpha, self.k, self.plots = n_boot, ci, seed, alpha, k, plots
        self.global_epoch_transform = global_epoch_transform
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ ignite plumbing
    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.finalize)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the collected items (called at every epoch start)."""
        self.rows = []

    def close(self, engine: Engine | None = None) -> None:
        """Close a writer the handler opened itself."""
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer, self._own_writer = None, False

    @property
    def writer(self) -> Any:
        if self._writer is None and self.log_dir is not None:
            self._writer, self._own_writer = SummaryWriter(log_dir=str(self.log_dir)), True
        return self._writer

    # ------------------------------------------------------------------ collection
    def _check_len(self, name: str, values: np.ndarray, ident: str) -> np.ndarray:
        if values.size != len(self.categories):
            raise ValueError(
                f"{name} of volume {ident} has {values.size} values, expected one per category {self.categories}"
            )
        return values

    def collect(self, engine: Engine) -> None:
        """Gather the items of the current iteration (``ITERATION_COMPLETED``)."""
        outputs = _items(engine.state.output)
        batches = _items(engine.state.batch)
        if batches and len(batches) != len(outputs):
            batches = []
        for i, out in enumerate(outputs):
            if not isinstance(out, Mapping):
                raise TypeError("AttributionEnergyHandler needs dictionary outputs (a MONAI SupervisedEvaluator)")
            src = batches[i] if batches else {}
            ident = src.get(self.id_key, out.get(self.id_key)) if isinstance(src, Mapping) else None
            if ident is None:
                name = _source_name(out.get("image"))
                ident = Path(name).name.split(".")[0] if name else f"item_{len(self.rows):04d}"
            ident = str(ident)
            if self.pred_key not in out:
                raise KeyError(f"output of volume {ident} has no {self.pred_key!r}; available: {sorted(out)}")
            row: dict[str, Any] = {"id": ident}
            pred = self._check_len("prediction", _vector(out[self.pred_key]), ident)
            row.update({f"pred_{c}": float(v) for c, v in zip(self.categories, pred)})
            if out.get(self.label_key) is not None:
                lab = self._check_len("consensus", _vector(out[self.label_key]), ident)
                row.update({f"consensus_{c}": float(v) for c, v in zip(self.categories, lab)})
            if self.energy_key is not None and out.get(self.energy_key) is not None:
                ae = out[self.energy_key]
                if not isinstance(ae, Mapping):
                    raise TypeError(f"{self.energy_key!r} of volume {ident} must be a dict category -> AE")
                missing = [c for c in self.categories if c not in ae]
                if missing:
                    raise KeyError(f"AE of volume {ident} lacks categories {missing} (has {sorted(ae)})")
                row.update({f"ae_{c}": float(ae[c]) for c in self.categories})
            self.rows.append(row)

    # ------------------------------------------------------------------ analysis
    def finalize(self, engine: Engine | None = None) -> dict[str, Any]:
        """Compute and write everything (``EPOCH_COMPLETED``); returns the results dict."""
        df = pd.DataFrame(self.rows)
        epoch = engine.state.epoch if engine is not None else 1
        step = self.global_epoch_transform(epoch)
        scalars: dict[str, float] = {}
        self.results = {"volumes": df}
        if df.empty:
            logger.warning("AttributionEnergyHandler: no item was collected")
            return self.results
        dup = df["id"][df["id"].duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"volume ids are not unique: {dup[:10]} (set id_key to a unique field)")
        if self.output_dir is not None:
            write_csv(df, self.output_dir / "volume_scores.csv", float_format="%.6g")
        cons_cols = [f"consensus_{c}" for c in self.categories]
        has_cons = all(c in df.columns for c in cons_cols) and not df[cons_cols].isna().any().any()
        if has_cons:
            reg = regression_metrics(
                df[[f"pred_{c}" for c in self.categories]].to_numpy(), df[cons_cols].to_numpy(), self.categories
            )
            self.results["regression"] = reg
            if self.output_dir is not None:
                write_csv(reg, self.output_dir / "regression_metrics.csv", float_format="%.6g")
            for r in reg.itertuples():
                scalars[f"mae_{r.category}"] = r.mae
                scalars[f"spearman_{r.category}"] = r.spearman_rho
        ae_cols = [f"ae_{c}" for c in self.categories]
        has_ae = self.energy_key is not None and all(c in df.columns for c in ae_cols)
        if has_ae:
            for c in self.categories:
                scalars[f"ae_mean_{c}"] = float(df[f"ae_{c}"].mean())
        if has_ae and has_cons:
            self._energy_analysis(df, scalars)
        elif has_ae:
            logger.info("AttributionEnergyHandler: no consensus scores; AE is written without correlation analysis")
        scalars = {f"{self.prefix}{k}": v for k, v in scalars.items()}
        if engine is not None:
            engine.state.metrics.update({k: v for k, v in scalars.items() if not k.startswith(f"{self.prefix}ae_mean")})
        writer = self.writer
        if writer is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(value):
                    writer.add_scalar(key, value, step)
            writer.flush()
        self.results["scalars"] = scalars
        return self.results

    def _energy_analysis(self, df: pd.DataFrame, scalars: dict[str, float]) -> None:
        n = len(df)
        if n < 4:
            logger.warning("AttributionEnergyHandler: %d volume(s); the leave-one-out analysis needs at least 4", n)
            return
        if self.output_dir is None:
            logger.warning("AttributionEnergyHandler: no output_dir; the AE table is not written")
            return
        energy = df[["id"] + [f"ae_{c}" for c in self.categories]].rename(columns=lambda s: s.removeprefix("ae_"))
        scores = df[["id"] + [f"consensus_{c}" for c in self.categories]]
        scores = scores.rename(columns=lambda s: s.removeprefix("consensus_"))
        e_csv = write_csv(energy, self.output_dir / "energy.csv", float_format="%.10g")
        s_csv = write_csv(scores, self.output_dir / "consensus.csv", float_format="%.6g")
        usable = [c for c in self.categories if np.ptp(energy[c].to_numpy()) > 0 and np.ptp(scores[c].to_numpy()) > 0]
        skipped = sorted(set(self.categories) - set(usable), key=self.categories.index)
        if skipped:
            logger.warning("AttributionEnergyHandler: constant AE or consensus, rho undefined for %s", skipped)
        if not usable:
            return
        report = energy_report(
            e_csv,
            s_csv,
            self.output_dir,
            categories=usable,
            n_boot=self.n_boot,
            ci=self.ci,
            seed=self.seed,
            alpha=self.alpha,
            k=self.k,
            plots=self.plots,
            progress=False,
        )
        self.results["energy_table"] = pd.DataFrame(report["table"])
        self.results["paths"] = report["paths"]
        for row in report["table"]:
            c = row["category"]
            for name, col in (
                ("ae_rho", "rho"),
                ("ae_median_loo_rho", "median_loo_rho"),
                ("ae_median_loo_p", "median_loo_p"),
            ):
                scalars[f"{name}_{c}"] = math.nan if row[col] is None else float(row[col])


# ------------------------------------------------------------------------------------------------- bundle + datalist
def bundle_energy(
    bundle_root: str | os.PathLike,
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    scores: str | os.PathLike | None = None,
    categories: Sequence[str] | str | None = None,
    overrides: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    method: str | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """AE of a bundle's model on every volume of a datalist split, then :func:`monai_gamverify.energy.energy_report`.

    Each image goes through the bundle's inference preprocessing, one at a time; a 2D bundle on volumes (metadata
    ``gamverify.spatial_dims`` = 2, e.g. ``cbct_quality``) is explained slice by slice along
    ``gamverify.slice_axis``, streamed in slice batches, all categories in one pass. The scores come from
    ``scores`` (a CSV ``id, <category>...``) or, without it, from the datalist entries themselves (the synthetic
    ``quality`` datalist carries each volume's consensus scores).

    Args:
        bundle_root: bundle directory (``configs/inference.json``, ``models/model.pt``).
        datalist: MONAI datalist JSON.
        out_dir: output folder: ``ae.csv``, ``scores.csv`` and everything ``energy_report`` writes.
        split: datalist key.
        scores: consensus-score CSV (default: the scores in the datalist entries).
        categories: output names, in output order (default: metadata ``gamverify.categories``, else the output
            ``channel_def``); a comma-separated string is accepted.
        overrides: config overrides of the bundle (e.g. ``{"network_name": "resnet18"}``).
        checkpoint: weights other than ``models/model.pt``.
        method: ``gradcam`` (default: metadata ``gamverify.cam_method``), ``gradcampp`` or ``scorecam``.
        batch_size: slices per CAM call.
        device: CAM device (default: CUDA when available).
        n_boot, seed: bootstrap settings of the Spearman analysis.
        progress: progress bars.

    Returns:
        what ``energy_report`` returns, plus ``ae`` and ``scores`` (the two CSV paths) and ``n`` (volumes).

    Raises:
        ValueError: unknown method, categories that do not match the outputs, an item whose image cannot be
            preprocessed or explained (named), scores missing from the datalist entries.

    Example:
        >>> bundle_energy("bundles/cbct_quality", "data/quality/datalist.json", "energy_out")["paths"]["table_csv"]
    """
    bm = load_bundle(bundle_root, checkpoint=checkpoint, device=device, overrides=overrides)
    info = bm.metadata.get("gamverify", {}) if isinstance(bm.metadata, dict) else {}
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    cats = list(categories or info.get("categories") or bm.class_names)
    if not cats:
        raise ValueError("the bundle names no outputs: pass categories")
    if bm.target_layer is None:
        raise ValueError(f"bundle {bundle_root} defines no cam_layer / gamverify.target_layer")
    items = load_datalist(datalist, split, check="exists", spatial_dims=None, require_label=False)
    pre = bm.preprocessing()
    cam = make_cam(bm.network, bm.target_layer, method or info.get("cam_method", "gradcam"))
    dev = next(bm.network.parameters()).device
    columns = {c: i for i, c in enumerate(cats)}
    rows = []
    namer = OutputNamer()
    for e in tqdm(items, desc="AE volumes", disable=not progress):
        vid = str(e["id"]) if "id" in e else namer(e["image"])  # unique: case_0/imaging, case_1/imaging differ
        try:
            x = pre({"image": e["image"]})["image"] if pre is not None else load_image(e["image"])
            ae = volume_energy_multi(
                cam, x, columns, slice_axis=bm.slice_axis(x.ndim - 1), batch_size=batch_size, device=dev, progress=False
            )
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # out of memory says nothing about the item: let the caller see it (e.g. to lower batch_size)
        except Exception as err:  # preprocessing / CAM errors of one item: name the item
            raise ValueError(f"attribution energy of {e['image']}: {err}") from err
        rows.append({"id": vid, **ae})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(rows), out / "ae.csv")
    if scores is None:
        lacking = sorted({c for e in items for c in cats if c not in e})
        if lacking:
            raise ValueError(f"the datalist entries of {split!r} have no score for {lacking}: pass scores=<CSV>")
        table = pd.DataFrame([{"id": r["id"], **{c: float(e[c]) for c in cats}} for r, e in zip(rows, items)])
        write_csv(table, out / "scores.csv")
        scores = out / "scores.csv"
    report = energy_report(out / "ae.csv", scores, out, categories=cats, n_boot=n_boot, seed=seed, progress=progress)
    return {**report, "ae": str(out / "ae.csv"), "scores": str(scores), "n": len(rows)}
