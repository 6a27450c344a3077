"""The ``gamverify`` command: ``gamverify demo|cam|cohort|screen fit|screen run|synth|verify|energy|version``.

One ``argparse`` parser for every command, built from the command functions below: each keyword parameter is a
``--flag`` whose help is the function's Google docstring ``Args`` entry and whose type follows the annotation (a list
flag takes space-separated values, ``--images a.nii.gz b.nii.gz``, and also the ``'[a, b]'`` and ``a,b`` forms; a
``dict`` flag takes JSON). ``gamverify <command> --help`` lists the flags. A mistyped flag or a bad value is one
``ERROR:`` line on stderr and exit code 2, and so is a ``ValueError``/``OSError`` of the library (set
``GAMVERIFY_TRACEBACK=1`` for the traceback). Commands with a parser of their own (``cohort``) get their arguments
untouched (:data:`PASSTHROUGH`). The one place that prints and exits; the library logs and raises.

Flag names: ``--label`` is the segmentation label a command explains (``cam``, ``verify``), ``--seg_labels`` several
of them (``cohort``; ``--labels`` there is a deprecated alias), ``--labels`` the suitability labels of ``verify``.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from monai_gamverify.apps.commandline import CommandParser

__all__ = [
    "main",
    "build_parser",
    "COMMANDS",
    "PASSTHROUGH",
    "demo",
    "cam",
    "cohort",
    "synth",
    "verify",
    "energy",
    "screen_fit",
    "screen_run",
    "version",
]


def cam(
    image: str,
    out: str = "cam_out",
    bundle_root: str | None = None,
    network: str | None = None,
    network_args: dict | str | None = None,
    checkpoint: str | None = None,
    layer: str | None = None,
    method: str | None = None,
    class_idx: int | None = None,
    a_min: float | None = None,
    a_max: float | None = None,
    device: str | None = None,
    overrides: dict | str | None = None,
    label: int | str | None = None,
    box: list | str | None = None,
    screen: str | None = None,
    top_k: int | None = None,
    max_memory_mb: float | None = None,
) -> dict:
    """Explain one image: write the map as NIfTI on the input's grid with its affine, a PNG overlay and a JSON.

    Give either a bundle (``--bundle_root``: its network, weights (or ``--checkpoint``), inference preprocessing and
    declared CAM layer) or a network by name (``--network resnet18 --network_args '{"spatial_dims": 3,
    "n_input_channels": 1, "num_classes": 5}' --checkpoint model.pt --layer layer4``). The work is done by
    ``monai_gamverify.apps.pipeline.ImagePipeline`` (the engine every command shares).

    Args:
        image: NIfTI (or any MONAI-readable) image, or a DICOM series directory.
        out: output directory.
        bundle_root: MONAI bundle directory.
        network: ``monai.networks.nets`` name or a dotted path to a network class.
        network_args: keyword arguments of the network (JSON string or dict).
        checkpoint: weights (``torch.load(weights_only=True)``); with a bundle it replaces ``models/model.pt``;
            without it a named network keeps random weights.
        layer: target layer (default: the bundle's declared layer).
        method: gradcam, gradcampp (gradcam++) or scorecam (default: the bundle's ``cam_method``, else gradcam).
        class_idx: class (or output column) to explain; default: the predicted class.
        a_min: intensity window lower bound mapped to 0 (network-by-name only; e.g. -1000 for CBCT HU).
        a_max: intensity window upper bound mapped to 1.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        overrides: bundle config keys to override, as for ``monai.bundle run`` (e.g. ``'{"network_name":
            "small_cnn"}'`` for a bundle trained with ``--network_name small_cnn``).
        label: segmentation bundles: the label to explain, by name (the bundle's ``channel_def``) or output channel
            index; the target is the sum of its logits over its predicted mask (Seg-Grad-CAM), explained through the
            bundle's inferer (a ``SlidingWindowInferer`` explains window by window). Default for a segmentation
            bundle: channel 1.
        box: segmentation: ``[[lo, hi], ...]`` per spatial axis of the preprocessed grid restricting the region.
        screen: a saved in-distribution screen (``gamverify screen fit``): the summary gets ``in_distribution``,
            ``p_value`` and ``reasons``, and the verdict is ``out of distribution`` before any model verdict.
        top_k: Score-CAM only: score the ``top_k`` highest-variance channels (an approximation, docs/scale.md).
        max_memory_mb: Score-CAM only: memory budget of the masked forward passes (chunk size from a measured probe).

    Returns:
        Summary dict (prediction, probabilities, energy, written files; for a segmentation: label, predicted voxels).
    """
    from monai_gamverify.apps.pipeline import ImagePipeline, image_stem
    from monai_gamverify.visualize.registry import cam_method

    method = cam_method(method) if method else None  # None: the bundle's cam_method (gradcam for a named network)
    options = {k: v for k, v in (("top_k", top_k), ("max_memory_mb", max_memory_mb)) if v is not None}
    if options and method != "scorecam":
        raise ValueError(f"--top_k / --max_memory_mb are Score-CAM options; give --method scorecam (got {method})")
    if bundle_root is not None:
        extra = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
        pipe = ImagePipeline.from_bundle(
            bundle_root,
            overrides=extra,
            checkpoint=checkpoint,
            target_layers=layer,
            method=method,
            device=device,
            screen=screen,
            cam_options=options,
        )
        if label is not None or (pipe.bundle.task == "segmentation" and pipe.slice_axis is None):
            from monai_gamverify.apps.pipeline.segmentation import explain_segmentation

            region = json.loads(box) if isinstance(box, str) else box
            seg = explain_segmentation(pipe, image, out, 1 if label is None else label, box=region)
            print(f"{image_stem(image)}: {pipe.method} map of label {seg['label']} ({seg['predicted_voxels']} voxels "
                  f"predicted) at {pipe.target_layers} -> {seg['map']}")  # fmt: skip
            if seg.get("in_distribution") is False:
                print(f"  out of distribution (p = {seg['p_value']:.3g}): " + "; ".join(seg["reasons"]))
            return seg
    elif network is not None:
        if not layer:
            raise ValueError("no target layer: pass --layer (names as in model.named_modules())")
        if checkpoint is None:
            print("warning: no --checkpoint given; the network keeps its random initial weights")
        pipe = ImagePipeline.from_network(
            network, layer, network_args=network_args, checkpoint=checkpoint, a_min=a_min, a_max=a_max,
            method=method or "gradcam", device=device, screen=screen, cam_options=options,
        )  # fmt: skip
    else:
        raise ValueError("give --bundle_root or --network")
    pipe.check_screen("classification")
    result = pipe.run(image, out, name=f"{image_stem(image)}_{pipe.method}", class_idx=class_idx)
    summary = pipe.summary(result)
    probs = result.probabilities
    print(
        f"{image_stem(image)}: predicted {result.prediction_name}"
        + (f" (p={max(probs):.2f})" if probs else "")
        + f"; {pipe.method} map of {pipe.target_layers} -> {summary['map']}, overlay -> {summary['overlay']}"
    )
    if result.in_distribution is False:
        print(f"  out of distribution (p = {result.p_value:.3g}): " + "; ".join(result.reasons or []))
    return summary


def _paths(value: Any) -> list[str]:
    """A path, a comma-separated string, the ``[a, b]`` form of unquoted paths, or a list: the items as strings."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [p.strip().strip("'\"") for p in text.split(",") if p.strip()]


def screen_fit(
    bundle_root: str,
    dataset_dir: str,
    out: str = "screen",
    overrides: dict | str | None = None,
    alpha: float = 0.05,
    config: str | None = None,
    checkpoint: str | None = None,
    datalist: str | None = None,
    fit_splits: list[str] | str = ("training",),
    calibration_splits: list[str] | str = ("validation",),
    calibration_dirs: list[str] | str = (),
    calibration_fraction: float = 0.35,
    combine: str = "fisher",
    seed: int = 0,
    device: str | None = None,
) -> str:
    """Fit an in-distribution screen for a bundle's model: detectors on the datalist's training list, conformal
    calibration on its validation list and ``--calibration_dirs`` (images the model never saw); see
    ``monai_gamverify.screening.fit_screen`` and docs/screening.md.

    Args:
        bundle_root: the MONAI bundle directory.
        dataset_dir: the dataset (``datalist.json`` inside unless ``--datalist`` is given).
        out: directory for ``screen.json`` / ``screen.npz``.
        overrides: bundle config overrides as JSON, e.g. ``'{"network_name": "small_cnn"}'``.
        alpha: rejection level.
        config: the bundle config defining ``network_def`` and ``preprocessing`` (default: ``inference.json``).
        checkpoint: weights (default: the bundle's ``models/model.pt``).
        datalist: the datalist JSON (default ``DATASET_DIR/datalist.json``).
        fit_splits: datalist lists the detectors are fitted on.
        calibration_splits: datalist lists of images the model never saw, for the conformal calibration.
        calibration_dirs: more datasets (folders with a ``datalist.json``) of in-distribution images for the
            calibration.
        calibration_fraction: without calibration lists or dirs: the seeded fraction of the fit images held out.
        combine: how the detectors' p-values are combined: ``fisher``, ``maxz`` or ``bonferroni`` (docs/screening.md).
        seed: seed of the held-out draw.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).

    Example:
        gamverify screen fit --bundle_root bundles/sos_staging --dataset_dir data/sos --out screen --alpha 0.05
    """
    from monai_gamverify.screening import fit_screen

    if isinstance(overrides, str):
        overrides = _json_dict(overrides, "--overrides")
    s = fit_screen(
        bundle_root,
        dataset_dir,
        out,
        overrides,
        alpha,
        config=config,
        checkpoint=checkpoint,
        datalist=datalist,
        fit_splits=_paths(fit_splits),
        calibration_splits=_paths(calibration_splits),
        calibration_dirs=_paths(calibration_dirs) if calibration_dirs else [],
        calibration_fraction=calibration_fraction,
        combine=combine,
        seed=seed,
        device=device,
    )
    return f"screen saved to {out}: {s.n_fit_} fit, {s.n_cal_} calibration images; detectors {', '.join(s.detectors)}"


def screen_run(
    screen: str,
    images: list[str] | str,
    out: str = "screen_out",
    device: str | None = None,
    on_error: str = "record",
) -> str:
    """Screen images (NIfTI/NRRD/MHA files, DICOM files or DICOM series directories) with a saved screen; writes
    ``OUT/screen.csv`` (image, in_distribution, p_value, reasons, each detector's score and p-value) and
    ``OUT/screen_summary.json`` (the images judged as one dataset: is it like the model's training data?).

    Args:
        screen: the directory a screen was saved to (``gamverify screen fit --out``).
        images: image files, DICOM series directories, folders (their images and series) or glob patterns,
            space-separated.
        out: output directory.
        device: ``cpu`` or ``cuda`` for the screen's bundle (default: CUDA when available).
        on_error: ``record`` (an unreadable image gets a row with the error as its reason) or ``raise``.

    Example:
        gamverify screen run --screen screen --images a.nii.gz dicom_dir --out screen_out
        gamverify screen run --screen screen --images new_site_scans/ --out screen_out   # a folder: one dataset
    """
    from monai_gamverify.data.datalist import list_images
    from monai_gamverify.screening import run_screen

    paths: list[str] = []
    for p in _paths(images):  # a folder: its image files and DICOM series (a folder of DICOM slices alone: one series)
        if os.path.isdir(p) or any(ch in p for ch in "*?["):
            paths += [e["image"] for e in list_images(p, spatial_dims=None, num_channels=None, check="none")]
        else:
            paths.append(p)
    df = run_screen(screen, paths, out, device=device, on_error=on_error)
    n_out = int((~df["in_distribution"].astype(bool)).sum())
    d = df.attrs["dataset"]
    like = "like" if d["like_training_data"] else "NOT like"
    return (
        f"{len(df)} image(s) screened, {n_out} out of distribution; table: {out}/screen.csv\n"
        f"as one dataset: {like} the model's training data ({d['n_rejected']}/{d['n']} rejected, an in-distribution "
        f"dataset shows {100 * d['expected_rate']:.0f} % on average; p = {d['p_value']:.3g})"
    )


def synth(
    kind: str = "sos",
    n: int = 50,
    size: int | None = None,
    seed: int = 0,
    out: str = "cohort",
    rotate: float = 0.0,
    spacing: float | None = None,
    progress: bool = True,
) -> str:
    """Write a synthetic cohort (NIfTI + masks + datalist + labels CSV); see ``monai_gamverify.data.synth``.

    Args:
        kind: one of sos, chin, cvm, ceph, ceph_chin, quality.
        n: number of subjects.
        size: grid edge length (default 48 for volumes, 128 ceph, 64 ceph_chin).
        seed: cohort seed.
        out: output directory.
        rotate: extra rotation in degrees (rotated test sets).
        spacing: voxel size in mm (default: field of view / size).
        progress: progress bar.

    Example:
        gamverify synth --kind sos --n 100 --size 48 --seed 0 --out data/sos
    """
    from monai_gamverify.data.synthetic import summary_line
    from monai_gamverify.data.synthetic import synth as _synth

    summary = _synth(kind=kind, n=n, size=size, seed=seed, out=out, rotate=rotate, spacing=spacing, progress=progress)
    return summary_line(summary)


def verify(reference: str, candidates: Any, dataset_dir: str, out: str = "verify_out", **kwargs: Any) -> None:
    """Is each candidate bundle suitable for the data? Grad-CAM (or feature-map) similarity to a reference bundle,
    Random-Forest verifier, cross-validated report (CSV/JSON/PNG/TensorBoard) in ``out``; see
    ``monai_gamverify.verification.bundles.verify_bundles``.

    Segmentation bundles are verified on the Seg-Grad-CAM of ``--label`` (name or channel; default: the first
    foreground channel).

    Example:
        gamverify verify --reference bundles/sos_a --candidates '{"sos_b": "bundles/sos_b", "chin": "bundles/chin"}'
            --labels '{"sos_b": 1, "chin": 0}' --dataset_dir data/sos --out verify_out
        gamverify verify --reference spleen_a --candidates '{"b": "spleen_b", "liver": "liver_seg"}'
            --labels '{"b": 1, "liver": 0}' --dataset_dir data/ct --label spleen
    """
    from monai_gamverify.verification.bundles import verify_bundles

    print(verify_bundles(reference, candidates, dataset_dir, out=out, **kwargs)["summary"])


def energy(
    energy: str | None = None,
    scores: str | None = None,
    out: str = "energy_out",
    bundle_root: str | None = None,
    datalist: str | None = None,
    split: str = "test",
    overrides: dict | str | None = None,
    categories: list[str] | str | None = None,
    id_column: str = "id",
    checkpoint: str | None = None,
    method: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
    k: float = 1.5,
    plots: bool = True,
    progress: bool = True,
) -> dict:
    """Attribution-energy analysis: AE vs scores per category, leave-one-out Spearman, CI, Holm, atypical cases.

    Either precomputed AE (a CSV ``id, <category>...`` or a folder of raw NIfTI maps) and a scores CSV
    (``monai_gamverify.energy.energy_report``), or a bundle and a datalist: the AE of the bundle's model is computed
    here, the scores come from ``scores`` or from the datalist entries (``monai_gamverify.energy.bundle_energy``).

    Args:
        energy: AE CSV (``id, <category>...``) or a folder of raw NIfTI maps.
        scores: consensus-score CSV (``id, <category>...``); with ``--bundle_root`` optional (default: the scores in
            the datalist entries).
        out: output folder.
        bundle_root: a bundle whose model's AE is computed here (with ``--datalist``).
        datalist: MONAI datalist JSON of the volumes to explain (with ``--bundle_root``).
        split: datalist list to explain (with ``--bundle_root``).
        overrides: bundle config overrides as JSON (with ``--bundle_root``).
        categories: categories to analyse (default: every column in both tables; with a bundle its output names).
        id_column: name of the id column in both CSVs (AE and scores tables).
        checkpoint: weights other than the bundle's ``models/model.pt`` (with ``--bundle_root``).
        method: CAM method (with ``--bundle_root``; default: the bundle's ``cam_method``, else gradcam).
        batch_size: slices per CAM call (with ``--bundle_root``).
        device: CAM device (with ``--bundle_root``; default: CUDA when available).
        n_boot: bootstrap resamples of the Spearman interval.
        ci: level of the bootstrap interval (AE and scores tables).
        seed: bootstrap seed.
        alpha: family-wise level of Holm's flag (AE and scores tables).
        k: Tukey fence multiplier for atypical cases (AE and scores tables).
        plots: write the scatter PNGs (AE and scores tables).
        progress: progress bars.

    Example:
        gamverify energy ae.csv consensus.csv --out energy_out
        gamverify energy --bundle_root bundles/cbct_quality --datalist data/quality/datalist.json --out energy_out
    """
    if bundle_root is not None:
        from monai_gamverify.energy.workflow import bundle_energy

        if datalist is None:
            raise ValueError("--bundle_root needs --datalist (the volumes to explain)")
        if energy is not None:
            raise ValueError("give either an AE table/map folder or --bundle_root with --datalist, not both")
        table_only = {"--id_column": id_column != "id", "--ci": ci != 0.95, "--alpha": alpha != 0.05, "--k": k != 1.5}
        if not plots or any(table_only.values()):
            given = [f for f, on in table_only.items() if on] + ([] if plots else ["--plots"])
            raise ValueError(f"{', '.join(given)}: options of the AE-table route, not of --bundle_root")
        if isinstance(overrides, str):
            overrides = _json_dict(overrides, "--overrides")
        result = bundle_energy(
            bundle_root, datalist, out, split=split, scores=scores, categories=categories, overrides=overrides,
            checkpoint=checkpoint, method=method, batch_size=batch_size, device=device, n_boot=n_boot, seed=seed,
            progress=progress,
        )  # fmt: skip
    else:
        from monai_gamverify.energy import energy_report

        if energy is None or scores is None:
            raise ValueError("give an AE CSV (or map folder) and a scores CSV, or --bundle_root and --datalist")
        bundle_only = {
            "--datalist": datalist is not None,
            "--overrides": overrides is not None,
            "--checkpoint": checkpoint is not None,
            "--method": method is not None,
            "--device": device is not None,
            "--split": split != "test",
            "--batch_size": batch_size != 16,
        }
        if any(bundle_only.values()):
            given = ", ".join(f for f, on in bundle_only.items() if on)
            raise ValueError(f"{given}: options of --bundle_root, not of the AE-table route")
        result = energy_report(
            energy, scores, out, categories=categories, id_column=id_column, n_boot=n_boot, ci=ci, seed=seed,
            alpha=alpha, k=k, plots=plots, progress=progress,
        )  # fmt: skip
    return {key: value for key, value in result.items() if key != "table"}


def demo(
    out: str = "demo_out",
    seed: int = 0,
    quick: bool = False,
    device: str | None = None,
    train: bool | None = None,
) -> str:
    """Run the whole package on synthetic data and write one report directory; returns the report's path.

    Cohorts, five small bundle models (shipped weights, or ``--train True`` to train them here), Grad-CAM
    explanations, verification (Methods 1 and 2), attribution energy and the K+1 garbage class; a self-contained
    ``report.html`` with CSV/JSON tables, NIfTI maps, PNG figures and TensorBoard logs. See
    ``monai_gamverify.apps.demo.run_demo`` and docs/demo.md.

    Args:
        out: output directory of the report.
        seed: seed of the cohorts and of any training.
        quick: smaller cohorts and fewer steps (a minute on a laptop CPU).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        train: train the five models here (default: use the shipped weights when they match the settings).

    Example:
        gamverify demo --out demo_out
    """
    from tqdm.auto import tqdm

    from monai_gamverify.apps.demo import run_demo

    class _Lines(logging.Handler):  # the demo logs its stage lines and summary; print them between the tqdm bars
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record))

    log = logging.getLogger("monai_gamverify.apps.demo")
    handler, level, propagate = _Lines(logging.INFO), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return run_demo(out, seed=seed, quick=quick, device=device, train=train)["report"]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def cohort(*argv: str) -> int:
    """Explain/verify every image of a cohort (datalist JSON, folder or glob): prediction, CAM NIfTI, attribution
    energy, similarity features and verdict per image. Resumable (rerun the same command), bad items are skipped and
    listed in errors.csv, items are split between processes under torchrun; see docs/cohort.md and
    ``gamverify cohort --help`` for the flags. Exit codes: 0 all succeeded, 1 some items failed, 2 bad configuration,
    3 out of device memory, 130 interrupted.

    Example:
        gamverify cohort data/sos/datalist.json --out cohort_out --bundle_root bundles/sos_staging
    """
    from monai_gamverify.apps.cohort.command import main as cohort_main

    return cohort_main(list(argv))


def version() -> str:
    """Package, MONAI and torch versions."""
    import monai
    import torch

    import monai_gamverify

    return f"monai-gamverify {monai_gamverify.__version__} (monai {monai.__version__}, torch {torch.__version__})"


def _quiet_known_noise() -> None:
    """Silence two MONAI messages that every command would print and that tell a user nothing actionable: the
    ``Orientationd`` ``labels`` default-change notice (bundles written before MONAI 1.5 do not pass ``labels``) and
    the nvImageCodec notice of MONAI's DICOM reader on a machine without nvImageCodec (pydicom decodes instead).
    The library itself leaves MONAI's warnings alone; this is for the command line only."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*Orientationd.*Current default value of argument `labels=")
    warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------- parser
#: the commands of the one parser: name -> function, or -> {sub-command: function}
COMMANDS: dict[str, Callable[..., Any] | dict[str, Callable[..., Any]]] = {
    "demo": demo,
    "cam": cam,
    "synth": synth,
    "verify": verify,
    "energy": energy,
    "screen": {"fit": screen_fit, "run": screen_run},
    "version": version,
}
#: commands with an argument parser of their own (e.g. the one shared with ``python -m monai_gamverify.apps.cohort``):
#: name -> (function taking the remaining arguments and returning the exit code, one-line summary for --help)
PASSTHROUGH: dict[str, tuple[Callable[..., int], str]] = {
    "cohort": (cohort, "Explain/verify every image of a cohort (its own flags: gamverify cohort --help)."),
}
#: parameters that may also be given without their flag, in this order (besides those without a default)
POSITIONAL: dict[str, tuple[str, ...]] = {"energy": ("energy", "scores")}

_SECTION = re.compile(r"^(Args|Arguments|Returns|Yields|Raises|Example|Examples|Note|Notes|Warning):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\w+)*)\s*(?:\([^)]*\))?:\s*(.*)$")
_ROLE = re.compile(r":\w+:`(~?)([^`]+)`")


def _plain_text(text: str) -> str:
    """Docstring markup as a terminal shows it: ``x`` -> x, :func:`~a.b` -> b; ``%`` escaped for argparse."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "").replace("%", "%%")


def _docstring(func: Callable[..., Any]) -> tuple[str, dict[str, str], str]:
    """(description, {parameter: help}, examples) of a Google-style docstring."""
    lines = (inspect.getdoc(func) or "").splitlines()
    desc: list[str] = []
    args: dict[str, str] = {}
    example: list[str] = []
    section, current = None, None
    for line in lines:
        head = _SECTION.match(line)
        if head:
            section, current = head.group(1), None
            continue
        if section is None:
            desc.append(line)
        elif section in ("Args", "Arguments"):
            entry = _ENTRY.match(line[4:]) if line.startswith("    ") and not line.startswith("     ") else None
            if entry:
                names = [n.strip().lstrip("*") for n in entry.group(1).split(",")]
                current = names
                for n in names:
                    args[n] = entry.group(2).strip()
            elif current and line.strip():
                for n in current:
                    args[n] += " " + line.strip()
        elif section in ("Example", "Examples"):
            example.append(line)
    description = _plain_text("\n".join(desc).strip())
    epilog = ("examples:\n" + "\n".join(example).rstrip()) if any(x.strip() for x in example) else ""
    return description, {k: _plain_text(v) for k, v in args.items()}, epilog.replace("%", "%%")


def _annotation_kind(annotation: Any) -> str:
    """``bool``, ``int``, ``float``, ``int_or_str``, ``str``, ``list``, ``dict`` or ``any`` for an annotation (a string
    under ``from __future__ import annotations``)."""
    if annotation is inspect.Parameter.empty:
        return "any"
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {re.sub(r"\[.*", "", t.strip()).split(".")[-1] for t in text.split("|")} - {"None"}
    if "bool" in parts:
        return "bool"
    if parts & {"dict", "Mapping"}:
        return "dict"
    if parts & {"list", "Sequence", "tuple"}:
        return "list"
    if {"int", "str"} <= parts:
        return "int_or_str"
    for kind in ("int", "float", "str"):
        if kind in parts:
            return kind
    return "any"


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_or_str(text: str) -> int | str:
    """An output channel (integer) or a name."""
    try:
        return int(text)
    except ValueError:
        return text


def _json_dict(text: str, flag: str = "the value") -> dict:
    """A JSON object; a ``ValueError`` naming the flag and JSON's complaint otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not valid JSON ({err.msg} at character {err.pos}): {text!r}; "
                         """write an object with double quotes, e.g. '{"key": 1}'""") from None  # fmt: skip
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object {{...}}, got {type(value).__name__}: {text!r}")
    return value


def _dict_type(flag: str) -> Callable[[str], dict]:
    def convert(text: str) -> dict:
        try:
            return _json_dict(text, "the value")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _literal(text: str) -> Any:
    """A value of a parameter without a type: JSON for ``{...}``/``[...]``, an int or float when it reads as one,
    else the string."""
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            if stripped[:1] == "{":
                raise argparse.ArgumentTypeError(
                    f"not valid JSON ({err.msg} at character {err.pos}): {text!r}"
                ) from None
    for convert in (int, float):
        try:
            return convert(stripped)
        except ValueError:
            pass
    return text


def _list_values(values: Sequence[str] | str | None) -> list[Any] | None:
    """The items of a list flag: space-separated values, each also read in the ``'[a, b]'`` or ``a,b`` form (a JSON
    list such as ``'[[0, 10], [5, 20]]'`` is kept as parsed)."""
    if values is None:
        return None
    out: list[Any] = []
    for value in [values] if isinstance(values, str) else values:
        text = str(value).strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                out.extend(parsed)
                continue
        out.extend(_paths(text))
    return out


def _flag_help(doc: str, default: Any, kind: str) -> str:
    text = doc or ""
    if kind == "list" and "space-separated" not in text:
        text += " (space-separated)"
    if default not in (None, inspect.Parameter.empty, (), [], ""):
        shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        text += f" (default: {shown})".replace("%", "%%")
    return text.strip() or " "


def _add_command(parser: argparse.ArgumentParser, name: str, func: Callable[..., Any]) -> None:
    """The flags of ``func``'s keyword parameters on ``parser``; positional ones also without their flag."""
    description, docs, epilog = _docstring(func)
    parser.description = description
    parser.epilog = epilog or None
    params = list(inspect.signature(func).parameters.values())
    positional = [
        p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    positional += [n for n in POSITIONAL.get(name, ()) if n not in positional]
    specs = []
    for param in params:
        if param.kind is param.VAR_KEYWORD:
            parser.set_defaults(_extra=True)
            extra = docs.get(param.name) or f"passed on to {name}"
            parser.epilog = ((parser.epilog or "") + f"\n\nfurther --key value options: {extra}").strip()
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        kind = _annotation_kind(param.annotation)
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        help_text = _flag_help(docs.get(param.name, ""), default, kind)
        flag = f"--{param.name}"
        options: dict[str, Any] = {"dest": param.name, "default": default, "help": help_text}
        if kind == "bool":
            options.update(nargs="?", const=True, type=_bool, metavar="true|false")
        elif kind == "list":
            options.update(nargs="+", metavar=param.name.upper())
        elif kind == "dict":
            options.update(type=_dict_type(flag), metavar="JSON")
        elif kind == "int_or_str":
            options.update(type=_int_or_str)
        elif kind in ("int", "float"):
            options.update(type={"int": int, "float": float}[kind])
        elif kind == "any":
            options.update(type=_literal)
        if param.name in positional:
            options["help"] = help_text + f" (or give {param.name.upper()} without the flag)"
            parser.add_argument(
                f"_pos_{param.name}",
                nargs="*" if kind == "list" else "?",
                metavar=param.name.upper(),
                type=options.get("type"),
                default=None,
                help=f"same as --{param.name}",
            )
        parser.add_argument(flag, **options)
        specs.append((param.name, kind, required, param.name in positional))
    parser.set_defaults(_func=func, _specs=specs, _parser=parser)


def _summary(func: Callable[..., Any]) -> str:
    """The first sentence of a command's description (its line in ``gamverify --help``)."""
    first = _docstring(func)[0].split("\n\n")[0].replace("\n", " ")
    sentence = re.split(r"(?<=[.?!])\s", first, maxsplit=1)[0]
    return textwrap.shorten(sentence, 110, placeholder=" ...")


def build_parser(prog: str = "gamverify") -> CommandParser:
    """The one parser of every command (:data:`COMMANDS`; :data:`PASSTHROUGH` commands are listed, their flags are
    their own)."""
    parser = CommandParser(
        prog=prog,
        description="Is this model suitable for this image? Answers from the model's own attention, on MONAI. "
        f"'{prog} COMMAND --help' lists a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", dest="_command", metavar="COMMAND")
    commands: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for name, target in COMMANDS.items():
        if isinstance(target, dict):
            group = sub.add_parser(name, help=f"{' / '.join(target)}: '{prog} {name} SUB --help'", description=None)
            inner = group.add_subparsers(title=f"{name} commands", dest="_subcommand", metavar="SUB")
            for sub_name, func in target.items():
                cmd = inner.add_parser(
                    sub_name, help=_summary(func), formatter_class=argparse.RawDescriptionHelpFormatter
                )
                _add_command(cmd, f"{name} {sub_name}", func)
                commands[(name, sub_name)] = cmd
            group.set_defaults(_parser=group)
        else:
            cmd = sub.add_parser(name, help=_summary(target), formatter_class=argparse.RawDescriptionHelpFormatter)
            _add_command(cmd, name, target)
            commands[(name,)] = cmd
    for name, (_, summary) in PASSTHROUGH.items():
        sub.add_parser(name, help=summary, add_help=False)
    parser.set_defaults(_commands=commands)
    return parser


def _split_extra(parser: argparse.ArgumentParser, args: list[str]) -> tuple[list[str], list[str]]:
    """For a command that takes ``**kwargs``: (its own arguments, the ``--key value`` pairs it does not define), so
    that an unknown flag's value is never taken for a positional argument."""
    commands = parser.get_default("_commands")
    cmd = commands.get(tuple(args[:2])) or commands.get(tuple(args[:1]))
    if cmd is None or not cmd.get_default("_extra"):
        return args, []
    known = {o for action in cmd._actions for o in action.option_strings}
    own, extra, i = [], [], 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and token.split("=", 1)[0] not in known:
            takes_value = "=" not in token and i + 1 < len(args) and not args[i + 1].startswith("--")
            extra += args[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            own.append(token)
            i += 1
    return own, extra


def _call(ns: argparse.Namespace, extra: list[str]) -> Any:
    """Call the chosen command with the parsed flags (``extra``: ``--key value`` pairs of a ``**kwargs`` command)."""
    parser: argparse.ArgumentParser = ns._parser
    func = getattr(ns, "_func", None)
    if func is None:  # "gamverify screen" alone
        parser.error("choose a command")
    if extra and not getattr(ns, "_extra", False):
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        close = [m for x in extra if x.startswith("--") for m in difflib.get_close_matches(x.split("=")[0], flags, 1)]
        parser.error(
            f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    kwargs: dict[str, Any] = {}
    for name, kind, required, positional in ns._specs:
        value = getattr(ns, name)
        if positional:
            pos = getattr(ns, f"_pos_{name}")
            if pos not in (None, []):
                if value is not None:
                    parser.error(f"{name} given twice: {pos!r} and --{name} {value!r}")
                value = pos
        if required and value is None:
            parser.error(f"missing {name.upper()} (give it, or --{name} VALUE)")
        if kind == "list":
            value = _list_values(value)
        kwargs[name] = value
    if extra:
        i = 0
        while i < len(extra):
            key = extra[i]
            if not key.startswith("--") or len(key) < 3:
                parser.error(f"unrecognized argument: {key}")
            key, _, inline = key[2:].partition("=")
            if inline or (i + 1 < len(extra) and not extra[i + 1].startswith("--")):
                raw = inline or extra[i + 1]
                i += 1 if inline else 2
                try:
                    kwargs[key] = _literal(raw)
                except argparse.ArgumentTypeError as err:
                    parser.error(f"argument --{key}: {err}")
            else:
                kwargs[key], i = True, i + 1
    return func(**kwargs)


def _show(result: Any) -> None:
    """Print what a command returned: a string as is, a dict or list as JSON, nothing for ``None``."""
    if result is None:
        return
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``gamverify`` console script (and of ``python -m monai_gamverify``).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_noise()
    if args[:1] and args[0] in PASSTHROUGH:  # a parser of its own: hand it the arguments untouched
        sys.exit(PASSTHROUGH[args[0]][0](*args[1:]))
    parser = build_parser()
    if not args:
        parser.print_help()
        return
    own, passed_on = _split_extra(parser, args)
    ns, extra = parser.parse_known_args(own)
    extra += passed_on
    try:
        _show(_call(ns, extra))
    except (ValueError, OSError) as err:  # the user's input (a file, a setting): one line, no traceback
        # (PreprocessingError, DataError, ScreenFileError, ImageReadError are ValueErrors); GAMVERIFY_TRACEBACK=1: raise
        if os.environ.get("GAMVERIFY_TRACEBACK"):
            raise
        message = " ".join(str(err).split())
        print(f"ERROR: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
