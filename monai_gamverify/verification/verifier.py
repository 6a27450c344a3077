"""The Random-Forest verifier (:class:`SuitabilityVerifier`): it learns to tell "model trained on similar data"
(label 1) from "model trained on other data" (label 0) from the similarity features, cross-validated
**leave-models-out** whenever each label has >= 2 models (:mod:`monai_gamverify.verification.protocol`), with its
cross-validation result (:class:`CrossValidationResult`) and ROC figure (:func:`roc_png`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score, roc_curve
from sklearn.utils.validation import check_is_fitted

from monai_gamverify.io import atomic_path
from monai_gamverify.verification.protocol import make_splits, resolve_groups
from monai_gamverify.verification.reference import progress_bar
from monai_gamverify.verification.tables import feature_columns
from monai_gamverify.visualize.plots import save_figure

__all__ = [
    "SCORES",
    "SuitabilityVerifier",
    "CrossValidationResult",
    "roc_png",
    "pack_forest",
    "forest_proba",
]

_FORMAT = "monai-gamverify.SuitabilityVerifier"
# types a verifier file may hold beyond what skops trusts by default (RandomForest, DecisionTree, numpy, builtins)
_ALLOWED_TYPES = frozenset({"sklearn.tree._tree.Tree"})
#: scores of every cross-validation fold
SCORES = ("accuracy", "precision", "recall", "f1", "roc_auc")


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


#: up to this many rows, :meth:`SuitabilityVerifier.predict_proba` walks the packed trees in numpy
_FEW_ROWS = 64


def pack_forest(forest: RandomForestClassifier) -> dict[str, np.ndarray]:
    """The trees of a fitted classification forest as padded (n_trees, max_nodes) arrays for :func:`forest_proba`.

    Example:
        >>> packed = pack_forest(RandomForestClassifier(5, random_state=0).fit(X, y))
    """
    trees = [est.tree_ for est in forest.estimators_]
    if any(t.n_outputs != 1 for t in trees):
        raise ValueError("pack_forest handles single-output forests only")
    width, n_cls = max(t.node_count for t in trees), trees[0].value.shape[2]
    left = np.full((len(trees), width), -1, dtype=np.int64)
    right = np.full_like(left, -1)
    feature = np.zeros_like(left)
    threshold = np.zeros((len(trees), width), dtype=np.float64)
    value = np.zeros((len(trees), width, n_cls), dtype=np.float64)
    for i, t in enumerate(trees):
        n = t.node_count
        left[i, :n], right[i, :n] = t.children_left, t.children_right
        feature[i, :n] = np.maximum(t.feature, 0)  # leaves carry -2: any column will do, they never move
        threshold[i, :n] = t.threshold
        v = t.value[:, 0, :].astype(np.float64)
        value[i, :n] = v / np.maximum(v.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    depth = max(t.max_depth for t in trees)
    return {"left": left, "right": right, "feature": feature, "threshold": threshold, "value": value,
            "depth": np.asarray(depth)}  # fmt: skip


def forest_proba(packed: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Class probabilities of a packed forest (:func:`pack_forest`): every tree walked at once, ``depth`` steps; the
    features are compared as float32, as scikit-learn's trees do, so the answer equals ``predict_proba``."""
    x = np.asarray(X, dtype=np.float32).astype(np.float64)
    n_trees = packed["left"].shape[0]
    rows = np.arange(x.shape[0])[None, :]
    trees = np.arange(n_trees)[:, None]
    node = np.zeros((n_trees, x.shape[0]), dtype=np.int64)
    for _ in range(int(packed["depth"]) + 1):
        left = packed["left"][trees, node]
        inner = left >= 0
        if not inner.any():
            break
        go_left = x[rows, packed["feature"][trees, node]] <= packed["threshold"][trees, node]
        node = np.where(inner, np.where(go_left, left, packed["right"][trees, node]), node)
    return packed["value"][trees, node].mean(axis=0)


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
        """(n, 2) class probabilities; column 1 is P(suitable).

        A few rows (one image per request in a server) go through all trees at once in numpy
        (:func:`forest_proba`, the same numbers as the forest's own ``predict_proba``, about 100x faster for one row);
        more rows use scikit-learn's.
        """
        check_is_fitted(self, "model_")
        arr, _ = self._matrix(X, list(self.feature_names_in_))
        if arr.shape[0] > _FEW_ROWS:
            return self.model_.predict_proba(arr)
        packed = getattr(self, "_packed", None)
        if packed is None or packed[0] is not self.model_:
            packed = self._packed = (self.model_, pack_forest(self.model_))
        return forest_proba(packed[1], arr)

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
        for k, (train, test) in enumerate(progress_bar(list(splits), progress, "cross-validation")):
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
        mean = {s: _nanmean(folds[s]) for s in SCORES}
        std = {s: float(np.nanstd(folds[s])) if folds[s].notna().any() else float("nan") for s in SCORES}
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
