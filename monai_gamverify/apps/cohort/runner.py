"""The cohort run: every item through the single-image engine (:class:`~monai_gamverify.apps.pipeline.ImagePipeline`),
results written atomically and resumable, bad items skipped and reported, items split between ``torchrun`` processes.

Example:
    >>> result = run_cohort("data/sos/datalist.json", "cohort_out", bundle_root="bundles/sos_staging")
    >>> result["n_succeeded"], result["n_failed"]
    (15, 0)
"""

# long module: the resumable, distributed cohort loop (shards, retries, OOM, verdicts) is one state machine
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import monai
import torch
from torch import nn
from tqdm.auto import tqdm

from monai_gamverify import __version__
from monai_gamverify.apps.cohort.distributed import barrier, dist_setup, gather, shard
from monai_gamverify.apps.cohort.items import cohort_items, safe_id
from monai_gamverify.apps.cohort.outdir import (
    RUN_FORMAT,
    RUN_VERSION,
    prepare_out,
    summarize,
    valid_result,
    write_tables,
)
from monai_gamverify.apps.pipeline import ImagePipeline, ImageResult, decide_verdict, error_message, is_out_of_memory
from monai_gamverify.data.datalist import DataError
from monai_gamverify.energy.attribution import attribution_energy
from monai_gamverify.io import save_map, write_json
from monai_gamverify.visualize.segcam import default_segmentation_label, label_index

__all__ = ["run_cohort", "segmentation_labels", "CohortInterrupted", "CohortOutOfMemory"]

logger = logging.getLogger(__name__)


class CohortInterrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C / SIGTERM); finished items are kept and the same call resumes it."""


class CohortOutOfMemory(RuntimeError):
    """The device ran out of memory on an item: the run stops (finished items are kept) instead of recording every
    later item as failed. Resume with a smaller model/image size, another device, or fewer processes per GPU."""


def _weights_sha256(network: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(network.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_arg(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(str(value))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} must be a JSON object, got {value!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} must be a JSON object, got {value!r}")
    return parsed


def _reference_file(reference: str | os.PathLike) -> Path:
    """The NIfTI file ``ReferenceMap.load(reference)`` reads (a directory means its ``reference_map.nii.gz``)."""
    p = Path(reference)
    return p / "reference_map.nii.gz" if p.is_dir() else p


@dataclass
class _SegmentationResult:
    """The maps of one item of a segmentation bundle: one normalised map per label, on the preprocessed grid, and
    the screen's answer (the fields :meth:`ImagePipeline.screen_results` reads and sets)."""

    input: Any
    cams: dict[str, torch.Tensor]
    raw_image: Any = None
    pending_screen: Any = None
    in_distribution: bool | None = None
    p_value: float | None = None
    reasons: list[str] = field(default_factory=list)
    screen: dict[str, Any] | None = None
    rejected: bool | None = None  # no K+1 garbage class in a segmentation model
    p_suitable: float | None = None
    verdict: str = "unverified"

    @property
    def cam(self) -> torch.Tensor:  # the similarity features (with a reference) use the one requested label
        return next(iter(self.cams.values()))


def segmentation_labels(engine: ImagePipeline, labels: Sequence[int | str] | None) -> list[tuple[int, str]]:
    """``(output channel, name)`` of the labels a segmentation cohort explains: ``labels`` by name or index, default
    every foreground channel of the bundle's ``channel_def`` (all but channel 0 of a softmax output, every channel of
    a sigmoid or single-channel one; :func:`~monai_gamverify.visualize.segcam.default_segmentation_label` onwards)."""
    names = list(engine.bundle.class_names) if engine.bundle is not None else []
    if labels is None or len(labels) == 0:
        first = default_segmentation_label(engine.bundle)
        labels = list(range(first, len(names))) or [first]
    out: list[tuple[int, str]] = []
    for lab in labels:
        idx = label_index(lab, names)
        out.append((idx, safe_id(names[idx] if idx < len(names) else str(idx))))
    if len({n for _, n in out}) != len(out):
        raise ValueError(f"labels {list(labels)} name some output channel twice")
    return out


class _Items:
    """One item through the engine (:meth:`compute`), features of a batch in one call (:meth:`features`), then the
    map on the input grid and the item JSON (:meth:`finish`)."""

    def __init__(
        self,
        engine: ImagePipeline,
        out: Path,
        save_maps: bool,
        keep_raw: bool,
        seg_labels: list[tuple[int, str]] | None = None,
    ) -> None:
        self.engine, self.out, self.save_maps, self.keep_raw = engine, out, save_maps, keep_raw
        self.seg_labels = seg_labels

    def compute(self, item: dict) -> tuple[dict, ImageResult | _SegmentationResult]:
        if "_error" in item:
            raise DataError(item["_error"])
        try:
            raw, x = self.engine.load(item["image"], extra=item)
        except FileNotFoundError as err:
            raise DataError(str(err)) from err
        if self.seg_labels is not None:
            return self._segmentation(item, x, raw if self.keep_raw else None)
        # the screen's scoring waits for the batch (one vectorised call in the writer thread); the raw image stays
        # until then for its data profile
        res = self.engine.explain(x, raw if self.keep_raw else None, source=item["image"], defer_screen=True)
        if res.pending_screen is None:
            res.raw_image = None  # not needed any more: keep the waiting batch small
        row: dict[str, Any] = {"id": item["id"], "image": item["image"]}
        if "label" in item:
            row["label"] = item["label"]
        row.update(prediction=res.prediction, prediction_name=res.prediction_name)
        if res.probabilities is not None:
            row.update({f"p_{n}": float(p) for n, p in zip(res.class_names, res.probabilities)})
        elif res.logits.numel() == 1:
            row["output"] = float(res.logits[0])
        else:
            row.update({f"output_{n}": float(v) for n, v in zip(res.class_names, res.logits.tolist())})
        row["energy"] = res.energy
        if res.garbage is not None:
            row.update(rejected=res.garbage["rejected"], garbage_prob=res.garbage["garbage_prob"])
        if res.in_distribution is not None or res.pending_screen is not None:
            row.update(in_distribution=res.in_distribution, p_value=res.p_value, reasons="; ".join(res.reasons))
            row["verdict"] = res.verdict
        if self.save_maps:
            row["map"] = f"maps/{item['id']}_cam.nii.gz"
        return row, res

    def _segmentation(self, item: dict, x: Any, raw: Any = None) -> tuple[dict, _SegmentationResult]:
        """The engine's observation of a segmentation item (:meth:`ImagePipeline.observe_loaded`: one pass through
        the bundle's inferer, then the Seg-Grad-CAM of every requested label); with a screen, the observation is
        judged later in a batch like a classification item's (:meth:`screen`)."""
        engine = self.engine
        row: dict[str, Any] = {"id": item["id"], "image": item["image"]}
        if "label" in item:
            row["label"] = item["label"]
        labels = [idx for idx, _ in self.seg_labels or []]
        obs = engine.observe_loaded(x, raw, labels, source=item["image"])
        cams: dict[str, torch.Tensor] = {}
        for (_, name), key in zip(self.seg_labels or [], obs.raw_maps):
            row[f"voxels_{name}"] = obs.predicted_voxels[key]
            row[f"energy_{name}"] = float(attribution_energy(obs.raw_maps[key][None])[0])
            cams[name] = obs.cam_of(key)
            if self.save_maps:
                row[f"map_{name}"] = f"maps/{item['id']}_{name}_cam.nii.gz"
        res = _SegmentationResult(obs.input, cams)
        if engine.screen is not None:
            res.pending_screen = obs
            row.update(in_distribution=None, p_value=None, reasons="", verdict=res.verdict)  # filled by screen()
        return row, res

    def screen(self, batch: Sequence[tuple[dict, ImageResult]]) -> list[Exception | None]:
        """The screen's answers of a batch in one call (one call per item when the batch call fails, so that the
        error lands on the item that caused it)."""
        errors: list[Exception | None] = [None] * len(batch)
        todo = [k for k, (_, res) in enumerate(batch) if res.pending_screen is not None]
        if not todo:
            return errors
        try:
            self.engine.screen_results([batch[k][1] for k in todo])
        except Exception as err:  # noqa: BLE001 - retried one by one below
            if is_out_of_memory(err):
                raise
            for k in todo:
                try:
                    self.engine.screen_results([batch[k][1]])
                except Exception as one:  # noqa: BLE001 - reported for this item
                    if is_out_of_memory(one):
                        raise
                    errors[k] = one
        for k in todo:
            row, res = batch[k]
            res.raw_image = None
            if errors[k] is None:
                row.update(in_distribution=res.in_distribution, p_value=res.p_value, reasons="; ".join(res.reasons))
                row["verdict"] = res.verdict  # "out of distribution" before any model verdict (set again by one)
        return errors

    def features(self, batch: Sequence[tuple[dict, ImageResult]]) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(batch)
        if self.engine.reference is None or not batch:
            return errors
        for k, f in enumerate(self.engine.features([res.cam for _, res in batch])):
            if isinstance(f, Exception):
                errors[k] = f
            else:
                batch[k][0].update(f)
        return errors

    def finish(self, row: dict, res: ImageResult, config_hash: str, error: Exception | None) -> tuple[str, dict]:
        """Map (on the input grid) then the item JSON, or the error record; runs in the writer thread by default:
        resampling and compression (zlib releases the GIL) overlap the next item's forward pass."""
        item_json = self.out / "items" / f"{row['id']}.json"
        error_json = self.out / "errors" / f"{row['id']}.json"
        shapes: dict[str, list[int]] = {}
        try:
            if error is not None:
                raise error
            if self.save_maps:
                parts = {"map": res} if isinstance(res, ImageResult) else {
                    f"map_{name}": SimpleNamespace(cam=cam, input=res.input) for name, cam in res.cams.items()
                }  # fmt: skip
                for key, part in parts.items():
                    cam, ref = self.engine.on_input_grid(part)
                    shapes[key] = [int(s) for s in cam.shape[1:]]
                    save_map(cam, self.out / row[key], reference=ref)
        except Exception as err:  # noqa: BLE001 - e.g. a map unlike the reference, a preprocessing not invertible
            if is_out_of_memory(err):
                raise
            rec = {"id": row["id"], "file": row["image"], "message": error_message(err)}
            write_json({**rec, "config_hash": config_hash}, error_json)
            return "error", rec
        # the item JSON last: its presence marks the item (and its map) done
        record = {"id": row["id"], "status": "ok", "config_hash": config_hash, "result": row,
                  "map_shape": shapes.get("map"), "map_shapes": shapes}  # fmt: skip
        write_json(record, item_json)
        error_json.unlink(missing_ok=True)
        return "ok", row


def _error_record(item: dict, err: BaseException) -> dict:
    message = err.args[0] if isinstance(err, DataError) and err.args else error_message(err)
    return {"id": item["id"], "file": item.get("image", ""), "message": message}


def _add_verdicts(rows: list[dict], engine: ImagePipeline) -> None:
    """``p_suitable`` and ``verdict`` of every row with one forest call (the engine's ``suitability``)."""
    cols = [str(c) for c in engine.verifier.feature_names_in_]
    for row, p in zip(rows, engine.suitability([{c: r[c] for c in cols} for r in rows])):
        row["p_suitable"] = p
        row["verdict"] = decide_verdict(row.get("in_distribution"), row.get("rejected"), p, engine.threshold)


def run_cohort(
    data: str | os.PathLike | Sequence[Any],
    out: str | os.PathLike = "cohort_out",
    *,
    bundle_root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | str | None = None,
    network: nn.Module | str | None = None,
    network_args: Mapping[str, Any] | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    layer: str | None = None,
    method: str | None = None,
    preprocessing: Callable[[dict], dict] | None = None,
    a_min: float | None = None,
    a_max: float | None = None,
    spatial_dims: int | None = 3,
    class_names: Sequence[str] | None = None,
    reference: str | os.PathLike | None = None,
    verifier: str | os.PathLike | None = None,
    threshold: float = 0.5,
    metrics: Sequence[str] | None = None,
    screen: Any = None,
    labels: Sequence[int | str] | None = None,
    split: str = "test",
    invert: bool = True,
    save_maps: bool = True,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    background_writes: bool = True,
    feature_batch: int = 8,
) -> dict[str, Any]:
    """Explain and (optionally) verify every image of a cohort; resumable, fault tolerant, ``torchrun``-aware.

    Each item goes through the engine (:class:`~monai_gamverify.apps.pipeline.ImagePipeline`): preprocessing, one
    forward/backward pass (prediction, probabilities, CAM of the predicted class), attribution energy, K+1 rejection
    for a model with a ``garbage`` class, the optional ``screen``, the normalised map as NIfTI on the input's grid;
    with ``reference`` the similarity features (``feature_batch`` maps per call), with ``verifier`` P(suitable) and
    a verdict (one forest call for all items of a process after its loop: in ``results.csv``, not in ``items/``).

    Files in ``out``: ``run.json``, ``items/<id>.json`` (written atomically, with the map's shape), ``maps/<id>_cam
    .nii.gz``, ``errors/<id>.json`` (failed items, retried on resume), ``results.csv`` (sorted by id), ``errors.csv``
    (id, file, message), ``summary.json``. On resume an item is skipped only if its JSON belongs to this run and its
    map is readable, complete, finite and of the recorded shape; otherwise it is recomputed.

    Args:
        data: datalist JSON, image directory, glob, file, or list of paths / entry dicts (see :func:`cohort_items`).
        out: output directory. Rerunning with the same arguments resumes.
        bundle_root: MONAI bundle (network, weights, ``preprocessing``, ``cam_layer``, class names, slice axis).
        overrides: bundle config overrides (dict or JSON).
        network: instead of a bundle, a ``torch.nn.Module`` or a network name built with ``network_args``.
        network_args: keyword arguments of a named network (dict or JSON).
        checkpoint: weights file (``torch.load(weights_only=True)``); bundle default ``models/model.pt``.
        layer: CAM target layer (the engine's ``target_layers``; default: the bundle's declared layer).
        method: ``gradcam``, ``gradcampp`` or ``scorecam`` (default: the bundle's ``cam_method``, else Grad-CAM).
        preprocessing: dictionary transform replacing the default one (invertible for ``invert``).
        a_min: with ``a_max``, intensity window of the default preprocessing, mapped to [0, 1].
        a_max: see ``a_min``.
        spatial_dims: spatial axes every image must have in the default preprocessing (``None``: not checked).
        class_names: output names (default: the bundle's, else the class indices).
        reference: reference map (``ReferenceMap.save`` NIfTI or its directory) for the similarity features.
        verifier: fitted ``SuitabilityVerifier`` (``.skops``); needs ``reference``.
        threshold: P(suitable) at or above which the verdict is ``"suitable"``.
        metrics: similarity features (default ``DEFAULT_METRICS`` plus any the verifier uses).
        screen: optional in-distribution screen (a saved screen's directory or an object, see the engine); rows get
            ``in_distribution``, ``p_value``, ``reasons``, ``verdict``. A segmentation bundle needs a segmentation
            screen (``gamverify screen fit`` on it): profile and layout, plus early layers through the inferer.
        labels: segmentation bundles: the labels explained (names from the bundle's ``channel_def`` or output
            channels; default every channel but the background). Each label gets Seg-Grad-CAM through the bundle's
            inferer (the sum of its logits over its predicted mask), a map ``maps/<id>_<label>_cam.nii.gz`` and the
            columns ``voxels_<label>`` (predicted voxels), ``energy_<label>``, ``map_<label>``. With a reference,
            exactly one label.
        split: datalist list to run on.
        invert: maps on the input's original grid (``False``: on the preprocessed grid).
        save_maps: write the NIfTI maps.
        device: ``cpu``/``cuda``; under ``torchrun`` with CUDA each process uses ``cuda:LOCAL_RANK``.
        overwrite: start again in an ``out`` written with another configuration (its results are deleted).
        progress: progress bar (rank 0 only).
        background_writes: features, maps and item JSONs of each batch in a writer thread.
        feature_batch: items whose similarity features (and screen answers) are computed in one call.

    Returns:
        The summary (``n_items``, ``n_succeeded``, ``n_failed``, ``predictions``, ``energy``, ``failed_ids``,
        ``verdicts``/``mean_p_suitable`` with a verifier) plus ``out_dir``, ``files``, ``computed``, ``skipped``,
        ``rank``, ``world_size`` and ``seconds`` (``setup``, ``items``, ``items_cpu``, ``total``).

    Raises:
        DataError: the datalist/folder cannot be read or ids clash (nothing is run).
        ValueError: ``out`` holds a run with another configuration (and not ``overwrite``), or bad arguments.
        CohortInterrupted: Ctrl-C / SIGTERM; finished items are kept, the same call resumes.
        CohortOutOfMemory: the device ran out of memory; finished items are kept.

    Example:
        >>> run_cohort("data/sos/images", "out", network="monai_gamverify.networks.nets.SmallCNN",
        ...            network_args={"spatial_dims": 3, "out_channels": 5}, checkpoint="model.pt", layer="res4",
        ...            a_min=-1000, a_max=2000)["n_succeeded"]
        24
    """
    if (bundle_root is None) == (network is None):
        raise ValueError("give exactly one of bundle_root (a MONAI bundle) or network (a module or network name)")
    if verifier is not None and reference is None:
        raise ValueError("a verifier needs the reference map it was trained against: pass reference=")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    started = time.perf_counter()
    items = cohort_items(data, split=split)
    out = Path(out)
    rank, world, dev, initialised = dist_setup(device)
    try:
        config: dict[str, Any] = {"method": method, "spatial_dims": spatial_dims, "a_min": a_min, "a_max": a_max}
        ref_value = ver = None
        if reference is not None:  # sklearn and pandas are imported only when verifying
            from monai_gamverify.verification.reference import ReferenceMap
            from monai_gamverify.verification.verifier import SuitabilityVerifier

            ref_value = ReferenceMap.load(reference).value
            ver = SuitabilityVerifier.load(verifier) if verifier is not None else None
        common = dict(method=method, reference=ref_value, verifier=ver, threshold=threshold, metrics=metrics,
                      screen=screen, invert=invert, device=dev)  # fmt: skip
        if preprocessing is not None:
            common["preprocessing"] = preprocessing
        if class_names is not None:
            common["class_names"] = list(class_names)
        if bundle_root is not None:
            extra = _json_arg(overrides, "overrides")
            engine = ImagePipeline.from_bundle(
                bundle_root, overrides=extra, checkpoint=checkpoint, target_layers=layer, **common
            )
            config.update(bundle_root=str(Path(bundle_root).resolve()), overrides=extra)
        else:
            if not layer:
                raise ValueError("no CAM target layer: pass layer= (names as in model.named_modules())")
            args = _json_arg(network_args, "network_args") if isinstance(network, str) else None
            engine = ImagePipeline.from_network(network, layer, network_args=args, checkpoint=checkpoint, a_min=a_min,
                                                a_max=a_max, spatial_dims=spatial_dims,
                                                **{**common, "method": method or "gradcam"})  # fmt: skip
            config.update(network=network if isinstance(network, str) else type(network).__name__, network_args=args)
        seg_labels = None
        if engine.bundle is not None and engine.bundle.task == "segmentation" and engine.slice_axis is None:
            seg_labels = segmentation_labels(engine, labels)
            if ref_value is not None and len(seg_labels) != 1:
                raise ValueError(
                    f"a reference map belongs to one label: pass exactly one label (got {[n for _, n in seg_labels]})"
                )
            logger.info("segmentation bundle: explaining label(s) %s", ", ".join(n for _, n in seg_labels))
        elif labels:
            raise ValueError("labels= is for segmentation bundles; this model is a classifier")
        engine.check_screen("classification" if seg_labels is None else "segmentation")
        config.update(
            method=engine.method,
            segmentation_labels=None if seg_labels is None else [list(t) for t in seg_labels],
            layer=engine.target_layers,
            class_names=list(class_names or []) if bundle_root is None else engine.class_names,
            weights_sha256=_weights_sha256(engine.network),
            custom_preprocessing=None if preprocessing is None else type(preprocessing).__name__,
            reference_sha256=_file_sha256(_reference_file(reference)) if reference is not None else None,
            verifier_sha256=_file_sha256(verifier),
            threshold=float(threshold),
            metrics=engine.metrics,
            screen=None
            if screen is None
            else str(screen)
            if isinstance(screen, (str, os.PathLike))
            else type(screen).__name__,
            invert=bool(invert),
            save_maps=bool(save_maps),
            data=str(Path(data).resolve()) if isinstance(data, (str, os.PathLike)) else "list",
            split=split,
            items=hashlib.sha256(json.dumps([[i["id"], i.get("image")] for i in items]).encode()).hexdigest()[:16],
            n_items=len(items),
        )
        config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        run_info = {
            "format": RUN_FORMAT,
            "format_version": RUN_VERSION,
            "config_hash": config_hash,
            "config": config,
            "versions": {"monai_gamverify": __version__, "monai": monai.__version__, "torch": torch.__version__},
        }
        prepare_out(out, run_info, overwrite, rank, world)

        runner = _Items(engine, out, save_maps, keep_raw=screen is not None, seg_labels=seg_labels)
        mine = [items[i] for i in shard(len(items), rank, world)]
        rows: list[dict] = []
        errors: list[dict] = []
        computed = skipped = 0
        loop_started, loop_cpu = time.perf_counter(), time.process_time()
        bar = tqdm(mine, desc=f"cohort ({world} process{'es' if world > 1 else ''})", disable=not progress or rank)
        pool = ThreadPoolExecutor(1, thread_name_prefix="cohort-writer") if background_writes else None
        queue: deque[Future] = deque()
        waiting: list[tuple[dict, ImageResult]] = []  # computed items whose features and files are not done
        batch = max(1, int(feature_batch)) if ref_value is not None or screen is not None else 1

        def settle(outcomes: list[tuple[str, dict]]) -> None:
            for kind, rec in outcomes:
                (rows if kind == "ok" else errors).append(rec)

        def finish_batch(group: list[tuple[dict, ImageResult]]) -> list[tuple[str, dict]]:
            screened = runner.screen(group)
            failures = [s or f for s, f in zip(screened, runner.features(group))]
            return [runner.finish(row, res, config_hash, f) for (row, res), f in zip(group, failures)]

        def flush() -> None:
            # in the writer thread the features and map files of this batch overlap the next batch's forward passes
            if not waiting:
                return
            if pool is None:
                settle(finish_batch(list(waiting)))
            else:
                queue.append(pool.submit(finish_batch, list(waiting)))
                while len(queue) > 2:  # bounded: at most a few batches of maps wait in memory
                    settle(queue.popleft().result())
            waiting.clear()

        try:
            for item in bar:
                done = valid_result(out / "items" / f"{item['id']}.json", item["id"], config_hash, out)
                if done is not None:
                    rows.append(done)
                    skipped += 1
                    continue
                computed += 1
                try:
                    waiting.append(runner.compute(item))
                except Exception as err:  # skip and report: one bad item never stops the cohort
                    if is_out_of_memory(err):
                        raise
                    rec = _error_record(item, err)
                    write_json({**rec, "config_hash": config_hash}, out / "errors" / f"{item['id']}.json")
                    errors.append(rec)
                    continue
                # a full batch, or an idle writer thread: it never waits while items do (no unoverlapped tail of a
                # whole batch at the end); under load the batches fill up (one vectorised call each)
                if len(waiting) >= batch or (pool is not None and all(f.done() for f in queue)):
                    flush()
            flush()
            while queue:
                settle(queue.popleft().result())
        except KeyboardInterrupt as err:
            bar.close()
            if pool is not None:  # writes in progress complete (atomically); queued ones are dropped
                pool.shutdown(wait=True, cancel_futures=True)
            saved = len(list((out / "items").glob("*.json")))
            text = (f"interrupted (rank {rank}): {saved} item results are saved in {out / 'items'}; run the same "
                    "command again to resume (finished items are skipped)")  # fmt: skip
            logger.warning(text)
            raise CohortInterrupted(text) from err
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            text = (
                f"out of device memory on {dev} (rank {rank}): {error_message(err)}; finished items are saved in "
                f"{out / 'items'}: resume on another device, with smaller inputs or fewer processes per GPU"
            )
            logger.error(text)
            raise CohortOutOfMemory(text) from err
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        bar.close()
        if ver is not None and rows:  # verdicts of this process's rows in one batched call (not stored in items/)
            _add_verdicts(rows, engine)
        loop_seconds = time.perf_counter() - loop_started
        loop_cpu = time.process_time() - loop_cpu

        parts = gather({"rows": rows, "errors": errors, "computed": computed, "skipped": skipped}, world)
        all_rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["id"])
        all_errors = sorted((e for p in parts for e in p["errors"]), key=lambda e: e["id"])
        files = {k: str(out / k) for k in ("results.csv", "errors.csv", "summary.json", "run.json")}
        if rank == 0:
            summary = write_tables(out, all_rows, all_errors, len(items), config_hash)
            logger.info("cohort: %d succeeded, %d failed (of %d); results -> %s", summary["n_succeeded"],
                        summary["n_failed"], len(items), files["results.csv"])  # fmt: skip
        else:
            summary = summarize(all_rows, all_errors, len(items), config_hash)
        barrier(world)  # the tables exist when any rank returns
        summary.update(
            out_dir=str(out),
            files=files,
            computed=sum(p["computed"] for p in parts),
            skipped=sum(p["skipped"] for p in parts),
            rank=rank,
            world_size=world,
            seconds={
                "setup": loop_started - started,
                "items": loop_seconds,
                "items_cpu": loop_cpu,
                "total": time.perf_counter() - started,
            },
        )
        return summary
    finally:
        if initialised:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()  # the barrier above already lines the ranks up
