"""Model-suitability verification from MONAI bundles: a reference bundle, candidate bundles and a datalist in, a
report directory out (the ``gamverify verify`` command and ``sos_staging/configs/verify.json``).

Every model sees the same inputs: the datalist split is loaded once with the **reference bundle's** inference
``preprocessing`` and fed to the reference and to every candidate; the rest is
:func:`~.workflow.run_verification`.

Segmentation bundles (model-zoo form, e.g. ``spleen_ct_segmentation``) are verified on the Seg-Grad-CAM of one label
(:class:`~.workflow.SegmentationTarget`, through each bundle's own inferer); the similarity features, verifier and
verdicts are the same. One run holds bundles of one task: segmentation or classification.

Example:
    >>> report = verify_bundles(
    ...     "bundles/sos_staging",
    ...     {"sos_b": "runs/sos_b", "chin": "runs/chin"},
    ...     "data/sos",
    ...     labels={"sos_b": 1, "chin": 0},
    ...     overrides={"network_name": "small_cnn"},
    ...     candidate_overrides={"*": {"network_name": "small_cnn"}, "chin": {"num_classes": 2}},
    ... )
"""

from __future__ import annotations

import ast
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.data import DataLoader, Dataset

from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.io.names import OutputNamer
from monai_gamverify.verification.oneclass import run_one_class
from monai_gamverify.verification.workflow import (
    SegmentationTarget,
    run_verification,
    target_info,
    verification_method,
)

__all__ = ["verify_bundles", "format_summary", "check_same_task", "check_leave_models_out"]

logger = logging.getLogger(__name__)

_CHECKPOINT_KEYS = ("checkpoint", "ckpt_path")


def _parse(value: Any, what: str) -> Any:
    """A dict given as a dict, a JSON/Python-literal string or a path to a JSON file (python-fire passes any)."""
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, (str, os.PathLike)):
        text = str(value).strip()
        if not text.startswith("{") and Path(text).is_file():
            text = Path(text).read_text()
        for loader in (json.loads, ast.literal_eval):
            try:
                parsed = loader(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, Mapping):
                return parsed
        raise ValueError(f"{what} must be a dict or a JSON object string, got {value!r}")
    raise TypeError(f"{what} must be a dict or a JSON object string, got {type(value).__name__}")


def _split_overrides(overrides: Mapping | None) -> tuple[dict, str | None]:
    """Config overrides without the checkpoint key, and the checkpoint path (``checkpoint`` or ``ckpt_path``)."""
    cfg = dict(overrides or {})
    ckpt = None
    for key in _CHECKPOINT_KEYS:
        if key in cfg:
            value = cfg.pop(key) if key == "checkpoint" else cfg[key]
            ckpt = ckpt or (str(value) if value is not None else None)
    return cfg, ckpt


def _load(role: str, root: Any, overrides: Mapping | None, device: str | None) -> Any:

    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{role} bundle not found: {path}")
    cfg, ckpt = _split_overrides(overrides)
    try:
        return load_bundle(path, checkpoint=ckpt, device=device, require_weights=True, overrides=cfg)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{role} bundle {path}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{role} bundle {path}: {err}") from err


def _candidate_specs(
    candidates: Mapping[str, Any],
    labels: Mapping[str, Any] | None,
    candidate_overrides: Mapping[str, Any],
    require_label: bool = True,
    other_names: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Normalise candidates to ``{name: {"bundle", "label", "overrides"}}`` and check names and labels.

    ``require_label=False`` (one-class mode, reference ensembles) lets a label be missing (``None``);
    ``other_names`` are further names that ``candidate_overrides`` may use (the one-class references).
    """
    if not candidates:
        raise ValueError("no candidate bundles: pass candidates={name: bundle_dir, ...}")
    labels = dict(labels or {})
    unknown = sorted(set(labels) - set(candidates))
    if unknown:
        raise ValueError(f"labels name unknown candidate(s) {unknown}; candidates are {sorted(candidates)}")
    unknown = sorted(set(candidate_overrides) - set(candidates) - set(other_names) - {"*"})
    if unknown:
        raise ValueError(
            f"candidate_overrides name unknown candidate(s) {unknown}; candidates are {sorted(candidates)}"
        )
    specs = {}
    for name, spec in candidates.items():
        spec = dict(spec) if isinstance(spec, Mapping) else {"bundle": spec}
        if "bundle" not in spec:
            raise ValueError(f"candidate {name!r}: a dict spec needs a 'bundle' path, got {spec!r}")
        label = labels.get(name, spec.get("label"))
        if label is None and require_label:
            raise ValueError(f"candidate {name!r} has no label: pass labels={{{name!r}: 1 or 0, ...}}")
        if label is not None and (isinstance(label, bool) or int(label) not in (0, 1) or int(label) != label):
            raise ValueError(f"candidate {name!r}: label must be 1 (suitable) or 0 (not), got {label!r}")
        ovr = {**dict(candidate_overrides.get("*", {})), **dict(candidate_overrides.get(name, {}))}
        ovr.update(spec.get("overrides", {}) or {})
        if spec.get("checkpoint") is not None:
            ovr["checkpoint"] = spec["checkpoint"]
        specs[str(name)] = {"bundle": spec["bundle"], "label": None if label is None else int(label), "overrides": ovr}
    return specs


def check_leave_models_out(labels: Mapping[str, int]) -> None:
    """Refuse a supervised study whose per-model verdicts could not be leave-models-out.

    With fewer than two candidate models of a label, the forest cannot be cross-validated with folds grouped by model;
    subject-grouped folds would put every model in every training fold and the verdicts would repeat the labels
    given (the forest learns which model a row comes from). No silent fallback: the user gets the reason and the
    two ways out.

    Raises:
        ValueError: naming the count of models per label.
    """
    per_label = {lab: sum(1 for v in labels.values() if v == lab) for lab in (0, 1)}
    if min(per_label.values()) < 2:
        raise ValueError(
            f"per-model verdicts of the supervised study need leave-models-out folds, i.e. at least 2 candidates of "
            f"each label; got {per_label[1]} labelled 1 and {per_label[0]} labelled 0. Add labelled candidates, or "
            "drop --labels for the label-free verdict (one reference is enough)"
        )


def check_same_task(tasks: Mapping[str, str]) -> str:
    """The one task (``"segmentation"`` or ``"classification"``) of the bundles of a run; a clear error when they mix.

    Args:
        tasks: ``{role: task}``, e.g. ``{"reference": "segmentation", "candidate 'chin'": "classification"}``.

    Returns:
        The common task.

    Raises:
        ValueError: when segmentation and classification bundles are mixed (names which bundle is which).

    Example:
        >>> check_same_task({"reference": "segmentation", "candidate 'b'": "segmentation"})
        'segmentation'
    """
    kinds = sorted(set(tasks.values()))
    if len(kinds) > 1:
        by_task = "; ".join(f"{k}: {', '.join(r for r, t in tasks.items() if t == k)}" for k in kinds)
        raise ValueError(
            "segmentation and classification bundles cannot be verified in one run (their maps explain different "
            f"targets): {by_task}"
        )
    if not kinds:
        raise ValueError("no bundles")
    return kinds[0]


def _targets_line(report: Mapping[str, Any]) -> str | None:
    """One line naming the explained label(s) of a segmentation run, or None."""
    labels = report.get("seg_labels")
    if not labels:
        return None
    distinct = sorted(set(labels.values()))
    if len(distinct) == 1:
        return f"segmentation bundles: Seg-Grad-CAM of label {distinct[0]}"
    return "segmentation bundles: Seg-Grad-CAM of labels " + ", ".join(f"{n} {v}" for n, v in labels.items())


def format_summary(report: Mapping[str, Any]) -> str:
    """Short text summary of a :func:`verify_bundles` / ``run_verification`` report, each figure with its protocol.

    Args:
        report: the returned dict (``per_model``, ``cv_mean``, ``protocol``, ``cv_secondary``, ``out_dir``; a
            one-class report has ``one_class`` and per-model ``p_value``).

    Returns:
        A few lines: per-model label, mean out-of-fold P(suitable) with its bootstrap interval and verdict (or the
        conformal p-value in one-class mode), cross-validation scores named by protocol, report directory.

    Example:
        >>> print(format_summary(report))
    """
    protocol = report.get("protocol", "subject-grouped")
    if report.get("one_class"):
        lines = [
            f"one-class verification ({protocol}); conformal p-value against {report.get('n_references', '?')} "
            f"reference models, alpha {report.get('alpha', 0.1):g}"
        ]
        if _targets_line(report):
            lines.append(_targets_line(report))
        lines.append(f"{'model':<24} {'label':>5} {'p-value':>8} {'score':>8}  verdict")
        for name, info in report["per_model"].items():
            lab = "?" if info.get("label") is None else str(info["label"])
            lines.append(f"{name:<24} {lab:>5} {info['p_value']:>8.3f} {info['score']:>8.3f}  {info['verdict']}")
        if report.get("model_level_roc_auc") is not None:
            lines.append(f"model-level ROC AUC ({protocol}): {report['model_level_roc_auc']:.3f}")
        lines.append(f"report: {report['out_dir']}")
        return "\n".join(lines)
    lines = [f"{'model':<16} {'label':>5} {'mean P(suitable)':>17} {'95% CI':>16}  verdict ({protocol}, out-of-fold)"]
    if _targets_line(report):
        lines.insert(0, _targets_line(report))
    for name, info in report["per_model"].items():
        ci = f"[{info['ci_low']:.3f}, {info['ci_high']:.3f}]" if "ci_low" in info else ""
        lines.append(
            f"{name:<16} {info['label']:>5} {info['mean_p_suitable']:>17.3f} {ci:>16}  {info.get('verdict', '')}"
        )
    cv = report.get("cv_mean", {})
    scores = ", ".join(f"{k} {cv[k]:.3f}" for k in ("accuracy", "roc_auc_oof", "f1") if k in cv and cv[k] == cv[k])
    lines.append(f"cross-validation, {protocol} ({report.get('n_splits', '?')} folds requested): {scores}")
    if cv.get("roc_auc_model") == cv.get("roc_auc_model") and "roc_auc_model" in cv:
        lines.append(f"model-level ROC AUC ({protocol}): {cv['roc_auc_model']:.3f}")
    sec = report.get("cv_secondary")
    if sec:
        m = sec["mean"]
        lines.append(
            f"secondary, {sec['protocol']} (a model's rows in training and test folds): "
            + ", ".join(f"{k} {m[k]:.3f}" for k in ("accuracy", "roc_auc_oof", "f1") if k in m)
        )
    lines.append(f"report: {report['out_dir']}")
    return "\n".join(lines)


def _task_fields(task: str, models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``task`` and, for segmentation, ``seg_labels`` (model -> "name (channel i)") of a report."""
    fields: dict[str, Any] = {"task": task}
    if task == "segmentation":
        fields["seg_labels"] = {
            n: f"{m['seg_label']} (channel {m['seg_label_index']})" for n, m in models.items() if "seg_label" in m
        }
    return fields


def verify_bundles(
    reference: str,
    candidates: dict[str, str] | str,
    dataset_dir: str,
    out: str = "verify_out",
    labels: dict[str, int] | str | None = None,
    split: str = "test",
    method: str = "gradcam",
    overrides: dict | None = None,
    candidate_overrides: dict[str, dict] | None = None,
    n_splits: int = 5,
    seed: int = 0,
    max_items: int | None = None,
    progress: bool = True,
    device: str | None = None,
    datalist: str | None = None,
    batch_size: int = 1,
    n_estimators: int = 200,
    one_class: bool = False,
    references: dict[str, str] | str | None = None,
    alpha: float = 0.1,
    k: int = 3,
    label: int | str | None = None,
) -> dict:
    """Verify candidate bundles against a reference bundle on one datalist split and write a report directory.

    Loads every bundle with :func:`monai_gamverify.bundle.load_bundle` (``configs/inference.json``, trained weights
    required), builds one ``DataLoader`` over ``dataset_dir``'s datalist split with the reference bundle's inference
    ``preprocessing`` (items keep ``"id"``), and calls :func:`~.workflow.run_verification` with each
    bundle's ``target_layer`` (``method="featuremap"``: its ``feature_layers[0]``). Logs a short summary
    (``report["summary"]``; ``gamverify verify`` prints it).

    Segmentation bundles (``BundleModel.task == "segmentation"``) are verified on the Seg-Grad-CAM of ``label``
    (sum of the label's logits over its predicted mask, through the bundle's own inferer, window by window for a
    ``SlidingWindowInferer``); ``featuremap`` is unchanged. All bundles of a run must share the task.

    Args:
        reference: reference bundle directory.
        candidates: ``{name: bundle_dir}`` (or ``{name: {"bundle": dir, "label": 0|1, "overrides": {...},
            "checkpoint": path}}``), as a dict, a JSON string or a JSON file path.
        dataset_dir: cohort directory holding ``datalist.json``.
        out: report directory (see ``run_verification`` for the files).
        labels: ``{name: 1 (trained on similar data) | 0 (not)}``, dict or JSON string; overrides labels in
            ``candidates``.
        split: datalist list to verify on (``training``, ``validation``, ``test``).
        method: ``"gradcam"``, ``"gradcampp"``, ``"scorecam"`` (Method 1) or ``"featuremap"`` (Method 2).
        overrides: config overrides of the **reference** bundle, e.g. ``{"network_name": "small_cnn"}``; the key
            ``checkpoint`` (or ``ckpt_path``) selects its weights file (default ``models/model.pt``).
        candidate_overrides: ``{name: overrides}`` per candidate, same keys as ``overrides``; ``"*"`` applies to
            every candidate (a candidate's own entry wins).
        n_splits: cross-validation folds.
        seed: seed of the forest and folds.
        max_items: verify on the first ``max_items`` items of the split only.
        progress: progress bars.
        device: device of every model (default: CUDA when available, else CPU).
        datalist: datalist JSON (default ``<dataset_dir>/datalist.json``).
        batch_size: batch size of the data loader.
        n_estimators: trees of the verifier's random forest.
        one_class: one-class mode (no unsuitable model needed): the reference bundle and ``references`` form the
            reference ensemble, each candidate gets a conformal p-value against it
            (:func:`monai_gamverify.verification.oneclass.run_one_class`); ``labels`` are optional then (used only
            for a model-level ROC AUC). Same report files (``cv.json`` names the one-class protocol).
        references: one-class mode: further reference bundles ``{name: bundle_dir}`` (models for the same task:
            other seeds or architectures; the ensemble needs >= 2 models, and ``1 / (n + 1) <= alpha`` to reject).
            ``candidate_overrides`` may name them.
        alpha: one-class mode: significance level of the verdict ("not suitable" when p <= alpha).
        k: one-class mode: neighbours of the nonconformity score.
        label: segmentation bundles: the label explained, by ``channel_def`` name (``"spleen"``) or output channel,
            resolved in each bundle. Default: the first foreground channel, i.e. channel 1 (channel 0 is the
            background) for a softmax output, channel 0 for a sigmoid (multi-label) one; the choice is logged.
            Classification bundles take no label (each sample's predicted class is explained).

    Returns:
        The ``run_verification`` dict (``out_dir``, ``files``, ``cv_mean``, ``per_model``) plus ``reference``,
        ``candidates`` (name -> bundle, label, layer; for segmentation also ``task``, ``seg_label``,
        ``seg_label_index``), ``task``, ``seg_labels`` (segmentation: name -> ``"spleen (channel 1)"``),
        ``n_items``, ``n_splits`` and ``summary`` (printed text).

    Raises:
        FileNotFoundError: a missing bundle or missing trained weights (message names the bundle).
        ValueError: a label for an unknown candidate, a candidate without label, a bad method, an unknown
            segmentation ``label`` (names the bundle's labels), segmentation and classification bundles mixed, a
            ``label`` with classification bundles.
        monai_gamverify.data.datalist.DataError: missing dataset directory/datalist or an empty split.

    Example:
        >>> verify_bundles("bundles/sos_staging", '{"sos_b": "runs/sos_b", "chin": "runs/chin"}', "data/sos",
        ...                labels='{"sos_b": 1, "chin": 0}', overrides={"network_name": "small_cnn"},
        ...                candidate_overrides={"*": {"network_name": "small_cnn"}})
    """

    method = verification_method(method)
    cands = _parse(candidates, "candidates")
    refs_in = _parse(references, "references") or {}
    if one_class and not refs_in:
        raise ValueError(
            "one_class=True needs references={name: bundle_dir, ...} (the reference bundle plus >= 1 more)"
        )
    if refs_in and not one_class:
        raise ValueError("references are used in one-class mode only: pass one_class=True")
    cand_ovr = _parse(candidate_overrides, "candidate_overrides") or {}
    specs = _candidate_specs(
        cands or {}, _parse(labels, "labels"), cand_ovr, require_label=not one_class, other_names=tuple(refs_in)
    )
    ref_specs = (
        _candidate_specs(refs_in, None, cand_ovr, require_label=False, other_names=tuple(cands or {}))
        if refs_in
        else {}
    )
    clash = sorted(set(ref_specs) & {"reference"})
    if clash:
        raise ValueError("the name 'reference' is taken by the reference bundle; rename that reference")
    if not one_class:
        check_leave_models_out({n: s["label"] for n, s in specs.items()})
    overrides = _parse(overrides, "overrides")

    # data first: a bad dataset fails before any model is built
    dl_path = Path(datalist) if datalist is not None else Path(dataset_dir) / "datalist.json"
    items = load_datalist(
        dl_path, split, dataset_dir=dataset_dir, spatial_dims=None, require_label=False, check="exists"
    )
    if max_items is not None:
        items = items[: int(max_items)]
    if not items:
        raise ValueError(f"no items to verify on (split {split!r}, max_items={max_items})")
    namer = OutputNamer()  # unique ids (they group the folds): case_0/CT and case_1/CT (DICOM dirs) are two samples
    for i, item in enumerate(items):
        item.setdefault("id", namer(item["image"]) or str(i))

    ref = _load("reference", reference, overrides, device)

    def layer_of(bm: Any, role: str) -> str:
        if method == "featuremap":
            if not bm.feature_layers:
                raise ValueError(f"{role} bundle {bm.root} declares no feature_layers (needed for method='featuremap')")
            return bm.feature_layers[0]
        if not bm.target_layer:
            raise ValueError(f"{role} bundle {bm.root} declares no cam_layer / target_layer")
        return bm.target_layer

    tasks = {"reference": ref.task}
    if label is not None and tasks["reference"] != "segmentation":
        raise ValueError(
            f"label={label!r} selects the explained label of segmentation bundles; the reference bundle {ref.root} is "
            "a classification bundle (its CAMs explain each sample's predicted class)"
        )

    def model_of(bm: Any, role: str) -> Any:
        """The network, or a SegmentationTarget of ``label`` for a segmentation bundle; one task per run."""
        tasks[role] = bm.task
        check_same_task(tasks)
        if tasks[role] != "segmentation":
            return bm.network
        try:
            target = SegmentationTarget(bm, label)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{role} bundle {bm.root}: {err}") from err
        logger.info(
            "%s bundle: Seg-Grad-CAM of label %r (channel %d)%s",
            role,
            target.name,
            target.index,
            " (default: the first foreground channel; pass label= to choose)" if target.default else "",
        )
        return target

    ref_layer = layer_of(ref, "reference")
    ref_model = model_of(ref, "reference")
    models: dict[str, tuple] = {}
    info: dict[str, dict] = {}
    for name, spec in specs.items():
        role = f"candidate {name!r}"
        bm = _load(role, spec["bundle"], spec["overrides"], device)
        layer = layer_of(bm, role)
        model = model_of(bm, role)
        models[name] = (model, layer, spec["label"])
        info[name] = {"bundle": str(bm.root), "label": spec["label"], "layer": layer, **target_info(model)}
    if not one_class and len({s["label"] for s in specs.values()}) < 2:
        raise ValueError(f"candidates need both labels 1 (suitable) and 0 (not) for the verifier, got {info}")

    preprocessing = ref.preprocessing()
    if preprocessing is None:
        raise ValueError(f"reference bundle {ref.root} defines no inference 'preprocessing'")
    loader = DataLoader(Dataset(items, transform=preprocessing), batch_size=int(batch_size), shuffle=False)
    if one_class:
        ensemble = {"reference": (ref_model, ref_layer)}
        ref_info = {"reference": {"bundle": str(ref.root), "layer": ref_layer, **target_info(ref_model)}}
        for name, spec in ref_specs.items():
            role = f"reference {name!r}"
            bm = _load(role, spec["bundle"], spec["overrides"], device)
            ensemble[name] = (model_of(bm, role), layer_of(bm, role))
            ref_info[name] = {"bundle": str(bm.root), "layer": ensemble[name][1], **target_info(ensemble[name][0])}
        report = run_one_class(
            ensemble,
            {n: m[:2] for n, m in models.items()},
            loader,
            out,
            labels={n: s["label"] for n, s in specs.items() if s["label"] is not None},
            method=method,
            alpha=float(alpha),
            k=int(k),
            progress=progress,
        )
        report.update(reference=ref_info, candidates=info, n_items=len(items))
        report.update(_task_fields(tasks["reference"], {**ref_info, **info}))
        report["summary"] = format_summary(report)
        logger.info("%s", report["summary"])
        return report
    report = run_verification(
        reference=(ref_model, ref_layer),
        candidates=models,
        data=loader,
        out_dir=out,
        method=method,
        n_splits=int(n_splits),
        seed=int(seed),
        n_estimators=int(n_estimators),
        progress=progress,
    )
    report.update(
        reference={"bundle": str(ref.root), "layer": ref_layer, **target_info(ref_model)},
        candidates=info,
        n_items=len(items),
        n_splits=int(n_splits),
    )
    report.update(_task_fields(tasks["reference"], {"reference": report["reference"], **info}))
    report["summary"] = format_summary(report)
    logger.info("%s", report["summary"])
    return report
