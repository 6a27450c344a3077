"""One-class verification: conformal p-values are uniform for exchangeable suitable models, small for another one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from monai_gamverify.verification.oneclass import (
    conformal_pvalue,
    nonconformity_scores,
    one_class_verify,
    run_one_class,
)


def test_pvalues_of_exchangeable_vectors_are_uniform():
    # 10 exchangeable model-level vectors per draw (9 references + 1 candidate), 2000 seeded draws
    m, n_sims = 10, 2000
    p = np.array(
        [
            conformal_pvalue(nonconformity_scores(np.random.default_rng(s).gamma(2.0, size=(m, 7)), k=3))
            for s in range(n_sims)
        ]
    )
    # p is discrete uniform on {1/10, ..., 1}: chi-square on the 10 values, and P(p <= a) <= a
    counts = np.array([np.sum(np.isclose(p, (i + 1) / m)) for i in range(m)])
    assert counts.sum() == n_sims
    assert stats.chisquare(counts).pvalue > 0.001
    for a in (0.1, 0.2, 0.5):
        assert abs(np.mean(p <= a) - a) < 3 * np.sqrt(a * (1 - a) / n_sims) + 1e-9


def test_scores_and_pvalue_basics():
    z = np.array([[0.0, 1.0], [0.1, 1.1], [0.2, 0.9], [5.0, -3.0]])
    s = nonconformity_scores(z, k=1)
    assert np.argmax(s) == 3 and conformal_pvalue(s) == 0.25
    assert conformal_pvalue([0.3, 0.2, 0.1], index=2) == 1.0
    perm = [2, 0, 3, 1]
    np.testing.assert_allclose(nonconformity_scores(z[perm], k=2), nonconformity_scores(z, k=2)[perm])  # symmetric
    with pytest.raises(ValueError, match="n_models >= 2"):
        nonconformity_scores(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        nonconformity_scores(np.array([[0.0], [np.nan]]))


class ConvMap:
    """A "model" whose attention is a normalised smooth response of the image to its own kernel."""

    def __init__(self, kernel: torch.Tensor) -> None:
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(torch.nn.functional.conv2d(x, self.kernel, padding=2))
        lo = r.amin(dim=(2, 3), keepdim=True)
        hi = r.amax(dim=(2, 3), keepdim=True)
        return (r - lo) / (hi - lo).clamp_min(1e-8)


def _setting(seed: int, n_refs: int = 8, different: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(123))
    kern = lambda: base + 0.6 * torch.randn(1, 1, 5, 5, generator=g)  # noqa: E731
    refs = {f"r{i}": ConvMap(kern()) for i in range(n_refs)}
    cand = ConvMap(-base.flip(-1) + 0.6 * torch.randn(1, 1, 5, 5, generator=g) if different else kern())
    data = [{"image": torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(7 + b))} for b in range(2)]
    return refs, {"cand": cand}, data


def test_map_level_pvalues_uniform_for_exchangeable_models_small_for_a_different_one():
    metrics = ["iou", "cosine", "pearson", "kl"]
    n_sims = 60
    p = np.array(
        [
            one_class_verify(*_setting(s), metrics=metrics, progress=False).verdicts["p_value"].iloc[0]
            for s in range(n_sims)
        ]
    )
    # |S| = 9: p uniform on {1/9, ..., 1}; mean 5/9, P(p <= 1/3) = 1/3
    assert abs(p.mean() - 5 / 9) < 3 * np.sqrt((80 / 81 / 12) / n_sims) + 0.01
    assert abs(np.mean(p <= 1 / 3 + 1e-9) - 1 / 3) < 3 * np.sqrt(2 / 9 / n_sims)
    for s in range(3):
        res = one_class_verify(*_setting(s, different=True), metrics=metrics, alpha=0.2, progress=False)
        row = res.verdicts.iloc[0]
        assert row["p_value"] == pytest.approx(1 / 9) and row["verdict"] == "not suitable"


def test_one_class_reference_as_candidate_and_errors():
    refs, cands, data = _setting(0, n_refs=4)
    res = one_class_verify(refs, {"r0": refs["r0"], **cands}, data, labels={"cand": 1}, progress=False)
    assert res.verdicts["n_set"].tolist() == [4, 5]  # r0 tested against r1..r3 (leave one out)
    assert set(res.features["candidate"]) == {"r0", "cand"}
    assert len(res.features) == (4 + 5) * 8
    with pytest.raises(ValueError, match=">= 2 reference"):
        one_class_verify({"r0": refs["r0"]}, cands, data, progress=False)
    with pytest.raises(TypeError, match="iterator"):
        one_class_verify(refs, cands, iter(data), progress=False)
    with pytest.raises(ValueError, match="unknown candidate"):
        one_class_verify(refs, cands, data, labels={"x": 1}, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        one_class_verify(refs, cands, data, alpha=1.5, progress=False)


def test_run_one_class_report(tmp_path):
    def net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3),
        )  # fmt: skip

    data = [{"image": torch.rand(3, 1, 16, 16), "subject": [f"s{b}{i}" for i in range(3)]} for b in range(2)]
    refs = {f"r{i}": (net(i), "2") for i in range(3)}
    report = run_one_class(
        refs, {"new": (net(9), "2"), "r0": refs["r0"]}, data, tmp_path, labels={"new": 0, "r0": 1}, progress=False
    )
    for name in ("features.csv", "model_features.csv", "predictions.csv", "verdicts.csv", "summary.csv", "cv.json",
                 "roc.png", "reference_map.nii.gz", "reference_map.png"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert cv["one_class"] and cv["protocol"].startswith("one-class conformal")
    assert set(cv["per_model"]) == {"new", "r0"} and 0 < cv["per_model"]["new"]["p_value"] <= 1
    assert report["model_level_roc_auc"] in (0.0, 1.0)
