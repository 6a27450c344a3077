"""Ignite handler writing one CSV row per predicted image (:class:`PredictionCSVWriter`), gathered from all ranks."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from monai.utils import min_version, optional_import

from monai_gamverify.handlers.utils import batch_items, gather_strings, rank_and_world
from monai_gamverify.io.files import write_csv
from monai_gamverify.io.names import OutputNamer, path_stem
from monai_gamverify.transforms.dictionary import image_name

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["PredictionCSVWriter"]

logger = logging.getLogger(__name__)


class PredictionCSVWriter:
    """One CSV row per image: id, image path, label (if any), prediction, class name and per-class probabilities.

    In a multi-process run every rank collects its own rows and, when the run completes, the rows of all ranks are
    gathered (as MONAI's ``ClassificationSaver`` does, with ``string_list_all_gather``) and rank 0 alone writes the
    file, in rank order. The ``id`` is unique per image: with ``data_root_dir`` the image path relative to it without
    extension (``case_00000/imaging``), else the file stem, with a hash of the full path added to stems that several
    images share (see :class:`monai_gamverify.io.names.OutputNamer`).

    Args:
        output_dir: directory of the CSV.
        filename: CSV file name.
        class_names: names of the output columns (default ``class0``, ``class1``, ...).
        pred_key: key of the prediction in ``engine.state.output`` items (probabilities, or logits with
            ``softmax=True``).
        label_key: key of the ground truth (optional).
        image_key: key of the image (its ``filename_or_obj`` gives the id and path).
        softmax: apply a softmax to ``pred`` first.
        data_root_dir: root of the input images; ids are the paths relative to it.

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
        data_root_dir: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = list(class_names) if class_names is not None else None
        self.pred_key = pred_key
        self.label_key = label_key
        self.image_key = image_key
        self.softmax = softmax
        self.data_root_dir = data_root_dir
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        """Register: reset on ``STARTED``, collect on ``ITERATION_COMPLETED``, gather and write on ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        outputs = batch_items(engine.state.output)
        inputs = batch_items(engine.state.batch)
        rank, world = rank_and_world()
        for i, out in enumerate(outputs):
            pred = torch.as_tensor(out[self.pred_key]).detach().float().cpu().flatten()
            probs = pred.softmax(0) if self.softmax else pred
            img = out.get(self.image_key, inputs[i].get(self.image_key) if i < len(inputs) else None)
            path = image_name(img, default="")
            names = self.class_names or [f"class{k}" for k in range(len(probs))]
            idx = int(probs.argmax())
            row: dict[str, Any] = {"id": "", "image": path}
            if not path:  # no file name: a position, unique across ranks
                row["id"] = f"item{len(self.rows)}" + (f"_rank{rank}" if world > 1 else "")
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

    def gathered_rows(self) -> list[dict]:
        """The rows of all ranks in rank order, with their unique ids (a collective call in multi-process runs)."""
        rows = [json.loads(s) for s in gather_strings([json.dumps(r) for r in self.rows])]
        stems: dict[str, set[str]] = {}
        for r in rows:
            if r["image"]:
                stems.setdefault(path_stem(r["image"]), set()).add(r["image"])
        namer = OutputNamer(self.data_root_dir, always_suffix=False)
        for r in rows:
            if not r["image"]:
                continue
            if self.data_root_dir is None and len(stems[path_stem(r["image"])]) > 1:
                r["id"] = f"{path_stem(r['image'])}_{OutputNamer.suffix(r['image'])}"  # every sharer gets a hash
            else:
                r["id"] = namer(r["image"])
        return rows

    def _write(self, engine: Engine) -> None:
        rows = self.gathered_rows()
        if rank_and_world()[0] != 0:
            return
        write_csv(pd.DataFrame(rows), self.path)
        logger.info("wrote %d predictions to %s", len(rows), self.path)
