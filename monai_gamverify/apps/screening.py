"""Workflows of ``gamverify screen``: fit a screen for a bundle and screen image files, both driving the single-image
engine (:meth:`~monai_gamverify.apps.pipeline.ImagePipeline.observe`: the one read, preprocessing and forward pass)
while the :class:`~monai_gamverify.screening.Screen` does the statistics.

Example:
    >>> screen = fit_screen("bundles/sos_staging", "data/sos", "screen_sos", {"network_name": "small_cnn"},
    ...                     calibration_dirs=["data/sos_more"])
    >>> table = run_screen("screen_sos", ["a.nii.gz", "dicom_dir/"], "screen_out")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_gamverify.apps.pipeline import ImagePipeline, PreprocessingError, error_message, is_out_of_memory
from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.io import write_csv, write_json
from monai_gamverify.screening.dataset import dataset_test
from monai_gamverify.screening.screen import Screen

__all__ = ["fit_screen", "load_screen_bundle", "run_screen", "screen_engine", "screen_record"]

logger = logging.getLogger(__name__)


def _splits(value: str | Sequence[str] | None) -> list[str]:
    """Datalist list names: one name (a string is ONE split, never its characters), a comma-separated string, or a
    sequence of names."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _class_labels(items: Sequence[dict], seg: bool) -> list[int] | None:
    """Class indices of a classification datalist for the class-conditional detectors; ``None`` (the model's own
    predictions, or one class for a regressor) when the labels are not class indices (a segmentation's label
    files, a regression bundle's score lists)."""
    if seg or not items or not all("label" in e for e in items):
        return None
    out = []
    for e in items:
        lab = e["label"]
        if isinstance(lab, bool) or not isinstance(lab, (int, np.integer, float)) or float(lab) != int(lab):
            return None
        out.append(int(lab))
    return out


def screen_engine(bundle: Any, screen: Screen, device: str | torch.device | None = None) -> ImagePipeline:
    """The engine that observes images for ``screen``: the bundle's network, preprocessing, slice axis, and the
    screen's CAM layer and method (a screen fitted with other settings is refused at the first observation)."""
    layer = screen.cam_layer or getattr(bundle, "target_layer", None)
    method = screen.cam_method if screen.cam_layer is not None else None
    if not layer:
        raise ValueError(f"bundle {bundle.root} declares no CAM layer (cam_layer): the engine needs one")
    return ImagePipeline.from_bundle(bundle, target_layers=layer, method=method, device=device, screen=screen,
                                     invert=False)  # fmt: skip


def screen_record(engine: ImagePipeline, screen: Screen, item: Any) -> Any:
    """What ``screen`` takes of the engine's observation of one image (:meth:`Screen.record`): the network runs only
    when a detector needs it, the map only for the attention detector. An image that is read but that the model
    cannot take (its preprocessing or geometry check fails: NaN voxels, a single slice into a 3D network) gets a
    record whose hard failure rejects it.

    Raises:
        FileNotFoundError: the file does not exist.
        PreprocessingError: it cannot be read at all.
    """
    forward, cam = screen.needs_network, "attention" in screen.detectors
    try:
        return screen.record(engine.observe(item, cam=cam, forward=forward))
    except PreprocessingError as err:
        if err.raw_image is None:  # not readable: an error, not a judgement
            raise
        return screen.record_failure(err.raw_image, f"the bundle's preprocessing fails on this image: {err.cause}",
                                     name=str(item))  # fmt: skip


def fit_screen(
    bundle_root: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    overrides: dict | str | None = None,
    alpha: float = 0.05,
    *,
    config: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    fit_splits: str | Sequence[str] = ("training",),
    calibration_splits: str | Sequence[str] | None = None,
    calibration_dirs: Sequence[str | os.PathLike] = (),
    calibration_fraction: float = 0.35,
    combine: str = "fisher",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Screen:
    """Fit a screen for a bundle's model and save it to ``out`` (``gamverify screen fit``).

    The detectors are fitted on ``fit_splits`` of the dataset (the model's training data); the conformal
    calibration uses images the model was **not** trained on: ``calibration_splits`` of the same datalist plus every
    item of the datalists in ``calibration_dirs`` (more in-distribution images of the same source; at least
    ``1/alpha - 1`` are needed to reject anything, a few hundred for a false-rejection rate close to alpha on every
    draw; fewer are refused). With no calibration split and no calibration dir, a seeded ``calibration_fraction`` of
    the fit images is held out (valid only if the model never saw them). Items labelled with a K+1 model's garbage
    class are left out.

    Every image is observed by the engine (:meth:`ImagePipeline.observe`, the same read, preprocessing and forward
    pass as ``gamverify cam`` and the cohort); the saved screen records those observation settings. A segmentation
    bundle gets a segmentation screen (its ``label`` entries, label maps, are not read); a 2D bundle applied slice by
    slice (e.g. ``cbct_quality``) a screen of its volumes, features averaged over the slices, one class (its labels
    are scores).

    Args:
        bundle_root: the MONAI bundle.
        dataset_dir: the dataset (``datalist.json`` inside unless ``datalist`` is given).
        out: directory for ``screen.json`` / ``screen.npz``.
        overrides: bundle config overrides (dict or JSON string), e.g. ``{"network_name": "small_cnn"}``.
        alpha: rejection level.
        config: the bundle config defining ``network_def`` and ``preprocessing``.
        checkpoint: weights (default: the bundle's ``models/model.pt``).
        datalist: the datalist JSON (default ``dataset_dir/datalist.json``).
        fit_splits: datalist lists the detectors are fitted on (a name, comma-separated names or a list).
        calibration_splits: datalist lists used for calibration (held out from training), as ``fit_splits``
            (default: ``validation`` when the datalist has it).
        calibration_dirs: more datasets (each with a ``datalist.json``) used for calibration, all their lists.
        calibration_fraction: held-out share of the fit images when no calibration data is given.
        combine: ``fisher`` (default), ``maxz`` or ``bonferroni`` (see :class:`Screen`).
        seed: split seed.
        device: torch device.

    Returns:
        The fitted :class:`Screen`.

    Raises:
        ValueError: no fit items, an unknown split, a failing image, or too few calibration images for ``alpha``.

    Example:
        >>> fit_screen("bundles/sos_staging", "data/sos", "screen_sos", {"network_name": "small_cnn"},
        ...            calibration_dirs=["data/sos_more"])
    """
    ov = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    ds = Path(dataset_dir)
    bm = load_bundle(bundle_root, config=config, checkpoint=checkpoint, device=device, overrides=ov)
    screen = Screen.from_bundle(bm, config=config, overrides=ov, checkpoint=checkpoint, alpha=alpha, combine=combine)
    dl = Path(datalist) if datalist is not None else ds / "datalist.json"
    available = set(json.loads(dl.read_text())) if dl.is_file() else set()
    fit_names = _splits(fit_splits)
    cal_names = _splits(calibration_splits) if calibration_splits is not None else sorted({"validation"} & available)
    unknown = [n for n in fit_names + cal_names if available and n not in available]
    if unknown:
        raise ValueError(f"{dl} has no list(s) {unknown}; its lists are {sorted(available)}")

    def items_of(path: Path, splits: Sequence[str], root: Path) -> list[dict]:
        got: list[dict] = []
        for split in splits:
            got += load_datalist(path, split, dataset_dir=root, spatial_dims=None, num_channels=None,
                                 require_label=False, check="exists", allow_empty=True)  # fmt: skip
        if screen.garbage_index is not None:
            got = [e for e in got if not _is_class(e.get("label"), screen.garbage_index)]
        return got

    fit_items = items_of(dl, fit_names, ds)
    cal_items = items_of(dl, cal_names, ds) if cal_names else []
    for extra in calibration_dirs:
        cal_items += items_of(Path(extra) / "datalist.json", ("training", "validation", "test"), Path(extra))
    if not fit_items:
        raise ValueError(f"no in-distribution items in {dl} ({', '.join(fit_names)})")
    if not cal_items:
        logger.warning(
            "screen fit: no calibration split or dataset; holding out %.0f %% of the fit images, valid only if the "
            "model was not trained on them",
            100 * calibration_fraction,
        )
    seg = screen.task == "segmentation"
    labels = _class_labels(fit_items, seg)
    if labels is None and not seg and bm.slice_axis(3) is not None:  # a slice-wise regressor: one class
        labels = [0] * len(fit_items)
    engine = screen_engine(bm, screen, device)
    if screen.window is None:  # one histogram range for every image: from the fit images as read
        screen.set_histogram_range(engine.load(e["image"])[0] for e in fit_items)

    def observe(items: list[dict]) -> list[Any]:
        out = []
        for e in items:
            try:
                out.append(screen_record(engine, screen, e["image"]))  # a hard failure is left out by the fit
            except PreprocessingError as err:
                raise ValueError(f"screen fit: cannot read {e['image']}: {err.cause}") from err
        return out

    names = [e["image"] for e in fit_items + cal_items]
    fit_obs = observe(fit_items)
    cal_obs = observe(cal_items) if cal_items else None
    screen.fit(fit_obs, labels, calibration=cal_obs, calibration_fraction=calibration_fraction, seed=seed,
               names=names, settings=engine.observation_settings())  # fmt: skip
    screen.save(out)
    return screen


def _is_class(label: Any, index: int) -> bool:
    try:
        return int(label) == index
    except (TypeError, ValueError):
        return False


def load_screen_bundle(screen: Screen, device: str | torch.device | None = None) -> Any:
    """The bundle model a screen was fitted for (root, config, overrides and checkpoint recorded at fit time).

    Example:
        >>> bm = load_screen_bundle(Screen.load("screen_sos"))
    """
    info = screen.bundle
    if not info.get("root"):
        raise ValueError("the screen does not record its bundle; pass bundle= to run_screen")
    return load_bundle(info["root"], config=info.get("config"), checkpoint=info.get("checkpoint"), device=device,
                       overrides=info.get("overrides") or {})  # fmt: skip


def run_screen(
    screen: Screen | str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    bundle: Any = None,
    device: str | torch.device | None = None,
    on_error: str = "record",
) -> Any:
    """Screen image files and write ``OUT/screen.csv`` (``gamverify screen run``).

    Columns: ``image, in_distribution, p_value, reasons`` (``; ``-joined), ``notes``, ``statistic``, then
    ``score_<detector>`` and ``p_<detector>`` of every active detector, and ``error``. An image that cannot be read
    (missing, not an image) or whose observation fails otherwise is an **error**, not a rejection: its row has an
    empty ``in_distribution`` and the ``error``, and it is left out of the dataset test. An image that is read but
    that the model cannot take (a single slice for a 3D network, NaN voxels, a constant volume) is rejected with
    ``p_value = 0`` and its reason. Every row that succeeded is written, whatever fails after it.

    Args:
        screen: a :class:`Screen` or the directory it was saved to.
        images: files (NIfTI, NRRD, MHA, one DICOM file) or DICOM series directories.
        out: output directory.
        bundle: the :class:`monai_gamverify.bundle.BundleModel` (default: reloaded from what the screen records).
        device: torch device for the reloaded bundle.
        on_error: ``"record"``: an error gets a row and the run goes on; ``"raise"``: the first error is raised.

    Returns:
        The table as a pandas DataFrame (also ``OUT/screen.csv``); ``df.attrs["dataset"]`` (also
        ``OUT/screen_summary.json``) judges the screened images as one dataset
        (:func:`~monai_gamverify.screening.dataset_test`: ``n``, ``n_rejected``, ``expected_rate``, ``p_value``,
        ``like_training_data``), plus ``errors`` (image and message of each error).

    Example:
        >>> run_screen("screen_sos", ["a.nii.gz", "dicom_dir/"], "screen_out")
    """
    import pandas as pd

    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    scr = screen if isinstance(screen, Screen) else Screen.load(screen)
    bm = bundle if bundle is not None else load_screen_bundle(scr, device)
    engine = screen_engine(bm, scr, device)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []

    def error_row(path: Any, err: BaseException) -> None:
        if on_error == "raise":
            raise err
        message = str(err) if isinstance(err, (FileNotFoundError, PreprocessingError)) else error_message(err)
        logger.warning("screen run: %s: %s", path, message)
        errors.append({"image": str(path), "error": message})
        rows.append({"image": str(path), "in_distribution": None, "p_value": float("nan"), "reasons": "",
                     "error": message})  # fmt: skip

    for path in images:
        try:
            res = scr.score_observations([screen_record(engine, scr, path)])[0]
        except Exception as err:  # noqa: BLE001 - one bad image never loses the others' rows
            if is_out_of_memory(err):
                raise
            error_row(path, err)
            continue
        rows.append({"image": str(path), **res, "reasons": "; ".join(res["reasons"]), "notes": "; ".join(res["notes"]),
                     "error": ""})  # fmt: skip
    df = pd.DataFrame(rows, columns=None if rows else ["image", "in_distribution", "p_value", "reasons", "error"])
    lead = ["image", "in_distribution", "p_value", "reasons"]
    df = df[lead + [c for c in df.columns if c not in lead]]
    write_csv(df, Path(out) / "screen.csv")
    # the screened images as one dataset (errors left out): more rejections than an in-distribution dataset shows?
    judged = [bool(v) for v, e in zip(df["in_distribution"], df["error"]) if not e]
    if judged:
        summary: dict[str, Any] = dataset_test(judged, n_cal=int(scr.n_cal_), alpha=scr.alpha)
    else:
        summary = {"n": 0, "n_rejected": 0, "expected_rate": None, "p_value": None, "like_training_data": None}
    summary["errors"] = errors
    df.attrs["dataset"] = summary
    write_json({**summary, "screen": str(screen) if not isinstance(screen, Screen) else None},
               Path(out) / "screen_summary.json")  # fmt: skip
    return df
