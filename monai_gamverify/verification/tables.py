"""Feature tables: every candidate model's map of every sample compared with the reference mean map by the
similarity features (:func:`feature_table`), the feature columns of a table (:func:`feature_columns`) and per-label
feature statistics (:func:`summary_table`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from monai_gamverify.io import write_csv
from monai_gamverify.metrics.similarity import ALL_METRICS, similarity_metrics
from monai_gamverify.verification.reference import (
    MapFn,
    ReferenceMap,
    batch_ids,
    batch_image,
    plain_tensor,
    progress_bar,
)

__all__ = [
    "META_COLUMNS",
    "KNOWN_NON_FEATURES",
    "FEATURE_PREFIX",
    "feature_table",
    "feature_columns",
    "summary_table",
]

#: columns of a feature table that are not features
META_COLUMNS = ("sample_id", "subject_id", "model", "label")
#: numeric columns that other tables of this package add beside the features (never features, never "unknown")
KNOWN_NON_FEATURES = ("fold", "p_suitable", "p_value", "score", "n_rows")
#: declared prefix of feature columns other than the similarity metric names
FEATURE_PREFIX = "feat_"
logger = logging.getLogger(__name__)


def feature_table(
    reference: ReferenceMap | torch.Tensor,
    candidates: Mapping[str, tuple[MapFn, int | None]],
    data: Iterable[Mapping[str, Any]],
    *,
    image_key: str = "image",
    id_key: str = "id",
    subject_key: str = "subject",
    slice_axis: int | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
    path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Similarity features of every (sample, candidate model) map against the reference map, batch by batch.

    Only one batch of maps per candidate is alive at a time; the table itself holds scalars only.

    Args:
        reference: a :class:`ReferenceMap` or a (1, 1, *spatial) map in [0, 1].
        candidates: ``{model name: (map function, label)}``; the map function is ``x -> (B, 1, *spatial)`` in
            [0, 1] (a CAM object, :class:`~monai_gamverify.visualize.FeatureMap`); label 1 = suitable (trained on
            similar data), 0 = not, ``None`` = unknown (inference).
        data: iterable of batch dicts with ``image_key`` (B, C, *spatial) and optional ``id_key`` / ``subject_key``
            (default ids: running sample index; default subject: the sample id).
        image_key: key of the image.
        id_key: key of the sample id.
        subject_key: key of the subject/volume id (used to group cross-validation folds).
        slice_axis: compute the features per 2D slice along this spatial axis (see ``similarity_metrics``).
        metrics: feature names (default ``similarity.DEFAULT_METRICS``, the study's seven).
        progress: show a progress bar.
        path: also write the table as CSV there.

    Returns:
        DataFrame with ``sample_id, subject_id, model, label`` and one column per feature.

    Example:
        >>> table = feature_table(ref, {"sos_r18": (GradCAM(r18, "layer4"), 1), "chin": (GradCAM(c, "layer4"), 0)},
        ...                       loader)
    """

    ref = reference.value if isinstance(reference, ReferenceMap) else reference
    if not isinstance(ref, torch.Tensor) or ref.ndim not in (4, 5) or ref.shape[:2] != (1, 1):
        raise ValueError(
            f"reference must be a ReferenceMap or a (1, 1, *spatial) tensor, got {getattr(ref, 'shape', ref)}"
        )
    ref = plain_tensor(ref).float()
    if not candidates:
        raise ValueError("no candidate model given")
    for name, spec in candidates.items():
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and callable(spec[0])):
            raise TypeError(f"candidate {name!r} must be (map function, label), got {spec!r}")
        if spec[1] not in (0, 1, None):
            raise ValueError(f"label of candidate {name!r} must be 1 (suitable), 0 (not) or None, got {spec[1]!r}")
    rows: list[dict[str, Any]] = []
    seen = 0
    for batch in progress_bar(data, progress, "feature table"):
        x = batch_image(batch, image_key)
        n = int(x.shape[0])
        sample_ids = batch_ids(batch, id_key, n, list(range(seen, seen + n)))
        subject_ids = batch_ids(batch, subject_key, n, sample_ids)
        seen += n
        for name, (fn, label) in candidates.items():
            maps = plain_tensor(fn(x)).detach()
            if tuple(maps.shape[1:]) != tuple(ref.shape[1:]) or maps.shape[0] != n:
                raise ValueError(
                    f"maps of candidate {name!r} have shape {tuple(maps.shape)}; expected ({n}, "
                    f"*{tuple(ref.shape[1:])}) like the reference map"
                )
            feats = similarity_metrics(maps.float(), ref.to(maps.device), slice_axis=slice_axis, metrics=metrics)
            values = {k: v.detach().double().cpu().numpy() for k, v in feats.items()}
            for i in range(n):
                row = {"sample_id": sample_ids[i], "subject_id": subject_ids[i], "model": name, "label": label}
                row.update({k: float(v[i]) for k, v in values.items()})
                rows.append(row)
    if not rows:
        raise ValueError("data yielded no batches: the feature table is empty")
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype("Int64")  # nullable: unknown labels stay <NA>
    if path is not None:
        write_csv(table, path)
    return table


def feature_columns(
    table: pd.DataFrame,
    features: Sequence[str] | None = None,
    *,
    prefix: str | Sequence[str] = FEATURE_PREFIX,
    strict: bool = False,
) -> list[str]:
    """The feature columns of ``table``, declared, never guessed from the dtype.

    Without ``features``, a column is a feature when its name is a similarity metric (``similarity.ALL_METRICS``)
    or starts with a declared ``prefix`` (default ``"feat_"``). Other numeric columns (``fold``, ``p_suitable``,
    an id stored as a number) are not features: they are ignored, and with ``strict=True`` the call raises naming
    them (columns of :data:`META_COLUMNS` and :data:`KNOWN_NON_FEATURES` never count as unknown).

    Args:
        table: feature table.
        features: explicit feature columns (checked to exist).
        prefix: declared prefix(es) of extra feature columns.
        strict: raise on numeric columns that are neither meta nor features.

    Returns:
        Feature column names, in table order (or in ``features`` order).

    Example:
        >>> feature_columns(table)                    # ['iou', 'dice', ..., 'wasserstein']
        >>> feature_columns(table, prefix="rank_")    # also 'rank_cosine', ...
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(table).__name__}")
    if features is not None:
        names = [features] if isinstance(features, str) else list(features)
        missing = [f for f in names if f not in table.columns]
        if missing:
            raise ValueError(f"feature column(s) {missing} missing from the table; columns: {list(table.columns)}")
        return names

    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    names = [c for c in table.columns if isinstance(c, str) and (c in ALL_METRICS or c.startswith(prefixes))]
    unknown = [
        c
        for c in table.columns
        if c not in names
        and c not in META_COLUMNS
        and c not in KNOWN_NON_FEATURES
        and pd.api.types.is_numeric_dtype(table[c])
    ]
    if unknown and strict:
        raise ValueError(
            f"numeric column(s) {unknown} are neither features (similarity metric names or prefix {prefixes}) nor "
            "meta columns; rename them with the feature prefix, pass features=[...], or drop them"
        )
    if unknown:
        logger.debug("feature_columns: ignoring numeric non-feature column(s) %s", unknown)
    if not names:
        raise ValueError(
            f"no feature column in the table (similarity metric names or prefix {prefixes}); "
            f"columns: {list(table.columns)}"
        )
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        raise ValueError(f"feature column(s) {bad} are not numeric")
    return names


def summary_table(table: pd.DataFrame, features: Sequence[str] | None = None, label: str = "label") -> pd.DataFrame:
    """Per-label statistics of every feature, as in the study: mean, min, max, std (ddof=1), count.

    Args:
        table: feature table.
        features: feature columns (default: :func:`feature_columns`).
        label: label column.

    Returns:
        DataFrame with columns ``label, feature, mean, min, max, std, count`` (label-major order).

    Example:
        >>> summary_table(table).round(4)
    """
    cols = feature_columns(table, features)
    if label not in table.columns:
        raise ValueError(f"label column {label!r} not in the table")
    data = table[table[label].notna()]
    if data.empty:
        raise ValueError("no labelled rows to summarise")
    rows = []
    for lab, part in data.groupby(label, sort=True):
        for col in cols:
            v = part[col].astype(float)
            rows.append(
                {
                    "label": lab,
                    "feature": col,
                    "mean": v.mean(),
                    "min": v.min(),
                    "max": v.max(),
                    "std": v.std(ddof=1),
                    "count": int(v.count()),
                }
            )
    return pd.DataFrame(rows)
