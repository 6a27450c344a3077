"""One demo run: the eight stages in order, one report directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monai_gamverify.apps.demo.report import (
    format_summary,
    records,
    tensorboard_summary,
    verdict_figures,
    verdicts,
    write_report,
)
from monai_gamverify.apps.demo.screening import model_screens, screen_stage
from monai_gamverify.apps.demo.settings import MODELS, N_STAGES, WEIGHTS_DIR, demo_settings, torch_device
from monai_gamverify.apps.demo.stages import (
    energy_stage,
    explain_examples,
    garbage_stage,
    prepare_cohorts,
    verify_models,
)
from monai_gamverify.apps.demo.weights import load_model, shipped_weights, train_models
from monai_gamverify.apps.suitability import default_prior_path
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.io import write_json

__all__ = ["run_demo", "DEMO_MARKER"]

logger = logging.getLogger("monai_gamverify.apps.demo")

#: file written in every demo output directory: a non-empty directory without it is never cleaned or written into
DEMO_MARKER = ".gamverify-demo.json"
_SUBDIRS = ("data", "models", "cams", "verify", "energy", "garbage", "tensorboard", "logs")


def _claim(root: Path) -> None:
    """Make ``root`` a demo directory: refuse a non-empty one that is not a previous demo output, else clean the
    previous results (a rerun must not mix old and new results) and write the marker."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file, not a directory")
    marker = root / DEMO_MARKER
    if root.is_dir() and any(root.iterdir()) and not marker.is_file():
        found = sorted(p.name for p in root.iterdir())[:5]
        raise ValueError(
            f"output directory {root} is not empty and is not a previous demo output (no {DEMO_MARKER}; found "
            f"{found}): the demo would replace its data/, models/, ... folders. Choose a new or empty directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    for sub in _SUBDIRS:
        shutil.rmtree(root / sub, ignore_errors=True)
    write_json({"format": "monai-gamverify.demo", "subdirectories": list(_SUBDIRS)}, marker)


def run_demo(
    out: str | os.PathLike = "demo_out",
    seed: int = 0,
    quick: bool = False,
    device: str | None = None,
    train: bool | None = None,
    progress: bool = True,
    on_stage: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Run the whole demo and write one report directory (see the module docstring for the stages).

    Written to ``out``: ``report.html`` (self-contained), ``summary.json``, ``data/`` (cohorts), ``models/``
    (checkpoints used), ``cams/`` (NIfTI maps, PNG overlays, ``explanations.csv``), ``verify/clean`` and
    ``verify/marker`` (the label-free verdicts on the clean target volumes and on the same volumes carrying the marker:
    ``verdicts.csv``, ``verdicts.json``, mean maps, ``report.html``), ``verify/ground_truth.csv`` (measured accuracy
    of the SOS-task models, never shown to the verdict), ``energy/`` (AE tables and scatter plots), ``garbage/``
    (rejection and OOD tables), ``screening/`` (screens), ``tensorboard/`` (training runs when trained, and
    ``summary``), ``logs/`` (bundle training logs).

    Args:
        out: report directory: new, empty, or a previous demo output (marked by :data:`DEMO_MARKER`), whose results
            are replaced; any other non-empty directory is refused.
        seed: base seed of cohorts, training and verifier. The shipped weights exist for seed 0 only.
        quick: tiny cohorts and 1 training epoch (for tests; the results are not meaningful).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        train: ``True`` trains every model here; ``False`` requires the shipped weights; ``None`` (default) uses
            them when they match the settings and seed, else trains.
        progress: progress bars.
        on_stage: called as ``on_stage(i, n, text)`` when stage ``i`` of ``n`` starts (the stage lines are also
            logged at INFO level on the ``monai_gamverify.apps.demo`` logger, with per-cohort and per-model lines).

    Returns:
        The summary dict (also ``summary.json``): ``report``, ``out``, ``verdicts``, ``key_figures``,
        ``verification``, ``energy``, ``garbage``, ``models``, ``cohorts``, ``timings_s``, ``files``, ...

    Raises:
        FileNotFoundError: ``train=False`` without matching shipped weights, no bundles folder, or the label-free
            verifier's prior missing from the package.
        ValueError: ``out`` is a non-empty directory that is not a previous demo output.

    Example:
        >>> s = run_demo("demo_out", quick=True)
        >>> s["key_figures"]["label-free model verdicts as expected, clean SOS target"]
    """
    with warnings.catch_warnings():
        # MONAI announces a future default of Orientationd once per bundle parse; nothing to act on here
        warnings.filterwarnings("ignore", message=r".*Orientationd.*")
        return _run_demo(out, seed, quick, device, train, progress, on_stage)


def _run_demo(
    out: str | os.PathLike,
    seed: int,
    quick: bool,
    device: str | None,
    train: bool | None,
    progress: bool,
    on_stage: Callable[[int, int, str], None] | None,
) -> dict:
    def _stage(i: int, text: str) -> float:
        logger.info("[%d/%d] %s", i, N_STAGES, text)
        if on_stage is not None:
            on_stage(i, N_STAGES, text)
        return time.perf_counter()

    t_start = time.perf_counter()
    settings = demo_settings(quick)
    dev = torch_device(device)
    root = Path(out)
    timings: dict[str, float] = {}

    shipped = shipped_weights(settings, seed) if train is not True else None
    if train is False and shipped is None:
        raise FileNotFoundError(
            f"no shipped weights in {WEIGHTS_DIR} match these settings (seed {seed}, quick={quick}); run "
            "scripts/make_demo_weights.py or pass train=True"
        )

    prior = default_prior_path()
    if not prior.is_file():
        raise FileNotFoundError(
            f"the label-free verifier's prior {prior} is missing from the package (it is written by "
            "scripts/experiment_verify.py --write-prior from the SOS zoo); reinstall monai-gamverify"
        )

    _claim(root)
    t = _stage(1, f"synthetic cohorts -> {root / 'data'}")
    cohorts = prepare_cohorts(root / "data", settings, seed=seed, progress=progress)
    timings["cohorts"] = time.perf_counter() - t
    models_dir = root / "models"
    if shipped is not None:
        t = _stage(2, f"models: shipped weights from {WEIGHTS_DIR}")
        meta = json.loads((WEIGHTS_DIR / "manifest.json").read_text())["models"]
        ckpts, model_rows = {}, []
        for name, path in shipped.items():
            dst = models_dir / f"{name}.pt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst)
            ckpts[name] = dst
            kept = ("best_metric_name", "best_metric", "best_epoch", "epochs", "seconds")
            model_rows.append({"model": name, **MODELS[name], **{k: meta[name][k] for k in kept}})
        weights = "shipped"
    else:
        t = _stage(2, f"models: training {len(MODELS)} bundles (small_cnn) -> {models_dir}")
        trained = train_models(
            root / "data", models_dir, settings, seed, dev, root / "tensorboard", root / "logs", progress
        )
        ckpts = {k: v["checkpoint"] for k, v in trained.items()}
        model_rows = [
            {"model": k, **MODELS[k], **{kk: vv for kk, vv in v.items() if kk != "checkpoint"}}
            for k, v in trained.items()
        ]
        weights = "trained"
    for row in model_rows:
        row["overrides"] = json.dumps(row["overrides"])
        row["seed"] = int(seed) + int(MODELS[row["model"]]["seed"])  # the training seed, not the offset
    timings["models"] = time.perf_counter() - t
    loaded = {name: load_model(name, ckpts[name], dev) for name in ("sos_ref", "chin", "sos_kplus1")}

    t = _stage(3, "Grad-CAM explanations of SOS test volumes (reference and chin model)")

    test_items = load_datalist(root / "data" / "sos" / "datalist.json", "test", check="exists", spatial_dims=None)
    explanations = explain_examples(loaded, test_items[: settings.n_examples], root / "cams", dev, progress)
    timings["explanations"] = time.perf_counter() - t

    t = _stage(4, "label-free model verdicts next to the trusted reference sos_ref, on clean and marker-bearing SOS")
    verification = verify_models(root / "data", ckpts, root / "verify", settings, seed, dev, progress)
    timings["verification"] = time.perf_counter() - t

    t = _stage(5, "attribution energy of the quality model, leave-one-out Spearman")
    energy = energy_stage(root / "data", ckpts["quality"], root / "energy", settings, seed, dev, progress)
    timings["energy"] = time.perf_counter() - t

    t = _stage(6, "K+1 garbage class: rejections on SOS, chin, CVM and noise volumes")
    garbage = garbage_stage(root / "data", loaded, root / "garbage", dev, progress)
    timings["garbage"] = time.perf_counter() - t

    t = _stage(7, "in-distribution screens: the SOS model's on SOS, chin, CVM and noise; each model's own on SOS")
    screening = screen_stage(root / "data", ckpts["sos_ref"], root / "screening", settings, seed, dev)
    screening["models"] = model_screens(root / "data", ckpts, root / "screening", settings, seed, dev)
    timings["screen"] = time.perf_counter() - t

    t = _stage(8, "report")
    gt = garbage["table"].set_index("source")
    ood_rate = float(gt.loc[[s for s in gt.index if not s.startswith("sos")], "rejected"].sum()) / max(
        int(gt.loc[[s for s in gt.index if not s.startswith("sos")], "n"].sum()), 1
    )
    overall = energy["table"].set_index("category")
    st = screening["table"].set_index("source")
    key = {
        **verdict_figures(verification),
        "K+1 rejection rate, OOD volumes": ood_rate,
        "K+1 rejection rate, SOS test volumes": float(gt.iloc[0]["rejection_rate"]),
        "K+1 stage accuracy, SOS test": garbage["stage_accuracy"],
        "AE Spearman rho, overall": float(overall["rho"].get("overall", float("nan"))),
        "screen rejection rate, OOD volumes": float(
            st.loc[st.index[1:], "rejected"].sum() / st.loc[st.index[1:], "n"].sum()
        ),
        "screen false rejection, SOS test volumes": float(st.iloc[0]["rejection_rate"]),
    }
    summary: dict[str, Any] = {
        "out": str(root),
        "report": str(root / "report.html"),
        "seed": int(seed),
        "mode": "quick" if quick else "full",
        "device": str(dev),
        "weights": weights,
        "settings": asdict(settings),
        "cohorts": [
            {
                "cohort": k,
                "n": v.get("n", sum(v["splits"].values())),
                "size": v.get("size", ""),
                **{split: v["splits"].get(split, 0) for split in ("training", "validation", "test")},
            }
            for k, v in cohorts.items()
        ],
        "models": model_rows,
        "key_figures": key,
        "explanations": records(explanations.drop(columns=["map", "overlay"])),
        "verification": {
            "protocol": "label-free: one trusted reference (sos_ref) + the shipped prior, conformal test",
            "alpha": verification["alpha"],
            "n_images": verification["n_images"],
            "prior": verification["prior"],
            "targets": {
                t: {
                    "cohort": v["cohort"],
                    "dir": str(v["dir"]),
                    "report": str(v["report"]),
                    "verdicts": records(v["verdicts"]),
                }
                for t, v in verification["targets"].items()
            },
            "truth": records(verification["truth"]),
        },
        "energy": {"table": records(energy["table"]), "regression": records(energy["regression"]), "n": energy["n"]},
        "garbage": {
            "rejections": records(garbage["table"]),
            "ood": records(garbage["ood"]),
            "stage_accuracy": garbage["stage_accuracy"],
        },
        "screen": {
            "rejections": records(screening["table"]),
            "n_calibration": screening["n_cal"],
            "alpha": 0.05,
            "pictures": screening["pictures"],
            "models": records(screening["models"]),
        },
        "files": {
            "report": str(root / "report.html"),
            "summary": str(root / "summary.json"),
            "cohorts": str(root / "data"),
            "checkpoints": str(models_dir),
            "CAM maps (NIfTI) and overlays (PNG)": str(root / "cams"),
            "label-free verdicts, clean SOS target": str(root / "verify" / "clean"),
            "label-free verdicts, SOS target carrying the marker": str(root / "verify" / "marker"),
            "ground truth (measured accuracy)": str(root / "verify" / "ground_truth.csv"),
            "attribution energy": str(root / "energy"),
            "garbage class": str(root / "garbage"),
            "in-distribution screen": str(root / "screening"),
            "TensorBoard": str(root / "tensorboard"),
        },
        "timings_s": timings,
    }
    summary["verdicts"] = [{"subject": s, "verdict": v, "as_expected": g} for s, v, g in verdicts(summary)]
    timings["report"] = 0.0
    timings["total"] = time.perf_counter() - t_start
    results = {"explanations": explanations, "verification": verification, "energy": energy, "garbage": garbage,
               "screen": screening}  # fmt: skip
    write_report(root, summary, results)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    tensorboard_summary(root / "tensorboard", summary)
    write_json(summary, root / "summary.json")
    logger.info("%s", format_summary(summary))
    return summary
