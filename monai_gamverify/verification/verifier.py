"""Model-suitability verification from attention maps (Methods 1 and 2 of the verification study).

A reference model's normalised maps are averaged over a reference dataset (:class:`ReferenceMap`, streaming).
Every candidate model's map of every sample is compared with that mean map by the similarity features
(:func:`feature_table`), and a Random Forest (:class:`SuitabilityVerifier`) learns to tell "model trained on
similar data" (label 1) from "model trained on other data" (label 0), cross-validated **leave-models-out** whenever
each label has >= 2 models (:mod:`monai_gamverify.verification.protocol`; subject-grouped folds only as a secondary
line), with one verdict per model from a bootstrap interval (:mod:`monai_gamverify.verification.models`).
:func:`run_verification` does all of it and writes a report directory; the one-class mode (no unsuitable models) is
:mod:`monai_gamverify.verification.oneclass`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score, roc_curve
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from monai_gamverify.io import affine_of, atomic_path, save_nifti, write_csv, write_json
from monai_gamverify.verification.models import format_verdicts, model_level_auc, model_verdicts, verdicts_to_dict
from monai_gamverify.verification.protocol import make_splits, resolve_groups
from monai_gamverify.visualize.plots import overlay_png, save_figure

__all__ = [
    "META_COLUMNS",
    "KNOWN_NON_FEATURES",
    "FEATURE_PREFIX",
    "ReferenceMap",
    "reference_map",
    "feature_table",
    "feature_columns",
    "SuitabilityVerifier",
    "CrossValidationResult",
    "summary_table",
    "roc_png",
    "run_verification",
]

#: columns of a feature table that are not features
META_COLUMNS = ("sample_id", "subject_id", "model", "label")
#: numeric columns that other tables of this package add beside the features (never features, never "unknown")
KNOWN_NON_FEATURES = ("fold", "p_suitable", "p_value", "score", "n_rows")
#: declared prefix of feature columns other than the similarity metric names
FEATURE_PREFIX = "feat_"
logger = logging.getLogger(__name__)
MapFn = Callable[[torch.Tensor], torch.Tensor]
_FORMAT = "monai-gamverify.SuitabilityVerifier"
# types a verifier file may hold beyond what skops trusts by default (RandomForest, DecisionTree, numpy, builtins)
_ALLOWED_TYPES = frozenset({"sklearn.tree._tree.Tree"})
_SCORES = ("accuracy", "precision", "recall", "f1", "roc_auc")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata: arithmetic on MetaTensors is slower and carries meta we do not want in sums."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _progress(data: Iterable, progress: bool, desc: str) -> Iterable:
    total = len(data) if hasattr(data, "__len__") else None
    return tqdm(data, total=total, desc=desc, disable=not progress, leave=False)


def _batch_image(batch: Any, image_key: str) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"data must yield dicts with an {image_key!r} entry (as a DataLoader does), got {type(batch)}")
    if image_key not in batch:
        raise ValueError(f"batch has no {image_key!r} entry; keys: {sorted(batch)}")
    x = batch[image_key]
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(
            f"{image_key!r} must be a batched tensor (B, C, *spatial) with 2 or 3 spatial axes, got {shape}"
        )
    return x


def _sum_float64(maps: torch.Tensor) -> torch.Tensor:
    # float64 so that the mean over a large cohort does not drift; MPS has no float64, so sum there in float32
    if maps.device.type == "mps":
        return maps.float().sum(0, keepdim=True).cpu().double()
    return maps.sum(0, keepdim=True, dtype=torch.float64)


class ReferenceMap:
    """Streaming mean of a reference model's normalised maps: a float64 running sum and a count, never all maps.

    Args:
        check_range: refuse maps with values outside [0, 1] (normalised maps are expected).

    Attributes:
        count: number of maps accumulated.
        affine: 4x4 affine of the first image seen by :func:`reference_map` (or loaded), used when saving.
        background: first image (channel 0) seen by :func:`reference_map`, the PNG's background.

    Example:
        >>> ref = ReferenceMap()
        >>> for batch in loader:
        ...     ref.update(cam(batch["image"]))
        >>> ref.value.shape          # (1, 1, *spatial)
        >>> ref.save("report/")
    """

    def __init__(self, check_range: bool = True) -> None:
        self.check_range = check_range
        self.count = 0
        self.affine: np.ndarray | None = None
        self.background: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None

    def update(self, maps: torch.Tensor) -> ReferenceMap:
        """Add a (B, 1, *spatial) batch of maps to the running sum; returns ``self``."""
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
        maps = _plain(maps).detach()
        if maps.ndim not in (4, 5) or maps.shape[1] != 1 or maps.shape[0] == 0:
            raise ValueError(
                f"maps must have shape (B, 1, H, W) or (B, 1, D, H, W) with B > 0, got {tuple(maps.shape)}"
            )
        if not torch.isfinite(maps).all():
            raise ValueError("maps contain NaN or infinite values")
        if self.check_range and (maps.min() < 0 or maps.max() > 1):
            raise ValueError(
                f"maps must be normalised to [0, 1], got range [{float(maps.min()):.4g}, {float(maps.max()):.4g}]"
            )
        batch_sum = _sum_float64(maps)
        if self._sum is None:
            self._sum = batch_sum
        elif batch_sum.shape != self._sum.shape:
            raise ValueError(
                f"map spatial shape {tuple(maps.shape[2:])} differs from earlier maps {tuple(self._sum.shape[2:])}"
            )
        else:
            self._sum = self._sum + batch_sum.to(self._sum.device)
        self.count += int(maps.shape[0])
        return self

    @property
    def value(self) -> torch.Tensor:
        """The mean map, (1, 1, *spatial) float32."""
        if self._sum is None or self.count == 0:
            raise ValueError("the reference map is empty: no maps were accumulated")
        return (self._sum / self.count).float()

    def save(
        self, out_dir: str | os.PathLike, reference_image: Any = None, name: str = "reference_map"
    ) -> dict[str, Path]:
        """Write ``{name}.nii.gz`` (with the image affine), ``{name}.png`` (overlay) and ``{name}.json`` (count).

        Args:
            out_dir: output directory (created).
            reference_image: image (MetaTensor/array, (*spatial) or (1, *spatial)) for the affine and PNG background;
                default: the first image seen by :func:`reference_map`, else identity affine and the map itself.
            name: file stem.

        Returns:
            Dict ``{"nifti", "png", "json"}`` -> written paths.
        """
        out = Path(out_dir)
        value = self.value[0, 0]
        affine = affine_of(reference_image) if hasattr(reference_image, "affine") else self.affine
        background = reference_image if reference_image is not None else self.background
        if background is None:
            background = value
        bg_shape = tuple(np.shape(background))[-value.ndim :]
        if bg_shape != tuple(value.shape):
            # a map on a coarser common grid (verification_grid.CommonGrid): voxels scaled, the map its own background
            if affine is not None and len(bg_shape) == value.ndim:
                affine = np.array(affine, dtype=np.float64, copy=True)
                for i, (b, v) in enumerate(zip(bg_shape, value.shape)):
                    affine[:3, i] *= b / v
            background = value
        paths = {
            "nifti": save_nifti(value, out / f"{name}.nii.gz", reference=affine),
            "png": overlay_png(background, value, out / f"{name}.png", title=f"reference map (mean of {self.count})"),
            "json": write_json({"count": self.count, "shape": list(value.shape)}, out / f"{name}.json"),
        }
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceMap:
        """Read a map written by :meth:`save` (the ``.nii.gz``, or its directory for the default name).

        The count comes from the ``.json`` sidecar when present (else 1), so updating can continue.
        """
        import json

        import nibabel as nib

        p = Path(path)
        if p.is_dir():
            p = p / "reference_map.nii.gz"
        if not p.is_file():
            raise FileNotFoundError(f"reference map not found: {p}")
        img = nib.load(str(p))
        data = torch.as_tensor(np.asarray(img.get_fdata(), dtype=np.float64))
        sidecar = p.with_name(p.name.removesuffix(".gz").removesuffix(".nii") + ".json")
        count, shape = 1, tuple(data.shape)
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            count, shape = int(meta["count"]), tuple(meta["shape"])
        ref = cls()
        ref._sum = data.reshape(1, 1, *shape) * count
        ref.count = count
        ref.affine = np.asarray(img.affine, dtype=np.float64)
        return ref


def reference_map(
    cam: MapFn,
    data: Iterable[Mapping[str, Any]],
    *,
    image_key: str = "image",
    progress: bool = True,
) -> ReferenceMap:
    """Mean normalised map of a reference model over a dataset, streamed batch by batch.

    Args:
        cam: callable ``x -> (B, 1, *spatial)`` maps in [0, 1], e.g. ``GradCAM(net, "layer4")`` or
            ``FeatureMap(net, "layer1")``; ``x`` is given as the data yields it.
        data: iterable of batch dicts (a ``DataLoader``) with ``image_key`` of shape (B, C, *spatial).
        image_key: key of the image in each batch.
        progress: show a progress bar.

    Returns:
        The filled :class:`ReferenceMap` (its affine/background taken from the first image).

    Example:
        >>> ref = reference_map(GradCAM(ref_net, "layer4"), loader)
    """
    ref = ReferenceMap()
    for batch in _progress(data, progress, "reference map"):
        x = _batch_image(batch, image_key)
        if ref.background is None:
            ref.background = _plain(x)[0, 0].detach().float().cpu()
            ref.affine = affine_of(x) if hasattr(x, "affine") else None
        ref.update(cam(x))
    if ref.count == 0:
        raise ValueError("data yielded no batches: cannot build a reference map")
    return ref


def _ids(batch: Mapping[str, Any], key: str, n: int, default: list[Any]) -> list[Any]:
    value = batch.get(key)
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    elif isinstance(value, (str, int)):
        value = [value]
    value = list(value)
    if len(value) != n:
        raise ValueError(f"batch entry {key!r} has {len(value)} values for {n} images")
    return value


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
    from monai_gamverify.metrics.similarity import similarity_metrics

    ref = reference.value if isinstance(reference, ReferenceMap) else reference
    if not isinstance(ref, torch.Tensor) or ref.ndim not in (4, 5) or ref.shape[:2] != (1, 1):
        raise ValueError(
            f"reference must be a ReferenceMap or a (1, 1, *spatial) tensor, got {getattr(ref, 'shape', ref)}"
        )
    ref = _plain(ref).float()
    if not candidates:
        raise ValueError("no candidate model given")
    for name, spec in candidates.items():
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and callable(spec[0])):
            raise TypeError(f"candidate {name!r} must be (map function, label), got {spec!r}")
        if spec[1] not in (0, 1, None):
            raise ValueError(f"label of candidate {name!r} must be 1 (suitable), 0 (not) or None, got {spec[1]!r}")
    rows: list[dict[str, Any]] = []
    seen = 0
    for batch in _progress(data, progress, "feature table"):
        x = _batch_image(batch, image_key)
        n = int(x.shape[0])
        sample_ids = _ids(batch, id_key, n, list(range(seen, seen + n)))
        subject_ids = _ids(batch, subject_key, n, sample_ids)
        seen += n
        for name, (fn, label) in candidates.items():
            maps = _plain(fn(x)).detach()
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
    from monai_gamverify.metrics.similarity import ALL_METRICS

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


def _nanmean(values: Any) -> float:
    """Mean ignoring NaN; NaN (without a warning) when every value is NaN (e.g. per-fold AUC of one-model folds)."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _check_labels(y: Any, where: str = "label") -> np.ndarray:
    y = pd.Series(y) if not isinstance(y, pd.Series) else y
    if y.isna().any():
        raise ValueError(f"{int(y.isna().sum())} row(s) have no {where}; a verifier needs labels 0/1 on every row")
    try:
        arr = y.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} must be 0 (unsuitable) or 1 (suitable): {err}") from err
    values = set(np.unique(arr).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"{where} must be 0 (unsuitable) or 1 (suitable), got values {sorted(values, key=str)}")
    if len(values) < 2:
        raise ValueError(f"{where} has a single class {values}; the verifier needs examples of both 0 and 1")
    return arr.astype(np.int64)


@dataclass
class CrossValidationResult:
    """Cross-validation of a :class:`SuitabilityVerifier`.

    Attributes:
        folds: one row per fold: ``fold, n_train, n_test`` and accuracy, precision, recall, f1, roc_auc.
        mean: mean of each score over folds (``roc_auc_oof``: AUC of the pooled out-of-fold probabilities).
        std: standard deviation of each score over folds.
        y_true: labels of the table rows.
        oof_proba: out-of-fold P(suitable) of every row.
        fold: the fold in which each row was a test row.
        params: the settings used (n_splits, groups, seed, average).
    """

    folds: pd.DataFrame
    mean: dict[str, float]
    std: dict[str, float]
    y_true: np.ndarray
    oof_proba: np.ndarray
    fold: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-fold rows, mean, std, settings)."""
        return {
            "params": self.params,
            "folds": self.folds.to_dict(orient="records"),
            "mean": self.mean,
            "std": self.std,
        }


class SuitabilityVerifier(ClassifierMixin, BaseEstimator):
    """Random-Forest verifier: from similarity features, P(the model is suitable for the image).

    Follows scikit-learn conventions (``fit``/``predict``/``predict_proba``, ``get_params``/``set_params``, nothing
    computed in ``__init__``); saved with ``skops`` (never pickle) and loaded only if the file holds expected types.

    Args:
        n_estimators: number of trees.
        max_depth: maximum tree depth (``None``: unlimited).
        min_samples_leaf: minimum samples per leaf.
        max_features: features considered per split (``RandomForestClassifier`` semantics).
        class_weight: ``None``, ``"balanced"`` or ``"balanced_subsample"``.
        features: feature columns to use (default: :func:`feature_columns`, the metric-named and ``feat_`` columns).
        random_state: seed of the forest.
        n_jobs: parallel jobs of the forest.

    Attributes:
        model_: the fitted ``RandomForestClassifier``.
        feature_names_in_: feature columns, in order.
        classes_: ``array([0, 1])``.

    Example:
        >>> ver = SuitabilityVerifier(random_state=0)
        >>> cv = ver.cross_validate(table, n_splits=5)      # leave-models-out when each label has >= 2 models
        >>> ver.fit(table).save("verifier.skops")
        >>> SuitabilityVerifier.load("verifier.skops").predict_proba(new_rows)[:, 1]
    """

    def __init__(
        self,
        n_estimators: int = 200,
        max_depth: int | None = None,
        min_samples_leaf: int = 1,
        max_features: str | int | float | None = "sqrt",
        class_weight: str | None = None,
        features: Sequence[str] | None = None,
        random_state: int | None = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.class_weight = class_weight
        self.features = features
        self.random_state = random_state
        self.n_jobs = n_jobs

    # ------------------------------------------------------------------ data handling
    def _matrix(self, X: Any, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
        if isinstance(X, pd.DataFrame):
            cols = feature_columns(X, names if names is not None else self.features)
            arr = X[cols].to_numpy(dtype=np.float64)
        else:
            arr = np.asarray(X, dtype=np.float64)
            if arr.ndim != 2:
                raise ValueError(f"X must be a DataFrame or a 2D array (n_samples, n_features), got shape {arr.shape}")
            cols = list(names) if names is not None else [f"x{i}" for i in range(arr.shape[1])]
            if arr.shape[1] != len(cols):
                raise ValueError(f"X has {arr.shape[1]} feature columns, the verifier expects {len(cols)}: {cols}")
        if arr.shape[0] == 0:
            raise ValueError("X has no rows")
        bad = ~np.isfinite(arr)
        if bad.any():
            which = [c for c, b in zip(cols, bad.any(axis=0)) if b]
            raise ValueError(f"{int(bad.any(axis=1).sum())} row(s) have NaN or infinite values in feature(s) {which}")
        return arr, cols

    def _forest(self) -> RandomForestClassifier:
        return RandomForestClassifier(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
            max_features=self.max_features,
            class_weight=self.class_weight,
            random_state=self.random_state,
            n_jobs=self.n_jobs,
        )

    # ------------------------------------------------------------------ estimator API
    def fit(self, X: pd.DataFrame | np.ndarray, y: Any = None) -> SuitabilityVerifier:
        """Fit the forest.

        Args:
            X: feature table (DataFrame; labels taken from its ``label`` column when ``y`` is None) or a 2D array.
            y: labels 0/1 (one per row).

        Returns:
            ``self``.
        """
        if y is None:
            if not (isinstance(X, pd.DataFrame) and "label" in X.columns):
                raise ValueError("give y, or a DataFrame with a 'label' column")
            y = X["label"]
        arr, cols = self._matrix(X, None)
        labels = _check_labels(y)
        if len(labels) != arr.shape[0]:
            raise ValueError(f"X has {arr.shape[0]} rows but y has {len(labels)} labels")
        self.model_ = self._forest().fit(arr, labels)
        self.feature_names_in_ = np.asarray(cols, dtype=object)
        self.n_features_in_ = len(cols)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """(n, 2) class probabilities; column 1 is P(suitable)."""
        check_is_fitted(self, "model_")
        arr, _ = self._matrix(X, list(self.feature_names_in_))
        return self.model_.predict_proba(arr)

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Predicted labels (1 = suitable, 0 = not)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    @property
    def feature_importances_(self) -> np.ndarray:
        """Impurity-based importances of the features (``feature_names_in_`` order)."""
        check_is_fitted(self, "model_")
        return self.model_.feature_importances_

    # ------------------------------------------------------------------ cross-validation
    def cross_validate(
        self,
        table: pd.DataFrame,
        n_splits: int = 5,
        groups: str | None = "auto",
        seed: int = 0,
        average: str = "binary",
        progress: bool = False,
    ) -> CrossValidationResult:
        """Stratified, grouped cross-validation; leave-models-out by default when each label has >= 2 models.

        Args:
            table: feature table with a ``label`` column (and the ``groups`` column).
            n_splits: number of folds (leave-models-out with fewer models per label than folds: one fold per model).
            groups: ``"auto"`` (``"model"`` when both labels have >= 2 models, else ``"subject_id"``), ``"model"``
                (leave-models-out), ``"subject_id"`` (the study's protocol), another column, or ``None`` (plain
                stratified folds). See :mod:`monai_gamverify.verification.protocol`.
            seed: shuffling seed of the folds.
            average: averaging of precision/recall/F1 (``"binary"`` for the suitable class, or ``"weighted"`` /
                ``"macro"``; the study reports weighted values).
            progress: show a progress bar over folds.

        Returns:
            :class:`CrossValidationResult` with per-fold scores, their mean/std, out-of-fold probabilities; ``mean``
            also holds ``roc_auc_oof`` (pooled rows) and, with a ``model`` column, ``roc_auc_model`` (AUC of each
            model's mean out-of-fold P(suitable)); ``params["protocol"]`` names the protocol.

        Example:
            >>> cv = SuitabilityVerifier().cross_validate(table)      # leave-models-out when possible
            >>> cv.params["protocol"], cv.mean["roc_auc_model"]
        """
        if not isinstance(table, pd.DataFrame) or "label" not in table.columns:
            raise ValueError("cross_validate needs a feature table (DataFrame) with a 'label' column")
        if not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
            raise ValueError(f"n_splits must be an integer >= 2, got {n_splits!r}")
        if average not in ("binary", "weighted", "macro", "micro"):
            raise ValueError(f"average must be 'binary', 'weighted', 'macro' or 'micro', got {average!r}")
        table = table.reset_index(drop=True)
        arr, cols = self._matrix(table, None)
        y = _check_labels(table["label"])
        groups, protocol = resolve_groups(table, groups)
        counts = np.bincount(y, minlength=2)
        if groups != "model" and (len(y) < n_splits or counts.min() < n_splits):
            raise ValueError(
                f"too few samples for {n_splits} folds: {len(y)} rows, {counts[0]} of class 0 and {counts[1]} of "
                "class 1 (each class needs at least one row per fold)"
            )
        g = None if groups is None else table[groups].astype(str).to_numpy()
        splits, splitter = make_splits(y, g, int(n_splits), seed, groups)
        oof = np.full(len(y), np.nan)
        fold_of = np.full(len(y), -1, dtype=np.int64)
        rows = []
        sub = table[cols].assign(label=y)
        for k, (train, test) in enumerate(_progress(list(splits), progress, "cross-validation")):
            if g is not None and set(g[train]) & set(g[test]):  # guaranteed by the splitter; a cheap safety net
                raise RuntimeError("a group appears on both sides of a fold")
            if len(np.unique(y[train])) < 2:
                raise ValueError(f"fold {k}: the training part has a single class; use fewer folds or more groups")
            est = clone(self).set_params(features=cols).fit(sub.iloc[train])
            proba = est.predict_proba(sub.iloc[test])[:, 1]
            pred = (proba >= 0.5).astype(np.int64)
            yt = y[test]
            kw = {"average": average, "zero_division": 0}
            if average == "binary":
                kw["pos_label"] = 1
            rows.append(
                {
                    "fold": k,
                    "n_train": len(train),
                    "n_test": len(test),
                    "accuracy": accuracy_score(yt, pred),
                    "precision": precision_score(yt, pred, **kw),
                    "recall": recall_score(yt, pred, **kw),
                    "f1": f1_score(yt, pred, **kw),
                    # a grouped fold can hold a single class: AUC undefined there, reported as NaN
                    "roc_auc": roc_auc_score(yt, proba) if len(np.unique(yt)) == 2 else float("nan"),
                }
            )
            oof[test] = proba
            fold_of[test] = k
        folds = pd.DataFrame(rows)
        mean = {s: _nanmean(folds[s]) for s in _SCORES}
        std = {s: float(np.nanstd(folds[s])) if folds[s].notna().any() else float("nan") for s in _SCORES}
        mean["roc_auc_oof"] = float(roc_auc_score(y, oof))
        if "model" in table.columns:
            per_model = pd.DataFrame({"model": table["model"].astype(str), "y": y, "p": oof}).groupby("model")
            ym, pm = per_model["y"].first().to_numpy(), per_model["p"].mean().to_numpy()
            mean["roc_auc_model"] = float(roc_auc_score(ym, pm)) if len(np.unique(ym)) == 2 else float("nan")
            mean["n_models"] = int(len(ym))
        params = {
            "protocol": protocol,
            "n_splits": int(n_splits),
            "n_folds": len(folds),
            "splitter": splitter,
            "groups": groups,
            "seed": seed,
            "average": average,
            "features": cols,
        }
        return CrossValidationResult(folds, mean, std, y, oof, fold_of, params)

    # ------------------------------------------------------------------ persistence (skops, never pickle)
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted verifier with ``skops.io`` (atomically)."""
        import skops.io as sio

        check_is_fitted(self, "model_")
        params = self.get_params()
        params["features"] = None if params["features"] is None else list(params["features"])
        payload = {
            "format": _FORMAT,
            "format_version": 1,
            "params": params,
            "model": self.model_,
            "feature_names": [str(c) for c in self.feature_names_in_],
            "classes": [int(c) for c in self.classes_],
        }
        out = Path(path)
        with atomic_path(out) as tmp:
            sio.dump(payload, tmp)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SuitabilityVerifier:
        """Read a verifier written by :meth:`save`.

        The file is audited first (``skops.io.get_untrusted_types``): any type outside skops' defaults and this
        module's allow-list (a tree's ``Tree``) means the file was not written by :meth:`save` and it is refused.
        """
        import skops.io as sio

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"verifier file not found: {p}")
        try:
            untrusted = sio.get_untrusted_types(file=p)
        except Exception as err:  # corrupt zip, bad schema: name the file
            raise ValueError(f"{p} is not a readable skops file: {type(err).__name__}: {err}") from err
        unexpected = sorted(set(untrusted) - _ALLOWED_TYPES)
        if unexpected:
            raise ValueError(f"refusing to load {p}: it contains unexpected type(s) {unexpected} (tampered or foreign)")
        payload = sio.load(p, trusted=list(untrusted))
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{p} is not a SuitabilityVerifier file")
        model = payload["model"]
        if not isinstance(model, RandomForestClassifier):
            raise ValueError(f"{p} holds a {type(model).__name__}, expected a RandomForestClassifier")
        est = cls(**payload["params"])
        est.model_ = model
        est.feature_names_in_ = np.asarray(payload["feature_names"], dtype=object)
        est.n_features_in_ = len(est.feature_names_in_)
        est.classes_ = np.asarray(payload["classes"])
        if est.n_features_in_ != model.n_features_in_:
            raise ValueError(f"{p}: {est.n_features_in_} feature names for a forest of {model.n_features_in_}")
        return est


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


def roc_png(
    y_true: Any,
    y_score: Any,
    path: str | os.PathLike,
    *,
    fold: Any = None,
    title: str | None = None,
) -> Path:
    """ROC curve of (out-of-fold) probabilities as a PNG, with the AUC; thin per-fold curves when ``fold`` is given.

    Args:
        y_true: labels 0/1.
        y_score: P(suitable) per row.
        path: output PNG (written atomically).
        fold: optional fold index per row (e.g. ``CrossValidationResult.fold``).
        title: figure title.

    Returns:
        The written path.

    Example:
        >>> roc_png(cv.y_true, cv.oof_proba, "roc.png", fold=cv.fold)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = _check_labels(np.asarray(y_true), "y_true")
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != y.shape or not np.isfinite(s).all():
        raise ValueError(f"y_score must be finite with one value per label ({y.shape}), got shape {s.shape}")
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if fold is not None:
        fold = np.asarray(fold)
        for k in np.unique(fold):
            m = fold == k
            if len(np.unique(y[m])) == 2:
                fpr, tpr, _ = roc_curve(y[m], s[m])
                ax.plot(fpr, tpr, lw=0.8, alpha=0.5, label=f"fold {k} (AUC {roc_auc_score(y[m], s[m]):.3f})")
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, lw=2, color="C3", label=f"pooled (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(title or "suitability verifier ROC", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


class _CAMOnDevice:
    """A CAM callable that first moves the batch to the model's device (the model itself is never moved)."""

    def __init__(self, cam: Any, model: torch.nn.Module, class_idx: Any = None) -> None:
        self.cam, self.model, self.class_idx = cam, model, class_idx

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        return self.cam(x, class_idx=self.class_idx, normalize=True)


_METHODS = ("gradcam", "gradcampp", "scorecam", "featuremap")


def _map_fn(model: torch.nn.Module, layer: str, method: str, class_idx: Any) -> MapFn:
    if method == "featuremap":
        from monai_gamverify.visualize.featuremaps import FeatureMap

        return FeatureMap(model, layer)
    from monai_gamverify.visualize.cam import GradCAM, GradCAMpp, ScoreCAM

    cls = {"gradcam": GradCAM, "gradcampp": GradCAMpp, "scorecam": ScoreCAM}[method]
    return _CAMOnDevice(cls(model, target_layers=layer), model, class_idx)


def run_verification(
    reference: tuple[torch.nn.Module, str],
    candidates: Mapping[str, tuple[torch.nn.Module, str, int]],
    data: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    method: str = "gradcam",
    reference_data: Iterable[Mapping[str, Any]] | None = None,
    class_idx: int | None = None,
    slice_axis: int | None = None,
    metrics: Sequence[str] | None = None,
    n_splits: int = 5,
    groups: str | None = "auto",
    average: str = "binary",
    n_estimators: int = 200,
    seed: int = 0,
    threshold: float = 0.5,
    confidence: float = 0.95,
    map_transform: Callable[[MapFn], MapFn] | None = None,
    image_key: str = "image",
    id_key: str = "id",
    subject_key: str = "subject",
    progress: bool = True,
) -> dict[str, Any]:
    """Verify candidate models against a reference model and write a report directory.

    Steps: reference mean map over ``reference_data`` (default ``data``) → feature table of every candidate on
    ``data`` → grouped, stratified cross-validation of a :class:`SuitabilityVerifier` (leave-models-out whenever
    each label has >= 2 models) → model-level verdicts from each model's out-of-fold P(suitable) (mean with a
    bootstrap interval, :func:`~monai_gamverify.verification.models.model_verdicts`) → verifier refitted on all
    rows. Written to ``out_dir``: ``features.csv``, ``predictions.csv`` (out-of-fold P(suitable) per row),
    ``verdicts.csv`` (per model: mean, interval, verdict), ``cv.json`` (protocol, per-fold and mean scores,
    model-level AUC, importances, per-model verdicts), ``summary.csv`` (per-label feature statistics), ``roc.png``,
    ``reference_map.nii.gz/.png/.json``, ``verifier.skops`` and TensorBoard scalars in ``tensorboard/``.

    Args:
        reference: ``(model, layer)`` of the reference model.
        candidates: ``{name: (model, layer, label)}``, label 1 = trained on similar data (suitable), 0 = not.
        data: re-iterable batches (``DataLoader`` or list of batch dicts) with ``image_key`` (B, C, *spatial) and
            optional ``id_key`` / ``subject_key``.
        out_dir: report directory (created).
        method: ``"gradcam"``, ``"gradcampp"``, ``"scorecam"`` (Method 1) or ``"featuremap"`` (Method 2).
        reference_data: data for the reference mean map (default: ``data``).
        class_idx: class explained by the CAMs (``None``: each sample's predicted class).
        slice_axis: compute features per 2D slice along this spatial axis.
        metrics: feature names (default: the study's seven).
        n_splits: cross-validation folds.
        groups: column grouping the folds: ``"auto"`` (leave-models-out when each label has >= 2 models, else
            subject-grouped), ``"model"``, ``"subject_id"`` or ``None``. When the protocol is leave-models-out, the
            subject-grouped figures are added as a secondary line (``cross_validation_secondary`` in ``cv.json``).
        average: precision/recall/F1 averaging (``"binary"`` or ``"weighted"`` as in the study).
        n_estimators: trees of the forest.
        seed: seed of the forest, the folds and the bootstrap.
        threshold: P(suitable) threshold of the model-level verdicts.
        confidence: coverage of the bootstrap interval of each model's mean out-of-fold P(suitable).
        map_transform: optional wrapper of every map function, e.g.
            ``lambda fn: CommonGrid(fn, 4)`` (:mod:`monai_gamverify.verification.grid`).
        image_key: image key in the batches.
        id_key: sample-id key in the batches.
        subject_key: subject-id key in the batches.
        progress: show progress bars.

    Returns:
        Dict with ``"out_dir"``, ``"files"`` (name -> path), ``"protocol"``, ``"cv_mean"`` (mean scores of that
        protocol), ``"cv_secondary"`` (``{"protocol", "mean"}`` of the subject-grouped folds, or ``None``) and
        ``"per_model"`` (model -> label, mean out-of-fold P(suitable), ``ci_low``, ``ci_high``, ``verdict``).

    Example:
        >>> report = run_verification((ref_net, "layer4"), {"r18": (r18, "layer4", 1), "chin": (c, "layer4", 0)},
        ...                           loader, "report/")
    """
    from torch.utils.tensorboard import SummaryWriter

    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if reference_data is None and iter(data) is data:
        raise TypeError(
            "data is read twice (reference map, then features): pass a DataLoader or a list, not an iterator"
        )
    if not isinstance(reference, (tuple, list)) or len(reference) != 2:
        raise TypeError(f"reference must be (model, layer), got {reference!r}")
    for name, spec in candidates.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise TypeError(f"candidate {name!r} must be (model, layer, label), got {spec!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    wrap = map_transform or (lambda fn: fn)
    ref_fn = wrap(_map_fn(reference[0], reference[1], method, class_idx))
    ref = reference_map(
        ref_fn, data if reference_data is None else reference_data, image_key=image_key, progress=progress
    )
    files: dict[str, Any] = {f"reference_{k}": v for k, v in ref.save(out).items()}
    fns = {name: (wrap(_map_fn(m, layer, method, class_idx)), label) for name, (m, layer, label) in candidates.items()}
    table = feature_table(
        ref,
        fns,
        data,
        image_key=image_key,
        id_key=id_key,
        subject_key=subject_key,
        slice_axis=slice_axis,
        metrics=metrics,
        progress=progress,
    )
    files["features"] = write_csv(table, out / "features.csv")

    verifier = SuitabilityVerifier(n_estimators=n_estimators, random_state=seed)
    cv = verifier.cross_validate(table, n_splits=n_splits, groups=groups, seed=seed, average=average, progress=progress)
    protocol = cv.params["protocol"]
    secondary = None
    if cv.params["groups"] == "model" and "subject_id" in table.columns:
        sub_cv = verifier.cross_validate(
            table, n_splits=n_splits, groups="subject_id", seed=seed, average=average, progress=progress
        )
        secondary = {"protocol": sub_cv.params["protocol"], **sub_cv.to_dict()}
    verifier.fit(table)
    files["verifier"] = verifier.save(out / "verifier.skops")

    preds = table[list(META_COLUMNS)].assign(fold=cv.fold, p_suitable=cv.oof_proba)
    files["predictions"] = write_csv(preds, out / "predictions.csv")
    verdicts = model_verdicts(preds, threshold=threshold, confidence=confidence, seed=seed)
    files["verdicts"] = write_csv(verdicts.assign(protocol=protocol), out / "verdicts.csv")
    per_model = verdicts_to_dict(verdicts)
    logger.info("%s", format_verdicts(verdicts, protocol, confidence, threshold))
    summary = summary_table(table)
    files["summary"] = write_csv(summary, out / "summary.csv")
    files["roc"] = roc_png(
        cv.y_true, cv.oof_proba, out / "roc.png", fold=cv.fold, title=f"verifier ROC ({method}; {protocol})"
    )
    importances = dict(zip(verifier.feature_names_in_.tolist(), verifier.feature_importances_.tolist()))
    report = {
        "method": method,
        "protocol": protocol,
        "reference_layer": reference[1],
        "n_rows": len(table),
        "n_samples": int(table["sample_id"].nunique()),
        "models": {n: {"layer": spec[1], "label": spec[2]} for n, spec in candidates.items()},
        "cross_validation": cv.to_dict(),
        "cross_validation_secondary": secondary,
        "model_level": {
            "protocol": protocol,
            "roc_auc": model_level_auc(verdicts),
            "threshold": threshold,
            "confidence": confidence,
            "interval": "BCa bootstrap of the mean out-of-fold P(suitable), 2000 resamples",
        },
        "feature_importances": importances,
        "per_model": per_model,
    }
    files["cv"] = write_json(report, out / "cv.json")

    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    try:
        writer.add_text("protocol", f"cross-validation and model-level verdicts: {protocol}", 0)
        for row in cv.folds.to_dict(orient="records"):
            for s in _SCORES:
                writer.add_scalar(f"cv_fold/{s}", row[s], int(row["fold"]))
        for s, v in cv.mean.items():
            writer.add_scalar(f"cv_mean/{s}", v, 0)
        for f, v in importances.items():
            writer.add_scalar(f"importance/{f}", v, 0)
        for name, info in per_model.items():
            writer.add_scalar(f"mean_p_suitable/{name}", info["mean_p_suitable"], 0)
    finally:
        writer.close()
    files["tensorboard"] = out / "tensorboard"
    return {
        "out_dir": out,
        "files": files,
        "protocol": protocol,
        "cv_mean": cv.mean,
        "cv_secondary": None if secondary is None else {"protocol": secondary["protocol"], "mean": secondary["mean"]},
        "model_level_roc_auc": report["model_level"]["roc_auc"],
        "per_model": per_model,
    }
