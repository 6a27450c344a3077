"""Resumable, fault-tolerant, multi-process cohort runs: point a model at a folder or datalist of images and get,
per image, the prediction, the Grad-CAM map (NIfTI aligned with the input), the attribution energy and, when a
reference map and a fitted verifier are given, the similarity features and a suitability verdict.

Every item's result is written atomically (``out/items/<id>.json``, ``out/maps/<id>_cam.nii.gz``); a restarted run
skips items whose result is already valid, so a run killed at any point (power cut, ``SIGKILL``, Ctrl-C) is finished
by running the same command again. A bad item (missing, truncated or corrupted file, 2D where 3D is expected, NaN
voxels, an entry without an image) is recorded in ``out/errors.csv`` and the run goes on. Under ``torchrun`` the
items are split between the processes like ``DistributedSampler`` (without padding) and rank 0 gathers the rows and
writes ``out/results.csv`` (sorted by id) and ``out/summary.json``, identical to a single-process run.

Example:
    >>> result = run_cohort("data/sos/datalist.json", "cohort_out", bundle_root="bundles/sos_staging")
    >>> result["n_succeeded"], result["n_failed"]
    (15, 0)

    $ python -m monai_gamverify.apps.cohort --bundle_root bundles/sos_staging --datalist data/sos/datalist.json --out o
    $ torchrun --nproc_per_node=2 -m monai_gamverify.apps.cohort --bundle_root ... --datalist ... --out o
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_gamverify.data.datalist import PATH_KEYS, DataError, list_images, read_datalist_split
from monai_gamverify.io import fast_invert, save_map, write_csv, write_json

__all__ = ["run_cohort", "cohort_items", "CohortInterrupted", "RUN_FORMAT", "main"]

#: ``format`` entry of ``run.json``
RUN_FORMAT = "monai-gamverify.cohort"
_RUN_VERSION = 1
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_ERROR_COLUMNS = ["id", "file", "message"]
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object addresses differ between runs: keep errors.csv reproducible


class CohortInterrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C / SIGTERM); finished items are kept and the same call resumes it."""


# --------------------------------------------------------------------------------------------------------------------
# items
# --------------------------------------------------------------------------------------------------------------------


def _safe_id(value: Any) -> str:
    text = _BAD_ID_CHARS.sub("_", str(value)).strip("._")
    return text or "item"


def cohort_items(
    data: str | os.PathLike | Sequence[Any], split: str = "test", base_dir: str | os.PathLike | None = None
) -> list[dict]:
    """The items of a cohort run, each with a unique file-name-safe ``"id"``; bad entries are kept, not raised.

    Unlike :func:`monai_gamverify.data.load_datalist`, one bad entry does not stop the list: an entry without an
    ``image`` gets an ``"_error"`` message (it becomes a row of ``errors.csv``); missing or unreadable files are
    found when the item is processed.

    Args:
        data: a datalist JSON (decathlon style; relative paths resolved against its directory), a directory of
            images, a glob pattern, one image file, or a list of image paths / entry dicts.
        split: list of the datalist to run on.
        base_dir: directory that relative paths of a list of entries are resolved against (default: cwd).

    Returns:
        Entry dicts with ``id`` (entry ``id``, else the image file name without extension, else ``item<index>``)
        and absolute ``image`` paths.

    Raises:
        DataError: the datalist or folder cannot be read, or two entries share an id.

    Example:
        >>> cohort_items("data/sos/datalist.json", "test")[0]["id"]
        'sos_0003'
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(data, (str, os.PathLike)):
        p = Path(data).expanduser()
        if p.suffix.lower() == ".json":
            if not p.is_file():
                raise DataError(f"datalist not found: {p}")
            entries, base = read_datalist_split(p, split), p.parent
        else:
            entries = list_images(p, spatial_dims=None, num_channels=None, check="none")
    else:
        entries = list(data)
    if not entries:
        raise DataError("no items given")
    items: list[dict] = []
    for i, entry in enumerate(entries):
        item = (
            {"image": entry}
            if isinstance(entry, (str, os.PathLike))
            else dict(entry)
            if isinstance(entry, Mapping)
            else {"_error": f"entry {i} is not an image path or a dict: {entry!r}"}
        )
        for key in PATH_KEYS:
            if isinstance(item.get(key), (str, os.PathLike)):
                q = Path(item[key]).expanduser()
                item[key] = str(q if q.is_absolute() else (base / q).resolve())
        if "image" not in item and "_error" not in item:
            item["_error"] = f"entry {i} has no 'image' key (keys: {sorted(item)})"
        if "id" in item:
            item["id"] = _safe_id(item["id"])
        elif isinstance(item.get("image"), str):
            item["id"] = _safe_id(Path(item["image"]).name.split(".")[0])
        else:
            item["id"] = f"item{i:05d}"
        items.append(item)
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item["id"] in seen:
            raise DataError(
                f"entries {seen[item['id']]} and {i} have the same id {item['id']!r} "
                f"({items[seen[item['id']]].get('image')} and {item.get('image')}); give each entry a unique 'id'"
            )
        seen[item["id"]] = i
    return items


# --------------------------------------------------------------------------------------------------------------------
# model, preprocessing, configuration
# --------------------------------------------------------------------------------------------------------------------


def _simple_preprocessing(spatial_dims: int | None, a_min: float | None, a_max: float | None) -> Callable:
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, ScaleIntensityRanged

    from monai_gamverify.transforms.dictionary import CheckImaged

    chain = [
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        CheckImaged("image", spatial_dims=spatial_dims),
    ]
    if a_min is not None and a_max is not None:
        chain.append(ScaleIntensityRanged("image", a_min, a_max, 0.0, 1.0, clip=True))
    chain.append(EnsureTyped("image", dtype=torch.float32))
    return Compose(chain)


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


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------------------------------


def _dist_setup(device: str | torch.device | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, initialised here); initialises torch.distributed only under torchrun."""
    import torch.distributed as dist

    initialised = False
    env = os.environ
    wanted = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and int(env["WORLD_SIZE"]) > 1
    local_rank = int(env.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if wanted and dist.is_available() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        initialised = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device(device or "cpu")
    else:
        rank, world = 0, 1
        dev = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    return rank, world, dev, initialised


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)  # works on gloo and NCCL (the device is set); rows are small
    return out


def _shard(n: int, rank: int, world: int) -> list[int]:
    """Item indices of ``rank``: ``DistributedSampler(shuffle=False)`` order without its padding duplicates (what
    ``monai.data.DistributedSampler(even_divisible=False)`` gives, also when there are fewer items than ranks)."""
    return list(range(rank, n, world))


# --------------------------------------------------------------------------------------------------------------------
# output directory
# --------------------------------------------------------------------------------------------------------------------


def _prepare_out(out: Path, run_info: dict, overwrite: bool, rank: int, world: int) -> None:
    """Check ``run.json`` against this run's config (all ranks), then let rank 0 clean and write it."""
    run_json = out / "run.json"
    existing = None
    if run_json.is_file():
        try:
            existing = json.loads(run_json.read_text())
        except (OSError, json.JSONDecodeError):
            existing = None  # a run.json is only ever written atomically: an unreadable one is not ours
        if not isinstance(existing, dict) or existing.get("format") != RUN_FORMAT:
            if not overwrite:
                raise ValueError(f"{run_json} is not a cohort run record; choose another --out or pass overwrite")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        ours = {"items", "maps", "errors", "results.csv", "errors.csv", "summary.json"}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise ValueError(
                f"output directory {out} is not empty and holds no run.json (found {foreign[:5]}); "
                "choose an empty or new directory, or pass overwrite=True"
            )
    if existing is not None and isinstance(existing, dict) and existing.get("format") == RUN_FORMAT:
        old, new = existing.get("config", {}), run_info["config"]
        if old != new and not overwrite:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"{out} holds a run with a different configuration (differs in: {', '.join(diff)}); resume with the "
                "same arguments, choose another output directory, or pass overwrite=True to start again"
            )
        if old != new:
            existing = None
    _barrier(world)  # every rank has read run.json before rank 0 may replace it
    if rank == 0:
        if existing is None or overwrite:
            for sub in ("items", "maps", "errors"):
                shutil.rmtree(out / sub, ignore_errors=True)
            for name in ("results.csv", "errors.csv", "summary.json"):
                (out / name).unlink(missing_ok=True)
            write_json(run_info, run_json)
        for sub in ("items", "maps", "errors"):
            (out / sub).mkdir(parents=True, exist_ok=True)
            for stale in (out / sub).glob(".*"):  # temp files of writes cut short by SIGKILL
                stale.unlink(missing_ok=True)
    _barrier(world)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _valid_result(path: Path, item_id: str, config_hash: str, out: Path) -> dict | None:
    rec = _read_json(path) if path.is_file() else None
    if not isinstance(rec, dict) or rec.get("id") != item_id or rec.get("config_hash") != config_hash:
        return None
    if rec.get("status") != "ok" or not isinstance(rec.get("result"), dict):
        return None
    map_rel = rec["result"].get("map")
    if map_rel and not (out / map_rel).is_file():
        return None
    return rec["result"]


# --------------------------------------------------------------------------------------------------------------------
# one item
# --------------------------------------------------------------------------------------------------------------------


class _ItemRunner:
    """One item: preprocessing, one forward pass with Grad-CAM, energy (:meth:`compute`); similarity features of a
    batch of items in one call (:meth:`features`); then the map and the item JSON (:meth:`finish`)."""

    def __init__(self, network, layer, method, preprocessing, device, class_names, out, ref, metrics, invert,
                 save_maps) -> None:  # fmt: skip
        from monai_gamverify.transforms.dictionary import make_cam

        self.network, self.layer, self.device = network, layer, device
        self.cam = make_cam(network, layer, method)
        self.pre = preprocessing
        self.class_names = list(class_names or [])
        self.out = out
        self.ref = None if ref is None else ref.to(device)
        self.metrics = metrics
        self.save_maps = save_maps
        self.invert = invert

    def _on_input_grid(self, cam: torch.Tensor, img: Any) -> tuple[torch.Tensor, Any]:
        """(map, affine or reference image) on the input's grid: the fast inverse, else MONAI's ``Invertd``."""
        done = fast_invert(cam, img)
        if done is not None:
            return done
        from monai_gamverify.io.grid import invert_to_input

        inverted = invert_to_input(cam, img, self.pre)
        return inverted, inverted

    def compute(self, item: dict) -> tuple[dict, tuple[torch.Tensor, Any]]:
        """The item's result row so far and what :meth:`finish` needs: (normalised map (1, 1, *spatial), image)."""
        from monai_gamverify.energy.analysis import attribution_energy
        from monai_gamverify.visualize.cam import normalize_maps

        if "_error" in item:
            raise DataError(item["_error"])
        image = item["image"]
        if not Path(image).is_file():
            raise DataError(f"image file not found: {image}")
        data = {k: v for k, v in item.items() if k != "id"}
        img = self.pre(data)["image"]
        x = img.unsqueeze(0).to(self.device)
        result = self.cam.explain(x, normalize=False)  # one forward: logits + raw map of the predicted class
        raw = result.maps.as_tensor() if hasattr(result.maps, "as_tensor") else result.maps
        energy = float(attribution_energy(raw)[0])
        norm = normalize_maps(raw)
        logits = result.logits.float()[0]
        pred = int(logits.argmax())
        names = self.class_names if len(self.class_names) == logits.numel() else [str(i) for i in range(logits.numel())]
        row: dict[str, Any] = {"id": item["id"], "image": image}
        if "label" in item:
            row["label"] = item["label"]
        row.update(prediction=pred, prediction_name=names[pred])
        if logits.numel() > 1:
            row.update({f"p_{n}": float(p) for n, p in zip(names, logits.softmax(0).tolist())})
        else:
            row["output"] = float(logits[0])
        row["energy"] = energy
        if self.save_maps:
            row["map"] = f"maps/{item['id']}_cam.nii.gz"
        return row, (norm, img)

    def features(self, batch: Sequence[tuple[dict, tuple[torch.Tensor, Any]]]) -> list[Exception | None]:
        """Add the similarity features to the rows of ``batch`` with one ``similarity_metrics`` call for all maps of
        the reference's shape (its values are computed per map: the same numbers as one call per item).

        Returns one entry per item: ``None``, or the error of that item (e.g. a map unlike the reference map).
        """
        errors: list[Exception | None] = [None] * len(batch)
        if self.ref is None or not batch:
            return errors
        from monai_gamverify.metrics.similarity import similarity_metrics

        def one(k: int) -> None:
            try:
                feats = similarity_metrics(batch[k][1][0].float(), self.ref, metrics=self.metrics)
                batch[k][0].update({n: float(v[0]) for n, v in feats.items()})
            except Exception as err:
                errors[k] = err

        fits = [k for k, (_, (norm, _)) in enumerate(batch) if tuple(norm.shape[1:]) == tuple(self.ref.shape[1:])]
        done: set[int] = set()
        if len(fits) > 1:
            try:
                maps = torch.cat([batch[k][1][0] for k in fits]).float()
                values = {n: v.tolist() for n, v in similarity_metrics(maps, self.ref, metrics=self.metrics).items()}
            except Exception:  # e.g. one map with NaN: the calls per item below say which
                values = None
            if values is not None:
                for j, k in enumerate(fits):
                    batch[k][0].update({n: float(v[j]) for n, v in values.items()})
                done = set(fits)
        for k in range(len(batch)):
            if k not in done:
                one(k)
        return errors

    def finish(
        self, row: dict, pending: tuple[torch.Tensor, Any], config_hash: str, error: Exception | None = None
    ) -> tuple[str, dict]:
        """The map (resampled onto the input grid), then the item JSON; or the error record of a failed item.

        Runs in the writer thread by default: resampling and compression (zlib releases the GIL) overlap the next
        item's preprocessing and forward pass. Returns ``("ok", row)`` or ``("error", record)``.
        """
        item_json = self.out / "items" / f"{row['id']}.json"
        error_json = self.out / "errors" / f"{row['id']}.json"
        norm, img = pending
        try:
            if error is not None:
                raise error
            if self.save_maps:
                cam, ref = norm[0].cpu(), img
                if self.invert and getattr(img, "applied_operations", None):
                    cam, ref = self._on_input_grid(cam, img)
                save_map(cam, self.out / row["map"], reference=ref)
        except Exception as err:  # e.g. a map unlike the reference, a preprocessing that cannot be inverted
            rec = {"id": row["id"], "file": row["image"], "message": _message(err)}
            write_json({**rec, "config_hash": config_hash}, error_json)
            return "error", rec
        # the item JSON last: its presence marks the item (and its map) done
        write_json({"id": row["id"], "status": "ok", "config_hash": config_hash, "result": row}, item_json)
        error_json.unlink(missing_ok=True)
        return "ok", row


def _add_verdicts(rows: list[dict], verifier: Any, threshold: float) -> None:
    """Add ``p_suitable`` and ``verdict`` to every row with one forest call: a single-row ``predict_proba`` of a
    200-tree forest costs about as much as the whole forward pass and CAM of a 32^3 volume, a batched one does not."""
    if not rows:
        return
    import pandas as pd

    cols = [str(c) for c in verifier.feature_names_in_]
    proba = verifier.predict_proba(pd.DataFrame([{c: r[c] for c in cols} for r in rows]))[:, 1]
    for row, p in zip(rows, proba):
        row["p_suitable"] = float(p)
        row["verdict"] = "suitable" if p >= threshold else "not suitable"


def _message(err: BaseException) -> str:
    """One line naming the cause: MONAI's ``applying transform ...`` wrappers are unwrapped, addresses dropped."""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    text = _ADDRESS.sub("", " ".join(str(err).split()))
    text = text if len(text) <= 500 else text[:497] + "..."
    return text if isinstance(err, DataError) else f"{type(err).__name__}: {text}"


# --------------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------------


def _summary(rows: list[dict], errors: list[dict], n_items: int, config_hash: str) -> dict:
    from collections import Counter

    energies = np.array([r["energy"] for r in rows], dtype=np.float64)
    summary: dict[str, Any] = {
        "n_items": n_items,
        "n_succeeded": len(rows),
        "n_failed": len(errors),
        "config_hash": config_hash,
        "predictions": dict(sorted(Counter(r["prediction_name"] for r in rows).items())),
        "energy": {
            "mean": float(energies.mean()),
            "std": float(energies.std()),
            "min": float(energies.min()),
            "median": float(np.median(energies)),
            "max": float(energies.max()),
        }
        if len(rows)
        else None,
        "failed_ids": [e["id"] for e in errors],
    }
    if rows and "p_suitable" in rows[0]:
        summary["verdicts"] = dict(sorted(Counter(r["verdict"] for r in rows).items()))
        summary["mean_p_suitable"] = float(np.mean([r["p_suitable"] for r in rows]))
    return summary


def _write_tables(out: Path, rows: list[dict], errors: list[dict], n_items: int, config_hash: str) -> dict:
    import pandas as pd

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    write_csv(pd.DataFrame(rows, columns=columns or ["id", "image", "prediction", "energy"]), out / "results.csv")
    write_csv(pd.DataFrame(errors, columns=_ERROR_COLUMNS), out / "errors.csv")
    summary = _summary(rows, errors, n_items, config_hash)
    write_json(summary, out / "summary.json")
    return summary


# --------------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------------


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
    method: str = "gradcam",
    preprocessing: Callable[[dict], dict] | None = None,
    a_min: float | None = None,
    a_max: float | None = None,
    spatial_dims: int | None = 3,
    class_names: Sequence[str] | None = None,
    reference: str | os.PathLike | None = None,
    verifier: str | os.PathLike | None = None,
    threshold: float = 0.5,
    metrics: Sequence[str] | None = None,
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

    Per item: preprocessing (the bundle's inference ``preprocessing``, else load + channel first + checks +
    optional intensity window), one forward pass giving the prediction, the class probabilities and the Grad-CAM of
    the predicted class (``cam.explain``), the attribution energy (sum of the raw map), the normalised map as
    NIfTI on the input's grid (the preprocessing is inverted as ``CAMWriter`` does), and with ``reference`` the
    similarity features against the reference map, with ``verifier`` P(suitable) and a verdict (computed for all
    items of a process in one batched forest call after its item loop, so it is in ``results.csv``, not in
    ``items/<id>.json``).

    Files in ``out``: ``run.json`` (configuration), ``items/<id>.json`` (one result each, written atomically),
    ``maps/<id>_cam.nii.gz``, ``errors/<id>.json`` (failed items, retried on resume), and at the end
    ``results.csv`` (one row per succeeded item, sorted by id), ``errors.csv`` (id, file, message) and
    ``summary.json``.

    Args:
        data: datalist JSON, image directory, glob, file, or list of paths / entry dicts (see :func:`cohort_items`).
        out: output directory. Rerunning with the same arguments resumes: valid item results are kept.
        bundle_root: MONAI bundle (network, weights, ``preprocessing``, ``cam_layer``, class names).
        overrides: bundle config overrides (dict or JSON), e.g. ``{"network_name": "small_cnn"}``.
        network: instead of a bundle, a ``torch.nn.Module`` or a network name (``monai.networks.nets`` name or
            dotted path) built with ``network_args``.
        network_args: keyword arguments of a named network (dict or JSON).
        checkpoint: weights file (``torch.load(weights_only=True)``); bundle default ``models/model.pt``.
        layer: CAM target layer (default: the bundle's declared layer).
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        preprocessing: dict transform ``{"image": path, ...} -> {"image": (C, *spatial) tensor}`` replacing the
            default one (must be invertible for ``invert``).
        a_min: with ``a_max``, intensity window of the default preprocessing, mapped to [0, 1].
        a_max: see ``a_min``.
        spatial_dims: spatial axes every image must have in the default preprocessing (``None``: not checked).
        class_names: output names (default: the bundle's, else the class indices).
        reference: reference map (``ReferenceMap.save`` NIfTI or its directory) for the similarity features.
        verifier: fitted :class:`~monai_gamverify.verification.verifier.SuitabilityVerifier` (``.skops``); needs
            ``reference``.
        threshold: P(suitable) at or above which the verdict is ``"suitable"``.
        metrics: similarity features (default ``similarity.DEFAULT_METRICS`` plus any the verifier uses).
        split: datalist list to run on.
        invert: write maps on the input's original grid (inverting the preprocessing); ``False``: on the
            preprocessed grid, with its affine.
        save_maps: write the NIfTI maps.
        device: ``cpu``/``cuda``; under ``torchrun`` with CUDA each process uses ``cuda:LOCAL_RANK``.
        overwrite: start again in an ``out`` written with another configuration (its results are deleted).
        progress: progress bar (rank 0 only).
        background_writes: compute the similarity features and write the maps and item JSONs of each batch in a
            writer thread, overlapping the next batch's forward passes on a second core (``False``: in the loop).
        feature_batch: with ``reference``, the similarity features of this many items are computed in one batched
            call (the same values as one call per item, at about half the cost per item); their maps and item
            JSONs are written after it, so an interrupted run recomputes at most this many items more.

    Returns:
        The summary (``n_items``, ``n_succeeded``, ``n_failed``, ``predictions``, ``energy``, ``failed_ids``, and
        ``verdicts``/``mean_p_suitable`` with a verifier) plus ``out_dir``, ``files``, ``computed`` and ``skipped``
        (items computed in this call / already done), ``rank``, ``world_size`` and ``seconds`` (wall time of this
        process: ``setup`` before the first item, ``items`` for its item loop, ``total``; ``items_cpu``: CPU seconds of
        the process, all its threads, in the item loop).

    Raises:
        DataError: the datalist/folder cannot be read or ids clash (nothing is run).
        ValueError: ``out`` holds a run with another configuration (and not ``overwrite``), or bad arguments.
        CohortInterrupted: Ctrl-C / SIGTERM; finished items are kept, the same call resumes.

    Example:
        >>> run_cohort("data/sos/images", "out", network="monai_gamverify.networks.nets.SmallCNN",
        ...            network_args={"spatial_dims": 3, "out_channels": 5}, checkpoint="model.pt", layer="res4",
        ...            a_min=-1000, a_max=2000)["n_succeeded"]
        24
    """
    from tqdm.auto import tqdm

    from monai_gamverify.bundle import load_bundle, load_checkpoint
    from monai_gamverify.metrics.similarity import ALL_METRICS, DEFAULT_METRICS

    if (bundle_root is None) == (network is None):
        raise ValueError("give exactly one of bundle_root (a MONAI bundle) or network (a module or network name)")
    if verifier is not None and reference is None:
        raise ValueError("a verifier needs the reference map it was trained against: pass reference=")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    started = time.perf_counter()
    items = cohort_items(data, split=split)
    out = Path(out)
    rank, world, dev, initialised = _dist_setup(device)
    try:
        # ------------------------------------------------------------------ model and preprocessing
        config: dict[str, Any] = {"method": method, "spatial_dims": spatial_dims, "a_min": a_min, "a_max": a_max}
        if bundle_root is not None:
            extra = _json_arg(overrides, "overrides")
            bm = load_bundle(bundle_root, checkpoint=checkpoint, device=dev, overrides=extra)
            net, layer = bm.network, layer or bm.target_layer
            class_names = list(class_names) if class_names is not None else bm.class_names
            pre = preprocessing or bm.preprocessing()
            config.update(bundle_root=str(Path(bundle_root).resolve()), overrides=extra)
        else:
            if isinstance(network, str):
                from monai_gamverify.bundle import network_from_name

                args = _json_arg(network_args, "network_args")
                net = network_from_name(network, args)
                config.update(network=network, network_args=args)
            elif isinstance(network, nn.Module):
                net = network
                config.update(network=type(network).__name__)
            else:
                raise TypeError(f"network must be a torch.nn.Module or a network name, got {type(network).__name__}")
            if checkpoint is not None:
                load_checkpoint(net, checkpoint)
            elif rank == 0:
                print("warning: no checkpoint given; the network keeps its initial weights", file=sys.stderr)
            net = net.to(dev).eval()
            pre = preprocessing
        if pre is None:
            pre = _simple_preprocessing(spatial_dims, a_min, a_max)
        if not layer:
            raise ValueError("no CAM target layer: pass layer= (names as in model.named_modules())")
        ref_value = ver = None
        if reference is not None:  # sklearn and pandas are imported only when verifying
            from monai_gamverify.verification.verifier import ReferenceMap, SuitabilityVerifier

            ref_value = ReferenceMap.load(reference).value
            ver = SuitabilityVerifier.load(verifier) if verifier is not None else None
        names = list(metrics) if metrics is not None else list(DEFAULT_METRICS)
        if ver is not None:
            used = [str(c) for c in ver.feature_names_in_]
            unknown = [c for c in used if c not in ALL_METRICS]
            if unknown:
                raise ValueError(f"verifier {verifier} uses feature(s) {unknown} that are not similarity metrics")
            names += [c for c in used if c not in names]
        config.update(
            layer=layer,
            class_names=list(class_names or []),
            weights_sha256=_weights_sha256(net),
            custom_preprocessing=None if preprocessing is None else type(preprocessing).__name__,
            reference_sha256=_file_sha256(_reference_file(reference)) if reference is not None else None,
            verifier_sha256=_file_sha256(verifier),
            threshold=float(threshold),
            metrics=names if reference is not None else None,
            invert=bool(invert),
            save_maps=bool(save_maps),
            data=str(Path(data).resolve()) if isinstance(data, (str, os.PathLike)) else "list",
            split=split,
            items=hashlib.sha256(json.dumps([[i["id"], i.get("image")] for i in items]).encode()).hexdigest()[:16],
            n_items=len(items),
        )
        config_hash = _config_hash(config)
        import monai

        from monai_gamverify import __version__

        run_info = {
            "format": RUN_FORMAT,
            "format_version": _RUN_VERSION,
            "config_hash": config_hash,
            "config": config,
            "versions": {"monai_gamverify": __version__, "monai": monai.__version__, "torch": torch.__version__},
        }
        _prepare_out(out, run_info, overwrite, rank, world)

        # ------------------------------------------------------------------ this rank's items
        runner = _ItemRunner(net, layer, method, pre, dev, class_names, out, ref_value, names, invert, save_maps)
        mine = [items[i] for i in _shard(len(items), rank, world)]
        rows: list[dict] = []
        errors: list[dict] = []
        computed = skipped = 0
        loop_started = time.perf_counter()
        loop_cpu = time.process_time()
        bar = tqdm(mine, desc=f"cohort ({world} process{'es' if world > 1 else ''})", disable=not progress or rank)
        pool = ThreadPoolExecutor(1, thread_name_prefix="cohort-writer") if background_writes else None
        queue: deque[Future] = deque()
        waiting: list[tuple[dict, tuple[torch.Tensor, Any]]] = []  # computed items whose features are not done
        batch = max(1, int(feature_batch)) if ref_value is not None else 1

        def settle(outcomes: list[tuple[str, dict]]) -> None:
            for kind, rec in outcomes:
                (rows if kind == "ok" else errors).append(rec)

        def finish_batch(group: list[tuple[dict, tuple[torch.Tensor, Any]]]) -> list[tuple[str, dict]]:
            """Features of a batch of items in one call, then their maps and item JSONs."""
            failures = runner.features(group)
            return [runner.finish(row, pending, config_hash, f) for (row, pending), f in zip(group, failures)]

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
                done = _valid_result(out / "items" / f"{item['id']}.json", item["id"], config_hash, out)
                if done is not None:
                    rows.append(done)
                    skipped += 1
                    continue
                computed += 1
                try:
                    waiting.append(runner.compute(item))
                except Exception as err:  # skip and report: one bad item never stops the cohort
                    rec = {"id": item["id"], "file": item.get("image", ""), "message": _message(err)}
                    write_json({**rec, "config_hash": config_hash}, out / "errors" / f"{item['id']}.json")
                    errors.append(rec)
                    continue
                if len(waiting) >= batch:
                    flush()
            flush()
            while queue:
                settle(queue.popleft().result())
        except KeyboardInterrupt as err:
            bar.close()
            if pool is not None:  # writes in progress complete (atomically); queued ones are dropped
                pool.shutdown(wait=True, cancel_futures=True)
            saved = len(list((out / "items").glob("*.json")))
            print(
                f"\ninterrupted (rank {rank}): {saved} item results are saved in {out / 'items'}; run the same "
                "command again to resume (finished items are skipped)",
                file=sys.stderr,
                flush=True,
            )
            raise CohortInterrupted(str(out)) from err
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        bar.close()
        if ver is not None:  # verdicts of this process's rows in one batched call (not stored in items/)
            _add_verdicts(rows, ver, float(threshold))
        loop_seconds = time.perf_counter() - loop_started
        loop_cpu = time.process_time() - loop_cpu

        # ------------------------------------------------------------------ gather on rank 0
        parts = _gather({"rows": rows, "errors": errors, "computed": computed, "skipped": skipped}, world)
        all_rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["id"])
        all_errors = sorted((e for p in parts for e in p["errors"]), key=lambda e: e["id"])
        files = {k: str(out / k) for k in ("results.csv", "errors.csv", "summary.json", "run.json")}
        if rank == 0:
            summary = _write_tables(out, all_rows, all_errors, len(items), config_hash)
            print(
                f"cohort: {summary['n_succeeded']} succeeded, {summary['n_failed']} failed (of {len(items)}); "
                f"results -> {files['results.csv']}" + (f", errors -> {files['errors.csv']}" if all_errors else ""),
                flush=True,
            )
        else:
            summary = _summary(all_rows, all_errors, len(items), config_hash)
        _barrier(world)  # the tables exist when any rank returns
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


def _reference_file(reference: str | os.PathLike) -> Path:
    """The NIfTI file ``ReferenceMap.load(reference)`` reads (a directory means its ``reference_map.nii.gz``)."""
    p = Path(reference)
    return p / "reference_map.nii.gz" if p.is_dir() else p


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m monai_gamverify.apps.cohort",
        description="Explain/verify every image of a cohort; resumable (rerun the same command), skips and reports "
        "bad items, and splits the items between processes under torchrun.",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--datalist", help="datalist JSON (decathlon style)")
    src.add_argument("--images", help="image directory, glob pattern or file")
    ap.add_argument("--out", default="cohort_out", help="output directory (default: cohort_out)")
    ap.add_argument("--split", default="test", help="datalist list to run on (default: test)")
    ap.add_argument("--bundle_root", help="MONAI bundle directory")
    ap.add_argument("--overrides", help='bundle config overrides as JSON, e.g. \'{"network_name": "small_cnn"}\'')
    ap.add_argument("--network", help="network name (monai.networks.nets) or dotted class path, instead of a bundle")
    ap.add_argument("--network_args", help="network keyword arguments as JSON")
    ap.add_argument("--checkpoint", help="weights file (torch.load weights_only=True)")
    ap.add_argument("--layer", help="CAM target layer (default: the bundle's cam_layer)")
    ap.add_argument("--method", default="gradcam", choices=["gradcam", "gradcampp", "scorecam"])
    ap.add_argument("--a_min", type=float, help="intensity window lower bound (network mode)")
    ap.add_argument("--a_max", type=float, help="intensity window upper bound (network mode)")
    ap.add_argument("--spatial_dims", type=int, default=3, help="spatial axes expected (network mode, default 3)")
    ap.add_argument("--reference", help="reference map NIfTI (or its directory) for the similarity features")
    ap.add_argument("--verifier", help="fitted SuitabilityVerifier (.skops)")
    ap.add_argument("--threshold", type=float, default=0.5, help="P(suitable) threshold of the verdict")
    ap.add_argument("--no_invert", action="store_true", help="write maps on the preprocessed grid")
    ap.add_argument("--no_maps", action="store_true", help="do not write the NIfTI maps")
    ap.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    ap.add_argument("--overwrite", action="store_true", help="start again in a directory of another run")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m monai_gamverify.apps.cohort --bundle_root B --datalist D --out O`` (``--help``).

    Returns 0 when every item succeeded, 1 when some failed, 2 on a bad configuration, 130 when interrupted
    (finished items kept; rerun the same command to resume).

    Example:
        $ torchrun --nproc_per_node=2 -m monai_gamverify.apps.cohort --images data/sos/images --out o \\
              --network monai_gamverify.networks.nets.SmallCNN --network_args '{"out_channels": 5}' --layer res4
    """
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def _terminate(signum: int, frame: Any) -> None:  # torchrun and schedulers stop workers with SIGTERM
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_cohort(
            args.datalist or args.images,
            args.out,
            bundle_root=args.bundle_root,
            overrides=args.overrides,
            network=args.network,
            network_args=args.network_args,
            checkpoint=args.checkpoint,
            layer=args.layer,
            method=args.method,
            a_min=args.a_min,
            a_max=args.a_max,
            spatial_dims=args.spatial_dims,
            reference=args.reference,
            verifier=args.verifier,
            threshold=args.threshold,
            split=args.split,
            invert=not args.no_invert,
            save_maps=not args.no_maps,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except CohortInterrupted:
        return 130  # run_cohort said what is saved and how to resume
    except KeyboardInterrupt:
        print("cohort run interrupted before any item; rerun the same command", file=sys.stderr, flush=True)
        return 130
    except (DataError, ValueError, FileNotFoundError, TypeError) as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if result["n_failed"] == 0 else 1


def _exit(code: int) -> None:
    """Exit with ``code``; a worker of a multi-process run skips the interpreter's teardown (after flushing), where
    gloo's C++ threads can abort an already finished process ("terminate called without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
