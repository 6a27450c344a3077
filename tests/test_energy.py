"""Tests of attribution energy, leave-one-out Spearman, Holm, atypical cases, streaming AE and the report."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from monai_gamverify.energy import (
    SpearmanLOO,
    attribution_energy,
    atypical_cases,
    cohort_energy,
    energy_from_maps,
    energy_report,
    energy_scatter_png,
    energy_table,
    holm_adjust,
    spearman_loo,
    volume_energy,
    volume_energy_multi,
)
from monai_gamverify.energy.statistics import _spearman_rows
from monai_gamverify.io import save_nifti
from monai_gamverify.visualize.cam import GradCAM

N_OUT = 3


def tiny_net(dims: int) -> nn.Module:
    conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv1=conv(1, 4, 3, padding=1),
            act1=nn.ReLU(),
            layer=conv(4, 6, 3, padding=1, stride=2),
            act2=nn.ReLU(),
            pool=pool(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, N_OUT),
        )
    )
    return net.eval()


class RecordingCAM:
    """Wraps a CAM and records the batch sizes it is called with."""

    def __init__(self, cam):
        self.cam, self.batches = cam, []

    def __call__(self, x, **kwargs):
        self.batches.append(x.shape[0])
        return self.cam(x, **kwargs)


def volume(seed: int = 0, shape=(12, 10, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, *shape), generator=g)


# ---------------------------------------------------------------- attribution_energy

AE_SHAPES = [(3, 1, 8, 9), (2, 1, 5, 6, 7)]  # 2D and 3D maps


@pytest.mark.parametrize("shape", AE_SHAPES)
def test_attribution_energy_equals_manual_sum(shape):
    rng = np.random.default_rng(1)
    maps = rng.random(shape).astype(np.float32)
    manual = np.array([maps[b].astype(np.float64).sum() for b in range(shape[0])])
    out_t = attribution_energy(torch.from_numpy(maps))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64 and out_t.shape == (shape[0],)
    np.testing.assert_allclose(out_t.numpy(), manual, rtol=1e-12)
    out_np = attribution_energy(maps)
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, manual, rtol=1e-12)


@pytest.mark.parametrize("bad", [torch.ones(4), torch.tensor([[1.0, float("nan")]]), np.array([[np.inf, 1.0]])])
def test_attribution_energy_bad_input(bad):
    with pytest.raises(ValueError):
        attribution_energy(bad)


# ---------------------------------------------------------------- spearman_loo

CASES = [
    (np.random.default_rng(0).random(16), np.random.default_rng(1).random(16)),  # continuous, n as in the study
    (np.arange(7.0) ** 2, np.array([1, 2, 2, 3, 3, 3, 5.0])),  # ties in the scores
    (np.array([3.0, 3.0, 1.0, 2.0, 5.0, 5.0, 4.0, 0.5]), np.array([1, 1, 2, 2, 3, 3, 4, 4.0])),  # ties in both
    (np.random.default_rng(2).random(5), np.random.default_rng(3).integers(1, 6, 5).astype(float)),
]


@pytest.mark.parametrize("energy,scores", CASES)
def test_spearman_loo_matches_scipy_each_fold(energy, scores):
    if np.ptp(scores) == 0:
        pytest.skip("constant draw")
    res = spearman_loo(energy, scores, n_boot=50)
    full = stats.spearmanr(energy, scores)
    assert res.n == len(energy)
    assert res.rho == pytest.approx(full.statistic, abs=1e-15) and res.p == pytest.approx(full.pvalue, rel=1e-12)
    for i in range(len(energy)):
        e, s = np.delete(energy, i), np.delete(scores, i)
        if i in res.degenerate_folds:
            assert (np.ptp(e) == 0 or np.ptp(s) == 0) and res.loo_rho[i] == 0 and res.loo_p[i] == 1
            continue
        ref = stats.spearmanr(e, s)
        assert res.loo_rho[i] == ref.statistic and res.loo_p[i] == ref.pvalue  # exactly scipy
    assert res.median_rho == np.median(res.loo_rho) and res.median_p == np.median(res.loo_p)
    assert res.min_loo_rho == res.loo_rho.min() and res.max_loo_rho == res.loo_rho.max()
    assert res.most_influential == int(np.argmax(np.abs(res.loo_rho - res.rho)))
    assert np.isfinite(res.loo_rho).all() and np.isfinite(res.loo_p).all()


def test_spearman_loo_accepts_tensors_and_perfect_monotone():
    e = torch.tensor([1.0, 5.0, 2.0, 8.0, 3.0])
    res = spearman_loo(e, e * 2 + 1, n_boot=0)
    assert res.rho == pytest.approx(1.0) and np.allclose(res.loo_rho, 1.0)
    assert np.isnan(res.ci_low) and res.n_boot_valid == 0


def test_spearman_loo_degenerate_fold_is_nan_free():
    energy = np.array([0.3, 0.1, 0.4, 0.2, 0.9])
    scores = np.array([1.0, 1.0, 1.0, 1.0, 2.0])  # leaving out the last volume leaves constant scores
    res = spearman_loo(energy, scores, n_boot=200)
    assert res.degenerate_folds == (4,)
    assert res.loo_rho[4] == 0.0 and res.loo_p[4] == 1.0
    assert np.isfinite([res.median_rho, res.median_p, res.ci_low, res.ci_high]).all()
    assert 0 < res.n_boot_valid < 200  # constant resamples are skipped


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=(30, 9)).astype(float)
    y = rng.integers(0, 3, size=(30, 9)).astype(float)
    got = _spearman_rows(x, y)
    for r in range(30):
        if np.ptp(x[r]) == 0 or np.ptp(y[r]) == 0:
            assert np.isnan(got[r])
        else:
            assert got[r] == pytest.approx(stats.spearmanr(x[r], y[r]).statistic, abs=1e-12)


def test_bootstrap_interval_matches_independent_loop_and_seed():
    energy, scores = CASES[0]
    res = spearman_loo(energy, scores, n_boot=300, seed=7)
    idx = np.random.default_rng(7).integers(0, 16, size=(300, 16))
    boot = np.array([stats.spearmanr(energy[i], scores[i]).statistic for i in idx])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert res.ci_low == pytest.approx(lo, abs=1e-12) and res.ci_high == pytest.approx(hi, abs=1e-12)
    assert res.ci_low <= res.rho <= res.ci_high
    assert spearman_loo(energy, scores, n_boot=300, seed=7).ci_low == res.ci_low
    assert spearman_loo(energy, scores, n_boot=300, seed=8).ci_low != res.ci_low


@pytest.mark.parametrize(
    "energy,scores,match",
    [
        ([1.0, 2, 3, 4], [1.0, 2, 3], "differ in length"),
        ([1.0, 2, 3], [3.0, 1, 2], "at least 4"),
        ([1.0, 2], [3.0, 1], "at least 4"),
        ([1.0, 2, 3, 4], [1.0, np.nan, 3, 4], "scores contains NaN"),
        ([1.0, np.inf, 3, 4], [1.0, 2, 3, 4], "energy contains NaN or infinite"),
        ([1.0, 2, 3, 4], [2.0, 2, 2, 2], "scores are constant"),
        ([0.0, 0, 0, 0], [1.0, 2, 3, 4], "energy is constant"),
        ([[1.0, 2], [3, 4]], [1.0, 2, 3, 4], "1D"),
    ],
)
def test_spearman_loo_bad_input(energy, scores, match):
    with pytest.raises(ValueError, match=match):
        spearman_loo(energy, scores)


def test_spearman_loo_bad_settings():
    with pytest.raises(ValueError, match="ci"):
        spearman_loo([1.0, 2, 3, 4], [1.0, 3, 2, 4], ci=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        spearman_loo([1.0, 2, 3, 4], [1.0, 3, 2, 4], n_boot=-1)
    with pytest.raises(TypeError):
        spearman_loo(["a", "b", "c", "d"], [1.0, 3, 2, 4])


# ---------------------------------------------------------------- Holm and the table


def test_holm_against_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm_adjust([0.2]), [0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_adjust([0.2, 1.2])


def test_energy_table_rows_match_spearman_loo():
    rng = np.random.default_rng(5)
    s = {c: rng.random(16) for c in ("parotid", "larynx", "overall")}
    e = {"parotid": s["parotid"] * 3 + rng.random(16) * 0.3, "larynx": rng.random(16), "overall": s["overall"] + 1}
    df = energy_table(e, s, n_boot=100, seed=3, progress=False)
    assert list(df.category) == ["parotid", "larynx", "overall"]
    for row in df.itertuples():
        res = spearman_loo(e[row.category], s[row.category], n_boot=100, seed=3)
        assert (row.n, row.rho, row.p, row.median_loo_rho, row.median_loo_p) == (
            res.n,
            res.rho,
            res.p,
            res.median_rho,
            res.median_p,
        )
        assert (row.min_loo_rho, row.max_loo_rho, row.ci_low, row.ci_high) == (
            res.min_loo_rho,
            res.max_loo_rho,
            res.ci_low,
            res.ci_high,
        )
    np.testing.assert_allclose(df.p_holm, holm_adjust(df.p))
    assert bool(df.significant_holm.iloc[2]) and not bool(df.significant_holm.iloc[1])


def test_energy_table_bad_input():
    with pytest.raises(ValueError, match="only one"):
        energy_table({"a": [1.0, 2, 3, 4]}, {"b": [1.0, 2, 3, 4]}, progress=False)
    with pytest.raises(ValueError, match="'a'.*constant"):
        energy_table({"a": [1.0, 2, 3, 4]}, {"a": [1.0, 1, 1, 1]}, progress=False)


# ---------------------------------------------------------------- atypical cases


def test_atypical_cases_flags_the_outlier_only():
    scores = np.linspace(1, 5, 12)
    energy = 10 * scores + np.random.default_rng(0).normal(0, 0.2, 12)
    energy[5] += 25  # one volume with far too much attribution for its score
    df = atypical_cases(energy, scores, ids=[f"v{i}" for i in range(12)])
    assert df.loc[df.flag, "id"].tolist() == ["v5"] and df.loc[5, "direction"] == "high"
    slope, intercept = stats.theilslopes(energy, scores)[:2]
    np.testing.assert_allclose(df.residual, energy - (intercept + slope * scores))
    q1, q3 = np.percentile(df.residual, [25, 75])
    assert df.attrs["upper_fence"] == pytest.approx(q3 + 1.5 * (q3 - q1))


def test_atypical_cases_bad_input():
    with pytest.raises(ValueError, match="ids"):
        atypical_cases([1.0, 2, 3], [1.0, 2, 3], ids=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        atypical_cases([1.0, 2, 3], [1.0, 2, 3], ids=["a", "a", "b"])
    with pytest.raises(ValueError, match="constant"):
        atypical_cases([1.0, 2, 3], [1.0, 1, 1])


# ---------------------------------------------------------------- streaming AE of a model


@pytest.mark.parametrize("slice_axis", [0, 1, 2, -1])
def test_volume_energy_streamed_equals_in_memory(slice_axis):
    cam = GradCAM(tiny_net(2), target_layers="layer")
    vol = volume()
    n_slices = vol.shape[1 + slice_axis % 3]
    rec = RecordingCAM(cam)
    streamed = volume_energy(rec, vol, slice_axis=slice_axis, batch_size=3, class_idx=1, progress=False)
    assert max(rec.batches) <= 3 and sum(rec.batches) == n_slices  # never all slices at once
    in_memory = volume_energy(cam, vol, slice_axis=slice_axis, batch_size=n_slices, class_idx=1, progress=False)
    all_slices = vol.movedim(1 + slice_axis % 3, 0)  # (S, 1, h, w)
    manual = cam(all_slices.contiguous(), class_idx=1, normalize=False).double().sum().item()
    assert streamed == pytest.approx(manual, rel=1e-6) and in_memory == pytest.approx(manual, rel=1e-6)
    assert manual > 0
    # a batched volume (1, C, D, H, W) gives the same
    assert volume_energy(cam, vol[None], slice_axis=slice_axis, batch_size=5, class_idx=1, progress=False) == (
        pytest.approx(manual, rel=1e-6)
    )


@pytest.mark.parametrize("dims", [2, 3])
def test_volume_energy_whole_image(dims):
    cam = GradCAM(tiny_net(dims), target_layers="layer")
    img = volume(1)[..., 0] if dims == 2 else volume(1)
    got = volume_energy(cam, img, slice_axis=None, class_idx=0, progress=False)
    ref = cam(img[None], class_idx=0, normalize=False).double().sum().item()
    assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("slice_axis,dims", [(2, 2), (0, 2), (None, 3)])
def test_volume_energy_multi_equals_separate_calls(slice_axis, dims):
    cam = GradCAM(tiny_net(dims), target_layers="layer")
    vol = volume(2)
    rec = RecordingCAM(cam)
    cols = {"parotid": 0, "larynx": 2, "overall": 1}
    multi = volume_energy_multi(rec, vol, cols, slice_axis=slice_axis, batch_size=4, progress=False)
    assert list(multi) == list(cols)
    n_slices = 1 if slice_axis is None else vol.shape[1 + slice_axis]
    assert sum(rec.batches) == len(cols) * n_slices  # one pass: each slice batch explained once, K-fold repeated
    for name, col in cols.items():
        single = volume_energy(cam, vol, slice_axis=slice_axis, batch_size=4, class_idx=col, progress=False)
        assert multi[name] == pytest.approx(single, rel=1e-5)
    assert len({round(v, 6) for v in multi.values()}) == len(cols)  # the columns really differ
    assert volume_energy_multi(cam, vol, [0, 2], slice_axis=slice_axis, progress=False).keys() == {0, 2}


def test_volume_energy_bad_input():
    cam = GradCAM(tiny_net(2), target_layers="layer")
    with pytest.raises(ValueError, match="slice_axis"):
        volume_energy(cam, volume(), slice_axis=3, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        volume_energy(cam, volume(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="3D volume"):
        volume_energy(cam, volume()[..., 0], slice_axis=0, progress=False)
    with pytest.raises(ValueError, match="one volume"):
        volume_energy(cam, torch.rand(2, 1, 4, 4, 4), progress=False)
    with pytest.raises(ValueError, match="columns"):
        volume_energy_multi(cam, volume(), [], progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        volume_energy_multi(cam, volume(), [0, -1], progress=False)
    with pytest.raises(ValueError, match="single target layer"):
        volume_energy(GradCAM(tiny_net(2), target_layers=["conv1", "layer"]), volume(), progress=False)


def test_cohort_energy_from_tensors_and_files(tmp_path):
    cam = GradCAM(tiny_net(2), target_layers="layer")
    vols = {"a": volume(3), "b": volume(4)}
    save_nifti(vols["b"][0], tmp_path / "b.nii.gz")
    cols = {"parotid": 0, "overall": 2}
    df = cohort_energy(cam, [("a", vols["a"]), ("b", tmp_path / "b.nii.gz")], cols, batch_size=5, progress=False)
    assert list(df.columns) == ["id", "parotid", "overall"] and list(df.id) == ["a", "b"]
    for row in df.itertuples():
        ref = volume_energy_multi(cam, vols[row.id], cols, batch_size=5, progress=False)
        assert (row.parotid, row.overall) == pytest.approx((ref["parotid"], ref["overall"]), rel=1e-6)
    with pytest.raises(ValueError, match="no volume"):
        cohort_energy(cam, {}, cols, progress=False)


# ---------------------------------------------------------------- figures, maps and the report


def test_energy_scatter_png(tmp_path):
    e, s = CASES[1]
    out = energy_scatter_png(e, s, tmp_path / "sub" / "s.png", "parotid", flags=[0, 0, 1, 0, 0, 0, 0])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sub").glob(".*"))  # no temporary left behind


def test_energy_from_maps(tmp_path):
    rng = np.random.default_rng(0)
    sums = {}
    for cat in ("parotid", "larynx"):
        for vid in ("case1", "case2"):
            m = rng.random((4, 5, 6)).astype(np.float32)
            save_nifti(m, tmp_path / cat / f"{vid}.nii.gz")
            sums[(cat, vid)] = m.astype(np.float64).sum()
    df = energy_from_maps(tmp_path).set_index("id")
    for (cat, vid), v in sums.items():
        assert df.loc[vid, cat] == pytest.approx(v, rel=1e-12)


def test_energy_report_end_to_end(tmp_path):
    rng = np.random.default_rng(9)
    ids = [f"vol{i:02d}" for i in range(10)]
    scores = pd.DataFrame({"id": ids + ["extra"], "parotid": rng.random(11), "larynx": rng.random(11)})
    energy = pd.DataFrame(
        {"id": ids, "parotid": scores.parotid[:10] * 4 + rng.random(10) * 0.1, "larynx": rng.random(10)}
    )
    energy.loc[3, "larynx"] = np.nan  # missing AE: dropped from that category only
    energy.to_csv(tmp_path / "ae.csv", index=False)
    scores.to_csv(tmp_path / "sc.csv", index=False)
    out = energy_report(tmp_path / "ae.csv", tmp_path / "sc.csv", tmp_path / "out", n_boot=50, progress=False)
    table = pd.read_csv(tmp_path / "out" / "energy_table.csv")
    assert table.set_index("category").loc["parotid", "n"] == 10 and table.set_index("category").loc["larynx", "n"] == 9
    ref = spearman_loo(energy.parotid, scores.parotid[:10], n_boot=50)
    assert table.loc[table.category == "parotid", "median_loo_rho"].item() == pytest.approx(ref.median_rho)
    loo = pd.read_csv(tmp_path / "out" / "energy_loo.csv")
    np.testing.assert_allclose(loo[loo.category == "parotid"].loo_rho, ref.loo_rho)
    js = json.loads((tmp_path / "out" / "energy_table.json").read_text())
    assert {r["category"] for r in js["table"]} == {"parotid", "larynx"}
    for name in ("energy_scatter_parotid.png", "energy_scatter_larynx.png", "energy_atypical.csv"):
        assert (tmp_path / "out" / name).is_file()
    assert set(out["paths"]) >= {"table_csv", "table_json", "loo_csv", "atypical_csv"}
    # a volume with AE but no score is an error
    energy.loc[0, "id"] = "unknown"
    energy.to_csv(tmp_path / "ae2.csv", index=False)
    with pytest.raises(ValueError, match="no score row"):
        energy_report(tmp_path / "ae2.csv", tmp_path / "sc.csv", tmp_path / "out2", progress=False)
    with pytest.raises(ValueError, match="not found"):
        energy_report(tmp_path / "ae.csv", tmp_path / "sc.csv", tmp_path / "out3", categories="mandible")


def test_energy_report_computes_each_leave_one_out_once(tmp_path, monkeypatch):
    # per category: one spearmanr on all n volumes + one per fold, nothing more (the report once ran every LOO twice)
    rng = np.random.default_rng(4)
    ids = [f"v{i}" for i in range(9)]
    pd.DataFrame({"id": ids, "a": rng.random(9), "b": rng.random(9)}).to_csv(tmp_path / "ae.csv", index=False)
    pd.DataFrame({"id": ids, "a": rng.random(9), "b": rng.random(9)}).to_csv(tmp_path / "sc.csv", index=False)
    calls = []
    real = stats.spearmanr
    monkeypatch.setattr(stats, "spearmanr", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    energy_report(tmp_path / "ae.csv", tmp_path / "sc.csv", tmp_path / "out", n_boot=20, progress=False)
    assert sorted(calls) == sorted(2 * ([9] + [8] * 9))  # two categories, n = 9


def test_result_summary_is_scalar():
    res = spearman_loo(*CASES[0], n_boot=10)
    assert isinstance(res, SpearmanLOO)
    summary = res.summary()
    assert "loo_rho" not in summary and summary["n"] == 16 and summary["median_rho"] == res.median_rho


def test_energy_report_leaves_out_a_degenerate_category(tmp_path, caplog):
    """All-zero maps of one output give constant AE: that category is skipped with its reason, the rest analysed;
    nothing usable is an error naming the reasons."""
    rng = np.random.default_rng(3)
    ids = [f"v{i}" for i in range(8)]
    scores = pd.DataFrame({"id": ids, "parotid": rng.random(8), "larynx": rng.random(8)})
    energy = pd.DataFrame({"id": ids, "parotid": rng.random(8), "larynx": np.zeros(8)})
    energy.to_csv(tmp_path / "ae.csv", index=False)
    scores.to_csv(tmp_path / "sc.csv", index=False)
    with caplog.at_level("WARNING"):
        out = energy_report(tmp_path / "ae.csv", tmp_path / "sc.csv", tmp_path / "out", n_boot=20, progress=False)
    assert list(pd.read_csv(tmp_path / "out" / "energy_table.csv").category) == ["parotid"]
    assert set(out["skipped"]) == {"larynx"} and "energy is constant" in out["skipped"]["larynx"]
    assert "larynx" in caplog.text
    js = json.loads((tmp_path / "out" / "energy_table.json").read_text())
    assert set(js["skipped"]) == {"larynx"}
    assert not (tmp_path / "out" / "energy_scatter_larynx.png").exists()
    energy["parotid"] = 1.0
    energy.to_csv(tmp_path / "ae0.csv", index=False)
    with pytest.raises(ValueError, match="no category can be analysed.*constant"):
        energy_report(tmp_path / "ae0.csv", tmp_path / "sc.csv", tmp_path / "out0", progress=False)
