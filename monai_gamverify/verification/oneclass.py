"""One-class suitability verification: reference models only, no unsuitable model needed, a conformal p-value.

A user with one trusted model, a few more models for the same task (other seeds or architectures; together the
*reference ensemble*, >= 2 models) and a new candidate has no unsuitable models to train a classifier on. The
reference ensemble defines what "suitable" looks like: for each model ``j`` of the set ``S = references ∪
{candidate}``, its maps on the dataset are compared with the **mean map of the other models of S** (leave one out)
by the similarity features, and averaged over the samples into a model-level feature vector ``z_j``. The
nonconformity score ``s_j`` is the mean distance from ``z_j`` to its ``k`` nearest other vectors of ``S`` (features
standardised by their spread over ``S``). Every step is a symmetric function of the set, so when the candidate is
exchangeable with the references (suitable like them), its rank among the ``|S|`` scores is uniform and

    p = #{j in S : s_j >= s_candidate} / |S|

is a valid conformal p-value: P(p <= alpha) <= alpha for every alpha (exactly uniform on {1/|S|, ..., 1} for
continuous scores). A small p means the candidate's attention differs from the reference ensemble more than the
references differ from each other. The smallest attainable p is ``1 / |S|``: rejecting at ``alpha`` needs
``|S| >= 1 / alpha`` (e.g. 9 references for alpha = 0.1).

Verdicts: ``"not suitable"`` when ``p <= alpha``, else ``"consistent"`` (no evidence against suitability: the
candidate behaves like the references; this is not a proof of suitability).

Example:
    >>> res = one_class_verify({"trusted": cam0, "seed1": cam1, "resnet": cam2}, {"new": cam_new}, loader)
    >>> res.verdicts[["model", "p_value", "verdict"]]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from monai_gamverify.io import affine_of, write_csv, write_json
from monai_gamverify.metrics.similarity import similarity_metrics
from monai_gamverify.verification.reference import (
    MapFn,
    ReferenceMap,
    batch_ids,
    batch_image,
    plain_tensor,
    progress_bar,
)
from monai_gamverify.verification.tables import feature_columns, summary_table
from monai_gamverify.verification.verifier import roc_png
from monai_gamverify.verification.workflow import map_fn, target_info

__all__ = [
    "ONE_CLASS_PROTOCOL",
    "conformal_pvalue",
    "nonconformity_scores",
    "OneClassResult",
    "one_class_verify",
    "run_one_class",
]

ONE_CLASS_PROTOCOL = "one-class conformal (leave-one-model-out mean maps over references + candidate)"


def nonconformity_scores(z: np.ndarray, k: int = 3) -> np.ndarray:
    """Nonconformity of each row of ``z`` among all rows: mean Euclidean distance to its ``k`` nearest other rows,
    after standardising each column by its standard deviation over the rows (a symmetric function of the set).

    Args:
        z: (n_models, n_features) model-level feature vectors, n_models >= 2.
        k: neighbours (clipped to n_models - 1).

    Returns:
        (n_models,) scores; larger = less like the others.

    Example:
        >>> nonconformity_scores(np.array([[0.0], [0.1], [0.2], [3.0]]), k=1)[-1]   # the outlier scores highest
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be (n_models >= 2, n_features), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("model-level features contain NaN or infinite values")
    scale = z.std(axis=0)
    zs = (z - z.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    d = np.sqrt(((zs[:, None, :] - zs[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    kk = int(min(max(k, 1), z.shape[0] - 1))
    return np.sort(d, axis=1)[:, :kk].mean(axis=1)


def conformal_pvalue(scores: Sequence[float] | np.ndarray, index: int = -1) -> float:
    """Conformal p-value of ``scores[index]`` among all scores (itself included): share of scores >= it.

    Example:
        >>> conformal_pvalue([0.1, 0.2, 0.3, 0.9])     # the last one is the largest of 4
        0.25
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size < 2 or not np.isfinite(s).all():
        raise ValueError(f"need >= 2 finite scores, got {s}")
    return float(np.mean(s >= s[index]))


@dataclass
class OneClassResult:
    """Result of :func:`one_class_verify`.

    Attributes:
        verdicts: one row per candidate: ``model, label, p_value, score, n_set, verdict``.
        features: per-sample features of every model of every candidate's set against its leave-one-out mean map
            (``candidate`` = whose set, ``role`` = "reference" or "candidate").
        model_features: the model-level vectors (mean over samples) with ``candidate``, ``role``, ``score``.
        params: settings (alpha, k, metrics, references, protocol).
        reference: mean map of the references (a :class:`ReferenceMap`), for the report.
    """

    verdicts: pd.DataFrame
    features: pd.DataFrame
    model_features: pd.DataFrame
    params: dict[str, Any]
    reference: ReferenceMap


def _check_fns(name: str, fns: Mapping[str, MapFn]) -> None:
    if not isinstance(fns, Mapping):
        raise TypeError(f"{name} must be a mapping name -> map function, got {type(fns).__name__}")
    for k, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"{name}[{k!r}] must be callable (x -> (B, 1, *spatial) maps in [0, 1])")


def one_class_verify(
    references: Mapping[str, MapFn],
    candidates: Mapping[str, MapFn],
    data: Iterable[Mapping[str, Any]],
    *,
    labels: Mapping[str, int | None] | None = None,
    alpha: float = 0.1,
    k: int = 3,
    metrics: Sequence[str] | None = None,
    slice_axis: int | None = None,
    image_key: str = "image",
    id_key: str = "id",
    subject_key: str = "subject",
    progress: bool = True,
) -> OneClassResult:
    """Conformal one-class verification of candidate models against a reference ensemble (two passes over data).

    A candidate that is also a reference (same name) is tested against the other references (leave one out), so
    the same call evaluates the references themselves.

    Args:
        references: ``{name: map function}`` of the reference models (>= 2), e.g. ``GradCAM(net, layer)`` with
            ``normalize=True`` maps in [0, 1] on one common grid (CAMs are upsampled to the input).
        candidates: ``{name: map function}`` of the models to test.
        data: re-iterable batches (``DataLoader`` or list of batch dicts) with ``image_key`` and optional
            ``id_key`` / ``subject_key``.
        labels: optional ``{candidate: 1 | 0}`` (known truth, for the model-level AUC only).
        alpha: significance level of the verdict.
        k: neighbours of the nonconformity score.
        metrics: similarity features (default: the study's seven).
        slice_axis: features per 2D slice along this spatial axis.
        image_key: image key in the batches.
        id_key: sample-id key.
        subject_key: subject-id key.
        progress: progress bars.

    Returns:
        :class:`OneClassResult`.

    Example:
        >>> res = one_class_verify({"a": cam_a, "b": cam_b, "c": cam_c}, {"new": cam_new}, loader, alpha=0.25)
    """
    _check_fns("references", references)
    _check_fns("candidates", candidates)
    if len(references) < 2:
        raise ValueError(f"one-class mode needs >= 2 reference models, got {len(references)}")
    if not candidates:
        raise ValueError("no candidate model given")
    if iter(data) is data:
        raise TypeError("data is read twice (mean maps, then features): pass a DataLoader or a list, not an iterator")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    labels = dict(labels or {})
    unknown = sorted(set(labels) - set(candidates))
    if unknown:
        raise ValueError(f"labels name unknown candidate(s) {unknown}")
    fns = {**references, **candidates}
    sets = {c: [r for r in references if r != c] + [c] for c in candidates}
    for c, members in sets.items():
        if len(members) < 3:
            raise ValueError(f"candidate {c!r}: its set has {len(members)} models; needs >= 2 references besides it")

    # pass 1: each model's sum of maps
    sums: dict[str, ReferenceMap] = {n: ReferenceMap() for n in fns}
    first = None
    for batch in progress_bar(data, progress, "one-class: mean maps"):
        x = batch_image(batch, image_key)
        if first is None:
            first = x
        for n, fn in fns.items():
            sums[n].update(fn(x))
    if first is None:
        raise ValueError("data yielded no batches")
    count = sums[next(iter(fns))].count
    total_ref = sum(sums[r]._sum for r in references)

    def loo_mean(c: str, j: str) -> torch.Tensor:
        members = sets[c]
        total = total_ref if c in references else total_ref + sums[c]._sum
        return ((total - sums[j]._sum) / ((len(members) - 1) * count)).float()

    loo = {(c, j): loo_mean(c, j) for c, members in sets.items() for j in members}
    # pass 2: per-sample features of every set member against its leave-one-out mean
    rows: list[dict[str, Any]] = []
    seen = 0
    for batch in progress_bar(data, progress, "one-class: features"):
        x = batch_image(batch, image_key)
        n = int(x.shape[0])
        sample_ids = batch_ids(batch, id_key, n, list(range(seen, seen + n)))
        subject_ids = batch_ids(batch, subject_key, n, sample_ids)
        seen += n
        maps = {name: plain_tensor(fn(x)).detach().float() for name, fn in fns.items()}
        for c, members in sets.items():
            for j in members:
                ref = loo[(c, j)].to(maps[j].device)
                if ref.shape[1:] != maps[j].shape[1:]:
                    raise ValueError(
                        f"maps of {j!r} have shape {tuple(maps[j].shape)}, its set's mean {tuple(ref.shape)}"
                    )
                feats = similarity_metrics(maps[j], ref, slice_axis=slice_axis, metrics=metrics)
                vals = {f: v.detach().double().cpu().numpy() for f, v in feats.items()}
                role = "candidate" if j == c else "reference"
                for i in range(n):
                    row = {"sample_id": sample_ids[i], "subject_id": subject_ids[i], "model": j, "candidate": c,
                           "role": role, "label": labels.get(c) if j == c else 1}  # fmt: skip
                    row.update({f: float(v[i]) for f, v in vals.items()})
                    rows.append(row)
    features = pd.DataFrame(rows)
    features["label"] = features["label"].astype("Int64")
    cols = feature_columns(features)

    model_rows, verdict_rows = [], []
    for c, members in sets.items():
        part = features[features["candidate"] == c]
        z = part.groupby("model", sort=False)[cols].mean().loc[members]
        scores = nonconformity_scores(z.to_numpy(), k=k)
        p = conformal_pvalue(scores, index=members.index(c))
        for j, s in zip(members, scores):
            model_rows.append({"candidate": c, "model": j, "role": "candidate" if j == c else "reference",
                               "score": float(s), **z.loc[j].to_dict()})  # fmt: skip
        verdict_rows.append(
            {
                "model": c,
                "label": labels.get(c),
                "p_value": p,
                "score": float(scores[members.index(c)]),
                "n_set": len(members),
                "verdict": "not suitable" if p <= alpha else "consistent",
            }
        )
    verdicts = pd.DataFrame(verdict_rows)
    verdicts["label"] = verdicts["label"].astype("Int64")
    ref_map = ReferenceMap()
    ref_map._sum, ref_map.count = total_ref, count * len(references)
    ref_map.affine = affine_of(first) if hasattr(first, "affine") else None
    ref_map.background = plain_tensor(first)[0, 0].detach().float().cpu()
    params = {
        "protocol": ONE_CLASS_PROTOCOL,
        "alpha": alpha,
        "k": k,
        "features": cols,
        "references": list(references),
        "min_p_value": {c: 1.0 / len(m) for c, m in sets.items()},
    }
    return OneClassResult(verdicts, features, pd.DataFrame(model_rows), params, ref_map)


def _model_auc(verdicts: pd.DataFrame) -> float | None:
    """ROC AUC over labelled candidates of p-value (high p = suitable); None without both labels."""
    from sklearn.metrics import roc_auc_score

    known = verdicts[verdicts["label"].notna()]
    y = known["label"].astype(int).to_numpy()
    if len(np.unique(y)) < 2:
        return None
    # p-values tie at the floor; break ties by the (continuous) score so that the ranking uses all information
    rank = known["p_value"].to_numpy() - 1e-9 * known["score"].to_numpy()
    return float(roc_auc_score(y, rank))


def run_one_class(
    references: Mapping[str, tuple[torch.nn.Module, str]],
    candidates: Mapping[str, tuple[torch.nn.Module, str]],
    data: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    labels: Mapping[str, int | None] | None = None,
    method: str = "gradcam",
    class_idx: int | None = None,
    alpha: float = 0.1,
    k: int = 3,
    metrics: Sequence[str] | None = None,
    slice_axis: int | None = None,
    progress: bool = True,
    map_transform: Callable[[MapFn], MapFn] | None = None,
    **keys: str,
) -> dict[str, Any]:
    """One-class verification from models and a report directory (the one-class twin of ``run_verification``).

    Written to ``out_dir``: ``features.csv`` (per-sample leave-one-out features of every set), ``model_features.csv``
    (model-level vectors and scores), ``predictions.csv`` and ``verdicts.csv`` (per candidate: p-value, score,
    verdict), ``summary.csv`` (per-role feature statistics), ``cv.json`` (protocol, settings, per-model results,
    model-level ROC AUC when labels of both kinds are given), ``roc.png`` (idem), ``reference_map.*`` (mean map of
    the references).

    Args:
        references: ``{name: (model, layer)}`` of the reference ensemble (>= 2); a segmentation bundle's model is
            a :class:`~monai_gamverify.verification.workflow.SegmentationTarget` (here and in ``candidates``).
        candidates: ``{name: (model, layer)}`` of the models to test.
        data: re-iterable batches.
        out_dir: report directory.
        labels: optional known labels of candidates (1 suitable, 0 not), for the AUC.
        method: ``"gradcam"``, ``"gradcampp"``, ``"scorecam"`` or ``"featuremap"``.
        class_idx: class explained by the CAMs (``None``: each sample's predicted class).
        alpha: significance level.
        k: neighbours of the nonconformity score.
        metrics: similarity features.
        slice_axis: features per 2D slice.
        progress: progress bars.
        map_transform: optional wrapper of every map function (e.g. ``lambda fn: CommonGrid(fn, 4)``).
        **keys: ``image_key`` / ``id_key`` / ``subject_key``.

    Returns:
        Dict ``out_dir, files, protocol, one_class=True, alpha, n_references, per_model`` (name -> label, p_value,
        score, verdict), ``model_level_roc_auc``.

    Example:
        >>> run_one_class({"a": (net_a, "res4"), "b": (net_b, "layer4")}, {"new": (net_new, "res4")}, loader, "out/")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrap = map_transform or (lambda fn: fn)
    refs = {n: wrap(map_fn(m, layer, method, class_idx)) for n, (m, layer) in references.items()}
    cands = {
        n: refs[n] if n in refs else wrap(map_fn(m, layer, method, class_idx)) for n, (m, layer) in candidates.items()
    }
    res = one_class_verify(
        refs, cands, data, labels=labels, alpha=alpha, k=k, metrics=metrics, slice_axis=slice_axis,
        progress=progress, **keys,
    )  # fmt: skip
    files: dict[str, Any] = {f"reference_{k_}": v for k_, v in res.reference.save(out).items()}
    files["features"] = write_csv(res.features, out / "features.csv")
    files["model_features"] = write_csv(res.model_features, out / "model_features.csv")
    files["predictions"] = write_csv(res.verdicts.assign(protocol=ONE_CLASS_PROTOCOL), out / "predictions.csv")
    files["verdicts"] = write_csv(res.verdicts.assign(protocol=ONE_CLASS_PROTOCOL), out / "verdicts.csv")
    files["summary"] = write_csv(summary_table(res.features, label="role"), out / "summary.csv")
    auc = _model_auc(res.verdicts)
    if auc is not None:
        known = res.verdicts[res.verdicts["label"].notna()]
        files["roc"] = roc_png(
            known["label"].astype(int), known["p_value"] - 1e-9 * known["score"], out / "roc.png",
            title=f"one-class ROC over models ({method})",
        )  # fmt: skip
    per_model = {}
    for r in res.verdicts.to_dict(orient="records"):
        name = str(r.pop("model"))
        r["label"] = None if pd.isna(r["label"]) else int(r["label"])
        per_model[name] = r
    report = {
        "method": method,
        "protocol": ONE_CLASS_PROTOCOL,
        "one_class": True,
        "params": res.params,
        "n_samples": int(res.features["sample_id"].nunique()),
        "model_level": {"protocol": ONE_CLASS_PROTOCOL, "roc_auc": auc, "score": "conformal p-value"},
        "models": {
            **{n: {"role": "reference", "layer": layer, **target_info(m)} for n, (m, layer) in references.items()},
            **{n: {"role": "candidate", "layer": layer, **target_info(m)} for n, (m, layer) in candidates.items()},
        },
        "per_model": per_model,
    }
    files["cv"] = write_json(report, out / "cv.json")
    return {
        "out_dir": out,
        "files": files,
        "protocol": ONE_CLASS_PROTOCOL,
        "one_class": True,
        "alpha": alpha,
        "n_references": len(references),
        "per_model": per_model,
        "model_level_roc_auc": auc,
    }
