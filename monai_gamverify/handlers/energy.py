"""Ignite handler of the attribution-energy analysis: :class:`AttributionEnergyHandler` collects per-volume
predictions, consensus scores and AE during an evaluator run and analyses them at the end of the epoch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from ignite.engine import Events
from monai.data import decollate_batch
from torch.utils.tensorboard import SummaryWriter

from monai_gamverify.energy.report import energy_report
from monai_gamverify.io import write_csv
from monai_gamverify.metrics.regression import regression_metrics
from monai_gamverify.transforms.dictionary import image_name
from monai_gamverify.utils import plain_tensor

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["AttributionEnergyHandler"]

logger = logging.getLogger(__name__)


def _source_name(x: Any) -> str:
    return image_name(x, default="") if x is not None else ""


def _items(x: Any) -> list[Any]:
    """Decollated list of per-item dicts from an engine's batch/output (list of dicts or one collated dict)."""
    if isinstance(x, list):
        return x
    if isinstance(x, Mapping):
        return decollate_batch(x, detach=True)
    return []


def _vector(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = plain_tensor(x).detach().float().cpu().numpy()
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
