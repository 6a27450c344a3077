"""The demo's in-distribution screen: fitted for the SOS reference model, run on SOS test, chin, CVM and noise
volumes (``apps.screening.fit_screen`` / ``run_screen``), with pictures of rejected inputs for the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from monai_gamverify.apps.demo.settings import MODELS, DemoSettings, bundles_dir
from monai_gamverify.apps.screening import fit_screen, run_screen
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.data.synthetic import make_cohort
from monai_gamverify.io import load_image, write_csv
from monai_gamverify.screening import dataset_test
from monai_gamverify.visualize.plots import overlay_png

__all__ = ["screen_stage", "model_screens", "SCREEN_SOURCES", "SCREENED_MODELS"]

#: candidate models judged on the SOS data by their **own** screen (the K+1 model, trained on SOS plus garbage, is
#: left out: its training data is a mixture that no one cohort here calibrates)
SCREENED_MODELS = ("sos_b", "chin", "cvm")

#: report name -> cohort folder; the first is in distribution
SCREEN_SOURCES = {"sos (in-distribution)": "sos", "chin": "chin", "cvm": "cvm", "noise": "noise"}


def screen_stage(
    data: Path,
    checkpoint: str | os.PathLike,
    out: Path,
    settings: DemoSettings,
    seed: int,
    device: torch.device,
    n_pictures: int = 2,
) -> dict[str, Any]:
    """Fit the screen of the SOS reference model and screen every test volume.

    The detectors are fitted on the SOS training list; the conformal calibration uses the SOS validation list plus
    an extra SOS cohort that no model was trained on (``data/sos_calibration``, ``settings.n_screen_calibration``
    volumes, seed ``seed + 10``), so the in-distribution false-rejection rate is at most alpha = 0.05 by
    construction.

    Returns:
        ``table`` (per source: n, rejected, rate), ``items`` (``screen.csv`` rows with their source), ``pictures``
        (PNG of rejected inputs with the first reason), the screen directory and its calibration size.
    """
    cal_dir = data / "sos_calibration"
    make_cohort("sos", n=settings.n_screen_calibration, size=settings.size, seed=seed + 10, out_dir=cal_dir,
                progress=False)  # fmt: skip
    screen_dir = out / "screen"
    screen = fit_screen(
        bundles_dir() / MODELS["sos_ref"]["bundle"],
        data / "sos",
        screen_dir,
        MODELS["sos_ref"]["overrides"],
        0.05,
        checkpoint=checkpoint,
        calibration_dirs=[cal_dir],
        seed=seed,
        device=device,
    )
    paths, sources = [], []
    for source, kind in SCREEN_SOURCES.items():
        items = load_datalist(data / kind / "datalist.json", "test", check="exists", spatial_dims=None,
                              require_label=False, allow_empty=True)  # fmt: skip
        paths += [e["image"] for e in items]
        sources += [source] * len(items)
    items_df = run_screen(screen_dir, paths, out, device=device).copy()
    items_df.insert(0, "source", sources)
    write_csv(items_df, out / "screen_items.csv")
    rows = []
    for source, part in items_df.groupby("source", sort=False):
        rejected = int((~part["in_distribution"].astype(bool)).sum())
        rows.append({"source": source, "n": len(part), "rejected": rejected, "rejection_rate": rejected / len(part)})
    table = pd.DataFrame(rows)
    write_csv(table, out / "screen_rejections.csv")
    pictures = []
    for source in list(SCREEN_SOURCES)[1:]:
        rejected = items_df[(items_df["source"] == source) & ~items_df["in_distribution"].astype(bool)]
        for _, row in rejected.head(n_pictures).iterrows():
            img = load_image(row["image"], check_finite=False)
            reason = str(row["reasons"]).split(";")[0][:90]
            name = Path(str(row["image"])).name.split(".")[0]
            png = overlay_png(img[0], None, out / f"rejected_{name}.png", title=f"{source}: {reason}")
            pictures.append({"source": source, "image": row["image"], "png": str(png), "reason": reason})
    return {"table": table, "items": items_df, "pictures": pictures, "screen": str(screen_dir), "n_cal": screen.n_cal_}


def model_screens(
    data: Path,
    checkpoints: dict[str, str | os.PathLike],
    out: Path,
    settings: DemoSettings,
    seed: int,
    device: torch.device,
    dataset: str = "sos",
) -> pd.DataFrame:
    """Is the ``dataset`` like the data each candidate model was made for? Each model's own screen (fitted on its own
    training list, calibrated on its validation list plus a fresh cohort of its own kind that it never saw) judges the
    dataset's test volumes; :func:`~monai_gamverify.screening.dataset_test` turns the count of rejections into one
    p-value for the dataset (Beta-binomial: the volumes share the screen's calibration set).

    Returns:
        One row per model: ``model``, ``trained_on``, ``n``, ``n_rejected``, ``expected_rate``, ``p_value``,
        ``like_training_data`` (also ``OUT/model_screens.csv``).
    """
    items = load_datalist(data / dataset / "datalist.json", "test", check="exists", spatial_dims=None,
                          require_label=False)  # fmt: skip
    paths = [e["image"] for e in items]
    rows = []
    for k, name in enumerate(SCREENED_MODELS):
        kind = MODELS[name]["data"]
        cal_dir = data / f"{kind}_calibration"
        if not (cal_dir / "datalist.json").is_file():
            make_cohort(kind, n=settings.n_screen_calibration, size=settings.size, seed=seed + 10 + 7 * k,
                        out_dir=cal_dir, progress=False)  # fmt: skip
        target = out / f"screen_{name}"
        try:
            screen = fit_screen(bundles_dir() / MODELS[name]["bundle"], data / kind, target, MODELS[name]["overrides"],
                                0.05, checkpoint=checkpoints[name], calibration_dirs=[cal_dir], seed=seed,
                                device=device)  # fmt: skip
        except ValueError as err:  # a quick run's cohorts are too small to fit a screen: say so, judge nothing
            empty = dict.fromkeys(("n_rejected", "expected_rate", "p_value", "like_training_data"))
            rows.append({"model": name, "trained_on": kind, "n": len(paths), **empty, "note": str(err)})
            continue
        judged = run_screen(target, paths, target, device=device)
        read = judged[judged["error"].fillna("") == ""]  # unreadable files are errors, not rejections
        test = dataset_test(read["in_distribution"].astype(bool).tolist(), n_cal=screen.n_cal_, alpha=screen.alpha)
        rows.append({"model": name, "trained_on": kind, **test, "note": ""})
    table = pd.DataFrame(rows)
    write_csv(table, out / "model_screens.csv")
    return table
