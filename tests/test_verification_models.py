"""Leave-models-out protocol, explicit feature columns and model-level verdicts with bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from monai_gamverify.metrics.similarity import DEFAULT_METRICS
from monai_gamverify.verification.models import bootstrap_mean_ci, model_level_auc, model_verdicts, verdict_of
from monai_gamverify.verification.protocol import make_splits, resolve_groups
from monai_gamverify.verification.tables import feature_columns
from monai_gamverify.verification.verifier import SuitabilityVerifier


def leaky_table(n_models: int = 8, n_subjects: int = 30, seed: int = 0) -> pd.DataFrame:
    """Each model has its own feature signature, drawn independently of its label: only identity predicts it."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(2 * n_models):
        label = m % 2
        signature = rng.normal(0.0, 1.0, size=len(DEFAULT_METRICS))
        for s in range(n_subjects):
            feats = signature + rng.normal(0.0, 0.05, size=len(DEFAULT_METRICS))
            rows.append({"sample_id": s, "subject_id": f"s{s}", "model": f"m{m}", "label": label,
                         **dict(zip(DEFAULT_METRICS, feats))})  # fmt: skip
    return pd.DataFrame(rows)


def test_model_identity_leak_is_caught_by_leave_models_out():
    table = leaky_table()
    ver = SuitabilityVerifier(n_estimators=40, random_state=0)
    by_subject = ver.cross_validate(table, n_splits=5, groups="subject_id")
    by_model = ver.cross_validate(table, n_splits=5)  # auto: >= 2 models per label -> leave-models-out
    assert by_subject.params["protocol"] == "subject-grouped"
    assert by_model.params["protocol"] == "leave-models-out" and by_model.params["groups"] == "model"
    # subject folds: the forest memorises which model a row comes from -> "perfect"
    assert by_subject.mean["roc_auc_oof"] > 0.98 and by_subject.mean["roc_auc_model"] > 0.98
    # a model never seen: its signature says nothing about its label
    assert by_model.mean["roc_auc_oof"] < 0.8 and by_model.mean["accuracy"] < 0.8
    per_model = pd.Series(by_model.fold).groupby(table["model"].to_numpy()).nunique()
    assert (per_model == 1).all()  # every model's rows in exactly one test fold


def test_leave_models_out_still_finds_a_real_signal():
    rng = np.random.default_rng(1)
    table = leaky_table(n_models=3, seed=2)
    shift = np.where(table["label"] == 1, 5.0, 0.0)
    for c in ("cosine", "ssim"):
        table[c] = shift + rng.normal(0, 0.3, len(table))  # suitability, not identity
    cv = SuitabilityVerifier(n_estimators=40, random_state=0).cross_validate(table, n_splits=5)
    assert cv.params["splitter"].startswith("LeaveOneGroupOut") and cv.params["n_folds"] == 6
    assert np.isnan(cv.mean["roc_auc"])  # one model per fold: per-fold AUC undefined, pooled/model AUC given
    assert cv.mean["roc_auc_model"] == 1.0 and cv.mean["roc_auc_oof"] > 0.9


def test_protocol_resolution_and_splitters():
    one_each = leaky_table(n_models=1)
    assert resolve_groups(one_each, "auto") == ("subject_id", "subject-grouped")
    assert resolve_groups(one_each.drop(columns="subject_id"), "auto") == (None, "stratified rows (no grouping)")
    with pytest.raises(ValueError, match="at least 2 models of each label"):
        resolve_groups(one_each, "model")
    many = leaky_table(n_models=6, n_subjects=3)
    y, g = many["label"].to_numpy(), many["model"].to_numpy()
    splits, name = make_splits(y, g, 5, 0, "model")
    assert name.startswith("StratifiedGroupKFold")
    for train, test in splits:
        assert not set(g[train]) & set(g[test])
        assert len(np.unique(y[train])) == 2


def test_feature_columns_are_declared_not_guessed():
    table = leaky_table(n_models=1, n_subjects=4).assign(fold=1, p_suitable=0.3, feat_extra=1.0, age=40)
    assert feature_columns(table) == [*DEFAULT_METRICS, "feat_extra"]
    assert feature_columns(table, prefix="ag") == [*DEFAULT_METRICS, "age"]
    with pytest.raises(ValueError, match=r"\['age'\]"):
        feature_columns(table, strict=True)  # fold / p_suitable are known non-features, age is not
    with pytest.raises(ValueError, match="no feature column"):
        feature_columns(table[["model", "label", "fold"]])


def test_bootstrap_interval_matches_scipy():
    x = np.random.default_rng(3).beta(2, 5, size=60)
    for method, name in (("percentile", "percentile"), ("bca", "BCa")):
        mean, lo, hi = bootstrap_mean_ci(x, confidence=0.9, n_boot=20000, method=method, seed=0)
        ref = stats.bootstrap((x,), np.mean, confidence_level=0.9, n_resamples=20000, method=name, random_state=1)
        assert mean == pytest.approx(x.mean())
        assert lo == pytest.approx(ref.confidence_interval.low, abs=0.004)
        assert hi == pytest.approx(ref.confidence_interval.high, abs=0.004)
    assert bootstrap_mean_ci(x, seed=5) == bootstrap_mean_ci(x, seed=5)  # seeded
    assert bootstrap_mean_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7, 0.7))
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_mean_ci([0.5])
    with pytest.raises(ValueError, match="method"):
        bootstrap_mean_ci(x, method="normal")


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_interval_covers_the_true_mean_at_nominal_rate(method):
    # skewed per-sample P(suitable) (Beta(2, 5), true mean 2/7), 40 samples per model, 90 % intervals
    rng = np.random.default_rng(0)
    reps, hits = 400, 0
    for r in range(reps):
        _, lo, hi = bootstrap_mean_ci(rng.beta(2, 5, size=40), confidence=0.9, n_boot=1000, method=method, seed=r)
        hits += lo <= 2 / 7 <= hi
    # binomial sd at 400 reps is 0.015; the bootstrap of a mean undercovers slightly at n = 40
    assert 0.85 <= hits / reps <= 0.95


def test_model_verdicts_and_model_level_auc():
    rng = np.random.default_rng(0)
    rows = []
    for name, label, center in (("good", 1, 0.85), ("bad", 0, 0.1), ("unsure", 1, 0.5)):
        p = np.clip(rng.normal(center, 0.05, size=30), 0, 1)
        rows += [{"model": name, "label": label, "p_suitable": v} for v in p]
    v = model_verdicts(pd.DataFrame(rows), seed=0)
    assert v["verdict"].tolist() == ["suitable", "not suitable", "undecided"]
    assert (v["ci_low"] <= v["mean_p_suitable"]).all() and (v["mean_p_suitable"] <= v["ci_high"]).all()
    assert model_level_auc(v) == 1.0
    assert verdict_of(0.51, 0.9) == "suitable" and verdict_of(0.1, 0.49) == "not suitable"
    with pytest.raises(ValueError, match="'model'"):
        model_verdicts(pd.DataFrame({"p_suitable": [0.1]}))


def test_common_grid_and_rank_normalize_match_numpy():
    import torch

    from monai_gamverify.verification.grid import CommonGrid, rank_normalize

    x = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    pooled = CommonGrid(lambda t: t, grid=2)(x)
    blocks = x.numpy().reshape(2, 1, 2, 4, 2, 4, 2, 4).mean(axis=(3, 5, 7))  # 4x4x4 block means
    lo = blocks.min(axis=(2, 3, 4), keepdims=True)
    hi = blocks.max(axis=(2, 3, 4), keepdims=True)
    np.testing.assert_allclose(pooled.numpy(), (blocks - lo) / (hi - lo), atol=1e-5)
    r = rank_normalize(x)
    expected = (stats.rankdata(x[1].numpy().ravel()) - 1) / (x[1].numel() - 1)
    np.testing.assert_allclose(r[1].numpy().ravel(), expected, atol=1e-6)
    assert CommonGrid(lambda t: t, grid=2, rank=True)(x).shape == (2, 1, 2, 2, 2)
    assert CommonGrid(lambda t: t, grid=(2, 4))(torch.rand(1, 1, 8, 8)).shape == (1, 1, 2, 4)
    assert (CommonGrid(lambda t: t, grid=2)(torch.ones(1, 1, 4, 4)) == 0).all()  # a constant map gives zeros
    with pytest.raises(ValueError, match="grid"):
        CommonGrid(lambda t: t, grid=0)
