"""Workflows of ``gamverify screen``: fit a screen for a bundle, reload its bundle, screen image files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.io import write_csv, write_json
from monai_gamverify.screening.dataset import dataset_test
from monai_gamverify.screening.reading import ImageReadError, preprocessing_after_loading, read_image
from monai_gamverify.screening.screen import Screen
from monai_gamverify.visualize.registry import make_cam

__all__ = ["fit_screen", "load_screen_bundle", "run_screen"]

logger = logging.getLogger(__name__)


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
    fit_splits: Sequence[str] = ("training",),
    calibration_splits: Sequence[str] = ("validation",),
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
    draw). With no calibration split and no calibration dir, a seeded ``calibration_fraction`` of the fit images is
    held out (valid only if the model never saw them). Items labelled with a K+1 model's garbage class are left out.

    A segmentation bundle gets a segmentation screen (:meth:`Screen.from_bundle`): the items' ``label`` entries (label
    maps) are not read, and the network, when an early-layer detector needs it, runs through the bundle's inferer.

    Args:
        bundle_root: the MONAI bundle.
        dataset_dir: the dataset (``datalist.json`` inside unless ``datalist`` is given).
        out: directory for ``screen.json`` / ``screen.npz``.
        overrides: bundle config overrides (dict or JSON string), e.g. ``{"network_name": "small_cnn"}``.
        alpha: rejection level.
        config: the bundle config defining ``network_def`` and ``preprocessing`` (default: ``inference.json``,
            ``.yaml`` or ``.yml``, the first that exists).
        checkpoint: weights (default: the bundle's ``models/model.pt``).
        datalist: the datalist JSON (default ``dataset_dir/datalist.json``).
        fit_splits: datalist lists the detectors are fitted on.
        calibration_splits: datalist lists used for calibration (held out from training).
        calibration_dirs: more datasets (each with a ``datalist.json``) used for calibration, all their lists.
        calibration_fraction: held-out share of the fit images when no calibration data is given.
        combine: ``fisher`` (default), ``maxz`` or ``bonferroni`` (see :class:`Screen`).
        seed: split seed.
        device: torch device.

    Returns:
        The fitted :class:`Screen`.

    Example:
        >>> fit_screen("bundles/sos_staging", "data/sos", "screen_sos", {"network_name": "small_cnn"},
        ...            calibration_dirs=["data/sos_more"])
    """

    ov = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    ds = Path(dataset_dir)
    bm = load_bundle(bundle_root, config=config, checkpoint=checkpoint, device=device, overrides=ov)
    screen = Screen.from_bundle(bm, config=config, overrides=ov, checkpoint=checkpoint, alpha=alpha, combine=combine)
    dl = Path(datalist) if datalist is not None else ds / "datalist.json"

    def items_of(path: Path, splits: Sequence[str], root: Path) -> list[dict]:
        got: list[dict] = []
        for split in splits:
            got += load_datalist(
                path,
                split,
                dataset_dir=root,
                spatial_dims=None,
                num_channels=None,
                require_label=False,
                check="exists",
                allow_empty=True,
            )
        if screen.garbage_index is not None:
            got = [e for e in got if int(e.get("label", -1)) != screen.garbage_index]
        return got

    fit_items = items_of(dl, fit_splits, ds)
    cal_items = items_of(dl, calibration_splits, ds) if calibration_splits else []
    for extra in calibration_dirs:
        cal_items += items_of(Path(extra) / "datalist.json", ("training", "validation", "test"), Path(extra))
    if not fit_items:
        raise ValueError(f"no in-distribution items in {dl} ({', '.join(fit_splits)})")
    if not cal_items:
        logger.warning(
            "screen fit: no calibration split or dataset; holding out %.0f %% of the fit images, valid only if the "
            "model was not trained on them",
            100 * calibration_fraction,
        )
    seg = screen.task == "segmentation"
    # class-conditional detectors: a classification datalist's class indices (a segmentation's labels are files)
    labels = [int(e["label"]) for e in fit_items] if not seg and all("label" in e for e in fit_items) else None
    screen.fit(
        bm.network,
        [e["image"] for e in fit_items],
        labels,
        preprocess=preprocessing_after_loading(bm),
        calibration=[e["image"] for e in cal_items] or None,
        calibration_fraction=calibration_fraction,
        seed=seed,
        inferer=bm.inferer() if seg else None,
    )
    screen.save(out)
    return screen


def load_screen_bundle(screen: Screen, device: str | torch.device | None = None) -> Any:
    """The bundle model a screen was fitted for (root, config, overrides and checkpoint recorded at fit time).

    Example:
        >>> bm = load_screen_bundle(Screen.load("screen_sos"))
    """

    info = screen.bundle
    if not info.get("root"):
        raise ValueError("the screen does not record its bundle; pass bundle= to run_screen")
    return load_bundle(
        info["root"],
        config=info.get("config"),
        checkpoint=info.get("checkpoint"),
        device=device,
        overrides=info.get("overrides") or {},
    )


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
    ``score_<detector>`` and ``p_<detector>`` of every active detector, and ``error`` (empty when read).

    Args:
        screen: a :class:`Screen` or the directory it was saved to.
        images: files (NIfTI, NRRD, MHA, one DICOM file) or DICOM series directories.
        out: output directory.
        bundle: the :class:`monai_gamverify.bundle.BundleModel` (default: reloaded from what the screen records).
        device: torch device for the reloaded bundle.
        on_error: ``"record"``: an unreadable image gets a row (not in distribution, the error as reason) and the
            run goes on; ``"raise"``: raise :class:`ImageReadError` / ``FileNotFoundError`` naming it.

    Returns:
        The table as a pandas DataFrame (also ``OUT/screen.csv``); ``df.attrs["dataset"]`` (also
        ``OUT/screen_summary.json``) judges the images as one dataset (:func:`~monai_gamverify.screening.dataset_test`:
        ``n_rejected``, ``expected_rate``, ``p_value``, ``like_training_data``).

    Example:
        >>> run_screen("screen_sos", ["a.nii.gz", "dicom_dir/"], "screen_out")
    """
    import pandas as pd

    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    scr = screen if isinstance(screen, Screen) else Screen.load(screen)
    bm = bundle if bundle is not None else load_screen_bundle(scr, device)
    pre = preprocessing_after_loading(bm)
    cam = make_cam(bm.network, scr.cam_layer, scr.cam_method) if scr.cam_layer is not None else None
    inferer = bm.inferer() if scr.task == "segmentation" else None
    rows = []
    for path in images:
        try:
            obs = scr.observe_image(bm.network, read_image(path), pre, cam, inferer)
        except (FileNotFoundError, ImageReadError) as err:
            if on_error == "raise":
                raise
            logger.warning("%s", err)
            rows.append(
                {
                    "image": str(path),
                    "in_distribution": False,
                    "p_value": float("nan"),
                    "reasons": str(err),
                    "error": str(err),
                }
            )
            continue
        res = scr.score_observations([obs])[0]
        rows.append(
            {
                "image": str(path),
                **res,
                "reasons": "; ".join(res["reasons"]),
                "notes": "; ".join(res["notes"]),
                "error": "",
            }
        )
    df = pd.DataFrame(rows)
    lead = ["image", "in_distribution", "p_value", "reasons"]
    df = df[lead + [c for c in df.columns if c not in lead]]
    write_csv(df, Path(out) / "screen.csv")
    # the images as one dataset: more rejections than an in-distribution dataset would show?
    summary = dataset_test(df["in_distribution"].astype(bool).tolist(), n_cal=int(scr.n_cal_), alpha=scr.alpha)
    df.attrs["dataset"] = summary
    write_json({**summary, "screen": str(screen) if not isinstance(screen, Screen) else None},
               Path(out) / "screen_summary.json")  # fmt: skip
    return df
