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

# long module: one function per command; their signatures and docstrings are the parser (apps/commandline.py)
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai_gamverify.apps.commandline import (
    CommandParser,
    add_function_flags,
    as_list,
    call_command,
    command_summary,
    json_dict,
    show_result,
    split_unknown_flags,
)

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
            bundle: its first foreground channel (``segcam.default_segmentation_label``).
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

    method = None if method is None else cam_method(method)
    options = {k: v for k, v in (("top_k", top_k), ("max_memory_mb", max_memory_mb)) if v is not None}
    if options and method not in (None, "scorecam"):
        raise ValueError(f"--top_k / --max_memory_mb are Score-CAM options; --method is {method}")
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
            seg = explain_segmentation(pipe, image, out, label, box=region)
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
    method = pipe.method
    result = pipe.run(image, out, name=f"{image_stem(image)}_{method}", class_idx=class_idx)
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
    ``monai_gamverify.apps.screening.fit_screen`` and docs/screening.md.

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
    from monai_gamverify.apps.screening import fit_screen

    if isinstance(overrides, str):
        overrides = json_dict(overrides, "--overrides")
    s = fit_screen(
        bundle_root,
        dataset_dir,
        out,
        overrides,
        alpha,
        config=config,
        checkpoint=checkpoint,
        datalist=datalist,
        fit_splits=as_list(fit_splits),
        calibration_splits=as_list(calibration_splits),
        calibration_dirs=as_list(calibration_dirs) if calibration_dirs else [],
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
    from monai_gamverify.apps.screening import run_screen
    from monai_gamverify.data.datalist import list_images

    paths: list[str] = []
    for p in as_list(images):  # a folder: its image files and DICOM series (a folder of DICOM slices alone: one series)
        if os.path.isdir(p) or any(ch in p for ch in "*?["):
            paths += [e["image"] for e in list_images(p, spatial_dims=None, num_channels=None, check="none")]
        else:
            paths.append(p)
    df = run_screen(screen, paths, out, device=device, on_error=on_error)
    d = df.attrs["dataset"]
    errors = f", {len(d['errors'])} could not be screened (column error)" if d["errors"] else ""
    head = f"{d['n']} image(s) screened, {d['n_rejected']} out of distribution{errors}; table: {out}/screen.csv"
    if not d["n"]:
        return head
    like = "like" if d["like_training_data"] else "NOT like"
    return (
        f"{head}\nas one dataset: {like} the model's training data ({d['n_rejected']}/{d['n']} rejected, an "
        f"in-distribution dataset shows {100 * d['expected_rate']:.0f} % on average; p = {d['p_value']:.3g})"
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
    cue: str = "none",
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
        cue: a label-encoding spurious cue burned into every volume (``marker``: a block whose intensity encodes the
            class; ``offset``: a per-class intensity offset), the training data of a shortcut model; default none.

    Example:
        gamverify synth --kind sos --n 100 --size 48 --seed 0 --out data/sos
    """
    from monai_gamverify.data.synthetic import summary_line
    from monai_gamverify.data.synthetic import synth as _synth

    summary = _synth(
        kind=kind, n=n, size=size, seed=seed, out=out, rotate=rotate, spacing=spacing, progress=progress, cue=cue
    )
    return summary_line(summary)


def verify(
    reference: str,
    candidates: dict | str,
    dataset_dir: str,
    out: str = "verify_out",
    references: dict | str | None = None,
    labels: dict | str | None = None,
    n_images: int = 20,
    verifier: str | None = None,
    alpha: float = 0.05,
    device: str | None = None,
    seed: int = 0,
    overrides: dict | str | None = None,
    method: str = "gradcam",
    split: str = "test",
    n_splits: int = 5,
    one_class: bool = False,
    label: int | str | None = None,
) -> None:
    """Is each candidate bundle suitable for the data? Without ``--labels``: the label-free, model-level verdict
    (``suitable`` / ``not suitable`` / ``undecided`` with a p-value and reasons) of each candidate next to one
    trusted reference bundle on a few unlabeled images of the data (task metadata, prediction agreement, attention
    and early-feature agreement, the candidate's own confidences and screen; docs/verification.md). With
    ``--labels``: the supervised study (Random-Forest verifier on similarity features), per-model verdicts only
    leave-models-out (at least 2 candidates of each label; otherwise refused).

    Example:
        gamverify verify --reference bundles/ref --candidates '{"ft": "bundles/ft", "zoo": "bundles/zoo"}'
            --dataset_dir data/site_a --out verify_out
        gamverify verify --reference bundles/sos_a --candidates '{"b": "b", "c": "c", "chin": "chin", "cvm": "cvm"}'
            --labels '{"b": 1, "c": 1, "chin": 0, "cvm": 0}' --dataset_dir data/sos --out study_out

    Args:
        reference: the trusted reference bundle's folder.
        candidates: JSON ``{"name": "bundle_dir", ...}`` of the candidate bundles.
        dataset_dir: the data: a folder of images or with a ``datalist.json`` (labels are not needed).
        out: output folder (``verdicts.csv``, ``verdicts.json``, ``report.html``; with ``--labels`` also
            ``verifier.json``, fitted on the reference and the candidates labelled 1, for ``--verifier``).
        references: JSON ``{"name": "bundle_dir"}`` of further trusted references (the verdict gets stronger).
        labels: JSON ``{"name": 0 or 1}``: run the supervised study instead (1 = suitable).
        n_images: target images used by the label-free verdict (a seeded random subset of more).
        verifier: a verifier (prior) file saved by a study or ``scripts/experiment_verify.py``; default: the prior
            shipped with the package (suitable pairs of its SOS zoo).
        alpha: level of the tests.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        seed: seed of the image subset, the permutations, the forest and the folds.
        overrides: JSON ``{"name": {config overrides}}`` for bundles trained without a passport (``"reference"`` names
            the reference), e.g. ``'{"ft": {"network_name": "small_cnn"}}'``.
        method: supervised study: ``gradcam``, ``gradcampp``, ``scorecam`` or ``featuremap``.
        split: supervised study: the datalist split verified on.
        n_splits: supervised study: cross-validation folds.
        one_class: supervised study's one-class mode (the references form the ensemble).
        label: segmentation bundles (supervised study): the label explained (name or channel).
    """
    if labels is not None or one_class:
        from monai_gamverify.verification.bundles import verify_bundles

        ovr = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
        ref_ovr, cand_ovr = ovr.get("reference"), {k: v for k, v in ovr.items() if k != "reference"}
        report = verify_bundles(
            reference, candidates, dataset_dir, out=out, labels=labels, split=split, method=method,
            overrides=ref_ovr, candidate_overrides=cand_ovr or None, n_splits=n_splits, seed=seed,
            device=device, one_class=one_class, references=references, alpha=alpha, label=label,
        )  # fmt: skip
        print(report["summary"])
        if labels is not None and not one_class:  # the labelled zoo also gives a label-free verifier for new models
            from monai_gamverify.apps.suitability import fit_verifier

            lab = json.loads(labels) if isinstance(labels, str) else dict(labels)
            cands = json.loads(candidates) if isinstance(candidates, str) else dict(candidates)
            good = {n: cands[n]["bundle"] if isinstance(cands[n], dict) else cands[n] for n, v in lab.items() if int(v)}
            good = {"reference": reference, **good}
            path = Path(out) / "verifier.json"
            if len(good) < 2:
                print("no verifier.json: it needs the reference and at least one candidate labelled 1")
                return
            try:  # the study is written; a verifier that cannot be fitted is reported, not fatal
                fit_verifier(good, dataset_dir, path, n_images=n_images, device=device, seed=seed, overrides=ovr)
                print(f"verifier for new candidates (label-free, --verifier): {path}")
            except (ValueError, OSError) as err:
                print(f"no verifier.json: {type(err).__name__}: {err}", file=sys.stderr)
        return
    from monai_gamverify.apps.suitability import verify_suitability

    def as_dict(value: Any, what: str) -> dict:
        return {} if value is None else dict(value) if isinstance(value, dict) else json_dict(value, f"--{what}")

    result = verify_suitability(
        reference, as_dict(candidates, "candidates"), dataset_dir, out=out,
        references=as_dict(references, "references"), n_images=n_images, verifier=verifier, alpha=alpha,
        device=device, seed=seed, overrides=as_dict(overrides, "overrides"),
    )  # fmt: skip
    print(result["summary"])
    print(f"table: {result['files']['verdicts_csv']}; report: {result['files']['report']}")


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
            overrides = json_dict(overrides, "--overrides")
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

    Cohorts, seven small bundle models (shipped weights, or ``--train True`` to train them here; one is a shortcut
    model), Grad-CAM explanations, the label-free model verdicts next to one trusted reference, attribution energy,
    the K+1 garbage class and the in-distribution screens; a self-contained
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
                    sub_name, help=command_summary(func), formatter_class=argparse.RawDescriptionHelpFormatter
                )
                add_function_flags(cmd, f"{name} {sub_name}", func, POSITIONAL.get(f"{name} {sub_name}", ()))
                commands[(name, sub_name)] = cmd
            group.set_defaults(_parser=group)
        else:
            cmd = sub.add_parser(
                name, help=command_summary(target), formatter_class=argparse.RawDescriptionHelpFormatter
            )
            add_function_flags(cmd, name, target, POSITIONAL.get(name, ()))
            commands[(name,)] = cmd
    for name, (_, summary) in PASSTHROUGH.items():
        sub.add_parser(name, help=summary, add_help=False)
    parser.set_defaults(_commands=commands)
    return parser


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
    own, passed_on = split_unknown_flags(parser, args)
    ns, extra = parser.parse_known_args(own)
    extra += passed_on
    try:
        show_result(call_command(ns, extra))
    except (ValueError, OSError) as err:  # the user's input (a file, a setting): one line, no traceback
        # (PreprocessingError, DataError, ScreenFileError, ImageReadError are ValueErrors); GAMVERIFY_TRACEBACK=1: raise
        if os.environ.get("GAMVERIFY_TRACEBACK"):
            raise
        message = " ".join(str(err).split())
        print(f"ERROR: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
