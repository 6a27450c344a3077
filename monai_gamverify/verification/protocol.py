"""Cross-validation protocol of the suitability verifier: which rows may share a fold.

The label of a feature-table row belongs to the *model* (suitable or not), so a verifier that sees a model's rows
in training can learn that model's identity (its attention "signature") instead of suitability; folds grouped by
subject do not prevent it. In real use the candidate is always a model the verifier has never seen, hence:

- **leave-models-out** (``groups="model"``): every model's rows are on one side of each fold; the default whenever
  each label has at least two models (``groups="auto"``). With fewer models per label than folds, every model is
  its own fold (``LeaveOneGroupOut``), else ``StratifiedGroupKFold`` over models.
- **subject-grouped** (``groups="subject_id"``): one subject's rows (of every model) on one side; the study's
  protocol, reported only as a secondary line when leave-models-out is possible.
- **stratified rows** (``groups=None``): plain stratified folds.

Every figure carries its protocol: :func:`protocol_name` gives the label written beside it.

Example:
    >>> col, name = resolve_groups(table, "auto")
    >>> name
    'leave-models-out'
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold

__all__ = ["LEAVE_MODELS_OUT", "SUBJECT_GROUPED", "STRATIFIED_ROWS", "protocol_name", "resolve_groups", "make_splits"]

LEAVE_MODELS_OUT = "leave-models-out"
SUBJECT_GROUPED = "subject-grouped"
STRATIFIED_ROWS = "stratified rows (no grouping)"


def protocol_name(groups: str | None) -> str:
    """Name of the protocol of a group column: ``model`` -> leave-models-out, ``None`` -> stratified rows, any other
    column -> ``"<column>-grouped"`` (``subject_id`` -> subject-grouped).

    Example:
        >>> protocol_name("model")
        'leave-models-out'
    """
    if groups is None:
        return STRATIFIED_ROWS
    if groups == "model":
        return LEAVE_MODELS_OUT
    if groups == "subject_id":
        return SUBJECT_GROUPED
    return f"{groups}-grouped"


def _models_per_label(table: pd.DataFrame, label: str = "label") -> dict[int, int]:
    if "model" not in table.columns or label not in table.columns:
        return {}
    known = table[table[label].notna()]
    return {int(k): int(v) for k, v in known.groupby(label)["model"].nunique().items()}


def resolve_groups(table: pd.DataFrame, groups: str | None = "auto") -> tuple[str | None, str]:
    """The group column and protocol name for ``groups``.

    Args:
        table: feature table (``label``, optionally ``model`` and ``subject_id``).
        groups: ``"auto"`` (``"model"`` when both labels have >= 2 models, else ``"subject_id"`` when present,
            else ``None``), a column name, or ``None``.

    Returns:
        ``(column or None, protocol name)``.

    Raises:
        ValueError: ``groups="model"`` with a label that has fewer than two models (a fold would train on one class).

    Example:
        >>> resolve_groups(table)            # 3 suitable and 2 unsuitable models
        ('model', 'leave-models-out')
    """
    if groups == "auto":
        per_label = _models_per_label(table)
        if len(per_label) == 2 and min(per_label.values()) >= 2:
            groups = "model"
        elif "subject_id" in table.columns:
            groups = "subject_id"
        else:
            groups = None
    if groups is not None and groups not in table.columns:
        raise ValueError(f"group column {groups!r} not in the table; columns: {list(table.columns)}")
    if groups == "model":
        per_label = _models_per_label(table)
        if len(per_label) < 2 or min(per_label.values()) < 2:
            raise ValueError(
                f"leave-models-out needs at least 2 models of each label, got models per label {per_label}; "
                "use groups='subject_id' (and say so beside every figure)"
            )
    return groups, protocol_name(groups)


def make_splits(
    y: np.ndarray, g: np.ndarray | None, n_splits: int, seed: int, groups: str | None
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], str]:
    """Fold index pairs for a protocol, and the splitter used.

    Model-grouped: ``StratifiedGroupKFold(n_splits)`` over models when every label has at least ``n_splits``
    models, else ``LeaveOneGroupOut`` (each model its own fold; the per-fold ROC AUC is then undefined and only the
    pooled out-of-fold and model-level AUCs are reported). Other groups: ``StratifiedGroupKFold``; none:
    ``StratifiedKFold``.

    Args:
        y: labels 0/1 per row.
        g: group value per row (``None`` for no grouping).
        n_splits: folds wanted.
        seed: shuffling seed.
        groups: name of the group column (``"model"`` selects the model rule).

    Returns:
        ``(iterator of (train, test) index arrays, splitter description)``.
    """
    x = np.zeros((len(y), 1))
    if g is None:
        return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y), (
            f"StratifiedKFold({n_splits})"
        )
    n_groups = len(np.unique(g))
    if groups == "model":
        per_label = min(len(np.unique(g[y == c])) for c in (0, 1))
        if per_label < n_splits:
            return LeaveOneGroupOut().split(x, y, g), f"LeaveOneGroupOut({n_groups} models)"
    elif n_groups < n_splits:
        raise ValueError(f"only {n_groups} distinct {groups!r} value(s) for {n_splits} folds")
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y, g), (
        f"StratifiedGroupKFold({n_splits}) on {groups}"
    )
