"""K+1 "garbage" class in ignite workflows: :class:`RejectionCounter` counts and lists the rejected items."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from ignite.engine import Events

from monai_gamverify.io.files import write_csv

__all__ = ["RejectionCounter"]


def _item_id(item: Mapping[str, Any], id_key: str) -> str | None:
    """Identifier of a decollated output item: a string field, or the file name in a MetaTensor / meta dict."""
    value = item.get(id_key)
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    meta = getattr(value, "meta", None) or item.get(f"{id_key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)) and name:
        name = name[0]
    return None if name is None else str(name)


class RejectionCounter:
    """Ignite handler counting rejected items (after :class:`RejectGarbaged`) per iteration and per epoch.

    Logs TensorBoard scalars ``{tag}/iteration`` (count per iteration), ``{tag}/epoch_count`` and ``{tag}/epoch_rate``
    when a writer is given, stores ``{tag}_count`` and ``{tag}_rate`` in ``engine.state.metrics`` at each epoch end,
    and writes the rejected items (``id, epoch, iteration, garbage_prob``) as CSV when the run completes; with
    ``decisions_csv_path`` it also writes every item's decision (``id, epoch, iteration, rejected, garbage_prob,
    best_real_class, best_real_prob``). Counts and records restart at every run (``STARTED``), so with an evaluator
    they describe the last evaluation.

    Args:
        output_transform: maps ``engine.state.output`` to the rejection flags (bool sequence / tensor), or to a tuple
            ``(flags, ids)``. The default reads ``rejected_key`` from MONAI's decollated output (a list of dicts)
            or from a batched dict, and ids from ``id_key``.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        csv_path: where to write the rejected items at ``COMPLETED``; ``None`` writes nothing.
        decisions_csv_path: where to write one row per item (accepted ones too) with the :class:`RejectGarbaged`
            columns; ``None`` writes nothing. Needs the default output reading (no ``output_transform``).
        tag: name of the scalars and metrics.
        rejected_key: output field with the flags.
        id_key: output field identifying an item (a string, or an image whose metadata holds ``filename_or_obj``);
            items without one are named ``"epoch{e}_iter{i}_{position}"``.

    Example:
        >>> counter = RejectionCounter(summary_writer=writer, csv_path="rejected.csv")
        >>> counter.attach(evaluator)
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] | None = None,
        summary_writer: Any = None,
        csv_path: str | os.PathLike | None = None,
        tag: str = "rejections",
        rejected_key: str = "rejected",
        id_key: str = "image",
        decisions_csv_path: str | os.PathLike | None = None,
    ) -> None:
        if decisions_csv_path is not None and output_transform is not None:
            raise ValueError("decisions_csv_path reads the RejectGarbaged fields; do not give an output_transform")
        self.output_transform = output_transform
        self.summary_writer = summary_writer
        self.csv_path = csv_path
        self.decisions_csv_path = decisions_csv_path
        self.tag = tag
        self.rejected_key = rejected_key
        self.id_key = id_key
        self.reset()

    def reset(self, engine: Any = None) -> None:
        """Zero all counts and records."""
        self.iteration_rejected = 0
        self.epoch_rejected = 0
        self.epoch_seen = 0
        self.total_rejected = 0
        self.total_seen = 0
        self.records: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        """Register the handler's events on an ignite ``Engine``."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _epoch_started(self, engine: Any) -> None:
        self.epoch_rejected = 0
        self.epoch_seen = 0

    def _extract(self, output: Any) -> tuple[list[bool], list[str | None], list[float | None]]:
        flags, ids, probs, _ = self._extract_all(output)
        return flags, ids, probs

    def _extract_all(self, output: Any) -> tuple[list[bool], list[str | None], list[float | None], list[tuple]]:
        if self.output_transform is not None:
            out = self.output_transform(output)
            flags, ids = out if isinstance(out, tuple) else (out, None)
            flags = [bool(f) for f in torch.as_tensor(flags).reshape(-1).tolist()]
            ids = [None] * len(flags) if ids is None else [None if i is None else str(i) for i in ids]
            if len(ids) != len(flags):
                raise ValueError(f"output_transform returned {len(flags)} flags but {len(ids)} ids")
            return flags, ids, [None] * len(flags), [(None, None)] * len(flags)
        items = [output] if isinstance(output, Mapping) else list(output) if isinstance(output, Sequence) else None
        if not items or not all(isinstance(i, Mapping) and self.rejected_key in i for i in items):
            raise ValueError(
                f"engine output has no {self.rejected_key!r} field: add RejectGarbaged to the post-processing "
                "or give an output_transform"
            )
        flags, ids, probs, best = [], [], [], []

        def values(item: Mapping[str, Any], key: str, n: int) -> list[Any]:
            v = item.get(key)
            return [None] * n if v is None else torch.as_tensor(v).reshape(-1).tolist()

        for item in items:
            f = torch.as_tensor(item[self.rejected_key]).reshape(-1).tolist()
            flags.extend(bool(v) for v in f)
            probs.extend(values(item, "garbage_prob", len(f)))
            best.extend(zip(values(item, "best_real_class", len(f)), values(item, "best_real_prob", len(f))))
            ids.extend([_item_id(item, self.id_key)] * len(f) if len(f) == 1 else [None] * len(f))
        return flags, ids, probs, best

    def iteration_completed(self, engine: Any) -> None:
        """Count the current iteration's rejections and record the rejected items."""
        flags, ids, probs, best = self._extract_all(engine.state.output)
        epoch, iteration = engine.state.epoch, engine.state.iteration
        self.iteration_rejected = sum(flags)
        self.epoch_rejected += self.iteration_rejected
        self.epoch_seen += len(flags)
        self.total_rejected += self.iteration_rejected
        self.total_seen += len(flags)
        for pos, (flag, item_id, prob, (cls, cls_prob)) in enumerate(zip(flags, ids, probs, best)):
            name = item_id if item_id is not None else f"epoch{epoch}_iter{iteration}_{pos}"
            if flag:
                self.records.append({"id": name, "epoch": epoch, "iteration": iteration, "garbage_prob": prob})
            if self.decisions_csv_path is not None:
                self.decisions.append(
                    {
                        "id": name,
                        "epoch": epoch,
                        "iteration": iteration,
                        "rejected": flag,
                        "garbage_prob": prob,
                        "best_real_class": cls,
                        "best_real_prob": cls_prob,
                    }
                )
        if self.summary_writer is not None:
            self.summary_writer.add_scalar(f"{self.tag}/iteration", self.iteration_rejected, iteration)

    def epoch_completed(self, engine: Any) -> None:
        """Publish the epoch's count and rate (metrics and TensorBoard)."""
        rate = self.epoch_rejected / self.epoch_seen if self.epoch_seen else 0.0
        engine.state.metrics[f"{self.tag}_count"] = self.epoch_rejected
        engine.state.metrics[f"{self.tag}_rate"] = rate
        if self.summary_writer is not None:
            self.summary_writer.add_scalar(f"{self.tag}/epoch_count", self.epoch_rejected, engine.state.epoch)
            self.summary_writer.add_scalar(f"{self.tag}/epoch_rate", rate, engine.state.epoch)

    def completed(self, engine: Any) -> None:
        """Write the CSV of rejected items and flush the writer."""
        if self.csv_path is not None:
            write_csv(pd.DataFrame(self.records, columns=["id", "epoch", "iteration", "garbage_prob"]), self.csv_path)
        if self.decisions_csv_path is not None:
            columns = ["id", "epoch", "iteration", "rejected", "garbage_prob", "best_real_class", "best_real_prob"]
            write_csv(pd.DataFrame(self.decisions, columns=columns), self.decisions_csv_path)
        if self.summary_writer is not None and hasattr(self.summary_writer, "flush"):
            self.summary_writer.flush()
