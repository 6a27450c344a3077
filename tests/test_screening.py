"""In-distribution screen: detectors against independent references, conformal coverage, data profile, DICOM input,
save/load with tamper detection, bad volumes screened (never a crash), bundle-level fit/run."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from monai_gamverify.apps.pipeline import ImagePipeline, PreprocessingError, simple_preprocessing
from monai_gamverify.apps.screening import fit_screen, run_screen, screen_record
from monai_gamverify.data.synthetic import generate, make_cohort
from monai_gamverify.metrics.ood import extract_features
from monai_gamverify.networks import SmallCNN
from monai_gamverify.screening import (
    PENULTIMATE,
    ClassMahalanobis,
    FeatureRecorder,
    KNNDetector,
    RelativeMahalanobis,
    Screen,
    ScreenFileError,
    bonferroni,
    conformal_pvalues,
    fisher_conformal,
    intensity_window_of,
    pool_features,
    profile_image,
)
from monai_gamverify.screening.profile import layout_moments, otsu_threshold
from monai_gamverify.visualize.cam import GradCAM, ScoreCAM
from monai_gamverify.visualize.hooks import record_activations

REPO = Path(__file__).resolve().parents[1]
SOS = REPO / "bundles" / "sos_staging"
TINY = {"network_name": "small_cnn", "networks#small_cnn#width": 4, "roi_size": [16, 16, 16], "pixdim": [2.5] * 3}
WINDOW = (-1000.0, 2000.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mt(arr: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(arr), dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def _pre(img: torch.Tensor) -> torch.Tensor:
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    return ((t.float().clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).float()


# --------------------------------------------------------------------------------------------- detectors vs refs
def _features(seed: int = 0, n: int = 90, d: int = 6, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0 * rng.normal(size=(k, d))[y]
    return x, y


def test_class_mahalanobis_matches_scipy():
    x, y = _features()
    q = np.random.default_rng(1).normal(size=(7, x.shape[1])) * 3
    det = ClassMahalanobis(reg=0.0).fit(x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    vi = np.linalg.inv(centred.T @ centred / len(x))
    ref = [min(mahalanobis(v, m, vi) ** 2 for m in means) for v in q]
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-8)


def test_relative_mahalanobis_matches_sklearn():
    x, y = _features(2)
    q = np.random.default_rng(3).normal(size=(5, x.shape[1])) * 2
    det = RelativeMahalanobis(reg=0.0).fit(x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    vi = np.linalg.inv((x - means[y]).T @ (x - means[y]) / len(x))
    cls = np.array([min(mahalanobis(v, m, vi) ** 2 for m in means) for v in q])
    background = EmpiricalCovariance().fit(x).mahalanobis(q)
    np.testing.assert_allclose(det.score(q), cls - background, rtol=1e-7, atol=1e-8)


def test_knn_matches_sklearn_cosine():
    x, _ = _features(4, n=40)
    q = np.random.default_rng(5).normal(size=(6, x.shape[1]))
    det = KNNDetector(k=5).fit(x)
    nn_ = NearestNeighbors(n_neighbors=6, metric="cosine").fit(x)
    cos_d, _ = nn_.kneighbors(q, n_neighbors=5)
    np.testing.assert_allclose(det.score(q), np.sqrt(2 * cos_d[:, -1]), rtol=1e-6, atol=1e-9)
    self_d, _ = nn_.kneighbors(x, n_neighbors=6)  # the point itself is its own nearest neighbour
    np.testing.assert_allclose(det.score(x, exclude_self=True), np.sqrt(np.clip(2 * self_d[:, -1], 0, None)), atol=1e-6)


def test_pool_features_mean_and_std():
    a = torch.randn(2, 3, 4, 5, 6)
    ref = np.concatenate([a.mean((2, 3, 4)).numpy(), a.std((2, 3, 4), unbiased=False).numpy()], 1)
    np.testing.assert_allclose(pool_features(a, moments=2), ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ conformal
def test_conformal_pvalues_brute_force_and_bonferroni():
    rng = np.random.default_rng(0)
    cal, s = rng.normal(size=30), rng.normal(size=50)
    ref = np.array([(1 + np.sum(cal >= v)) / 31 for v in s])
    np.testing.assert_allclose(conformal_pvalues(cal, s), ref)
    assert np.isnan(conformal_pvalues(cal, [np.nan])[0])
    np.testing.assert_allclose(bonferroni(np.array([[0.01, 0.5, np.nan], [0.6, 0.9, 0.7]])), [0.02, 1.0])


@pytest.mark.parametrize("n_cal", [19, 39, 99])
def test_conformal_false_rejection_rate_at_most_alpha(n_cal):
    """Over many draws of calibration and test sets from one distribution, the rejection rate at alpha stays <= alpha
    (within sampling error), for single scores and for Bonferroni over three dependent detectors."""
    rng = np.random.default_rng(n_cal)
    alpha, draws, n_test = 0.05, 400, 100
    single, combined, fisher = [], [], []
    for _ in range(draws):
        z = rng.standard_t(3, size=(n_cal + n_test, 3))
        z[:, 1] = 0.7 * z[:, 0] + 0.3 * z[:, 1]  # dependent detectors
        cal, test = z[:n_cal], z[n_cal:]
        p = np.stack([conformal_pvalues(cal[:, j], test[:, j]) for j in range(3)], 1)
        single.append(np.mean(p[:, 0] <= alpha))
        combined.append(np.mean(bonferroni(p, axis=1) <= alpha))
        fisher.append(np.mean(fisher_conformal(cal, test[: n_test // 4], cal, test[: n_test // 4])[0] <= alpha))
    exact = np.floor(alpha * (n_cal + 1)) / (n_cal + 1)  # the single-score rate is exactly this in expectation
    se = np.std(single) / np.sqrt(draws)
    assert abs(np.mean(single) - exact) < 4 * se + 1e-3
    assert np.mean(single) <= alpha + 4 * se
    assert np.mean(combined) <= alpha + 4 * np.std(combined) / np.sqrt(draws)
    # the symmetric Fisher combination is exactly valid too: its rate is close to the single score's, not far below
    fse = np.std(fisher) / np.sqrt(draws)
    assert np.mean(fisher) <= alpha + 4 * fse and np.mean(fisher) > 0.5 * exact


def _tail_p(cal_stats: np.ndarray, stat: float, n1: int, scale: float = 2.0) -> float:
    """Rank p-value among n1 - 1 calibration statistics, and beyond them all exp(-excess / scale) / n1."""
    n_ge = int(np.sum(cal_stats >= stat - 1e-12))
    return (1 + n_ge) / n1 if n_ge else float(np.exp(-(stat - cal_stats.max()) / scale) / n1)


def test_conformal_tail_extension():
    """Beyond every calibration score the p-value keeps falling with the excess on the z scale; elsewhere (and for
    every alpha >= 1 / (n + 1)) it is the rank p-value."""
    cal = np.random.default_rng(0).normal(size=19)
    s = np.array([0.0, cal.max() + 0.1, cal.max() + 1.0, cal.max() + 10.0, np.nan])
    rank = conformal_pvalues(cal, s)
    p = conformal_pvalues(cal, s, 2 * cal, 2 * s)
    assert p[0] == rank[0] and np.isnan(p[4]) and rank[1] == rank[2] == rank[3] == 1 / 20
    np.testing.assert_allclose(p[1:4], np.exp(-2 * (s[1:4] - cal.max())) / 20)
    assert 1 / 20 > p[1] > p[2] > p[3] > 0


def test_fisher_conformal_brute_force_and_power():
    rng = np.random.default_rng(1)
    cal, test = rng.normal(size=(25, 3)), rng.normal(size=(6, 3))
    test[0, 2] = np.nan  # a detector without input: p = 1 for that image, the calibration ranks without it
    test[1] = [4.0, 5.0, 6.0]  # far out on every detector
    want_p, want_t = [], []
    for x in test:
        pool = np.vstack([cal, x])  # the n + 1 images alike: each one's p-values among the other n
        stats = []
        for i in range(len(pool)):
            others = np.delete(pool, i, axis=0)
            ps = [(1 + np.sum(others[:, j] >= pool[i, j])) / 26 if not np.isnan(pool[i, j]) else 1.0 for j in range(3)]
            stats.append(-2 * np.sum(np.log(ps)))
        want_t.append(stats[-1])
        want_p.append(_tail_p(np.asarray(stats[:-1]), stats[-1], 26))
    p, t = fisher_conformal(cal, test)
    np.testing.assert_allclose(t, want_t)
    np.testing.assert_allclose(p, want_p)
    # with a fixed z scale, the excess over the largest other counts: brute force again over the n + 1 images
    zc, zt = 2 * cal + 1, 2 * test + 1
    want_p, want_t = [], []
    for x, zx in zip(test, zt):
        pool, zpool = np.vstack([cal, x]), np.vstack([zc, zx])
        stats = []
        for i in range(len(pool)):
            others, zo = np.delete(pool, i, axis=0), np.delete(zpool, i, axis=0)
            stat = 0.0
            for j in range(3):
                if np.isnan(pool[i, j]):
                    continue
                stat -= 2 * np.log((1 + np.sum(others[:, j] >= pool[i, j])) / 26)
                stat += 2 * max(0.0, zpool[i, j] - np.nanmax(zo[:, j]))
            stats.append(stat)
        want_t.append(stats[-1])
        want_p.append(_tail_p(np.asarray(stats[:-1]), stats[-1], 26))
    p, t = fisher_conformal(cal, test, zc, zt)
    np.testing.assert_allclose(t, want_t)
    np.testing.assert_allclose(p, want_p)
    # many test rows are scored in blocks: the same numbers as one call per row
    many = np.random.default_rng(2).normal(size=(60_000, 3))
    block_p, block_t = fisher_conformal(cal, many, 2 * cal + 1, 2 * many + 1)
    for i in (0, 29_999, 59_999):
        one_p, one_t = fisher_conformal(cal, many[i : i + 1], 2 * cal + 1, 2 * many[i : i + 1] + 1)
        assert block_p[i] == one_p[0] and block_t[i] == pytest.approx(one_t[0])
    assert p[1] < 1 / 26  # beyond every calibration image: below the rank floor, by its excess
    plain, _ = fisher_conformal(cal, test, zc, zt, tail=False)
    assert plain[1] == pytest.approx(1 / 26) and plain[0] == pytest.approx(p[0])  # the rank p-value otherwise
    # the rejections at any alpha >= 1 / (n + 1) are those of the rank p-value
    for alpha in (1 / 26, 0.05, 0.1, 0.5):
        np.testing.assert_array_equal(p <= alpha, plain <= alpha)
    with pytest.raises(ValueError, match="same m"):
        fisher_conformal(cal, test[:, :2])


# ------------------------------------------------------------------------------------------------------- profile
def test_profile_against_numpy():
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 600, (12, 10, 8))
    affine = np.diag([1.5, 2.0, 0.5, 1.0])
    prof = profile_image(_mt(vol, affine), WINDOW)
    assert prof.spacing == pytest.approx((1.5, 2.0, 0.5))
    assert prof.fov_mm == pytest.approx((18.0, 20.0, 4.0))
    assert prof.orientation == "RAS"
    assert prof.percentiles["p50"] == pytest.approx(np.percentile(vol, 50), rel=1e-5)
    assert prof.frac_below == pytest.approx(np.mean(vol < -1000))
    assert prof.frac_above == pytest.approx(np.mean(vol > 2000))
    assert prof.foreground_fraction == pytest.approx(np.mean(vol > -700))
    assert sum(prof.histogram) == pytest.approx(1.0)
    assert prof.hard_failures == []
    lps = profile_image(_mt(vol, np.diag([-1.5, -2.0, 0.5, 1.0])), WINDOW)
    assert lps.orientation == "LPS"


@pytest.mark.parametrize("shape", [(2, 9, 13), (1, 7, 10, 12)])
def test_layout_moments_against_scipy_and_numpy(shape):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    t = rng.random(shape) + 0.5 * (np.arange(shape[-1]) / shape[-1])
    got = layout_moments(torch.as_tensor(t, dtype=torch.float32))
    mass = (t - t.min()).sum(0)
    nd = mass.ndim
    grid = np.stack(np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in mass.shape], indexing="ij")).reshape(nd, -1)
    centre_vox = np.asarray(ndimage.center_of_mass(mass))  # in voxels: map to [-0.5, 0.5]
    np.testing.assert_allclose(got[:nd], centre_vox / (np.asarray(mass.shape) - 1) - 0.5, rtol=1e-5, atol=1e-7)
    cov = np.cov(grid, aweights=mass.reshape(-1), bias=True)
    np.testing.assert_allclose(got[nd:], cov[np.triu_indices(nd)], rtol=1e-4, atol=1e-8)
    assert np.isnan(layout_moments(torch.ones(shape))).all()


def test_otsu_matches_skimage():
    filters = pytest.importorskip("skimage.filters", reason="scikit-image is the reference")
    rng = np.random.default_rng(0)
    for v in (np.r_[rng.normal(0, 1, 500), rng.normal(6, 2, 300)], rng.uniform(-1000, 3000, 4000)):
        assert otsu_threshold(v) == pytest.approx(filters.threshold_otsu(v), rel=1e-9, abs=1e-9)


def test_intensity_window_of_bundle_preprocessing():
    from monai_gamverify.bundle import load_bundle

    bm = load_bundle(SOS, overrides=TINY, require_weights=False, device="cpu")
    assert intensity_window_of(bm.preprocessing()) == WINDOW
    assert intensity_window_of(None) is None


@pytest.mark.parametrize(
    ("arr", "phrase"),
    [
        (np.full((1, 8, 8, 8), 7.0), "constant volume"),
        (np.where(np.arange(512).reshape(1, 8, 8, 8) == 3, np.nan, 1.0), "NaN or infinite"),
        (np.random.default_rng(0).normal(size=(1, 8, 8)), "spatial dimension"),
        (np.random.default_rng(0).normal(size=(2, 8, 8, 8)), "channel"),
        (np.random.default_rng(0).normal(size=(1, 8, 8, 1)), "single slice"),
        (np.random.default_rng(0).normal(-3000, 10, size=(1, 8, 8, 8)), "below the intensity window"),
    ],
)
def test_profile_hard_failures_have_reasons(arr, phrase):
    prof = profile_image(MetaTensor(torch.as_tensor(arr, dtype=torch.float32)), WINDOW)
    assert any(phrase in f for f in prof.hard_failures), prof.hard_failures


# ------------------------------------------------------------------------------------------------------ recorder
def test_recorder_matches_hooks_and_extract_features():
    net = SmallCNN(3, 1, 5, width=4).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with FeatureRecorder(net, ["stem", "res2"], head="head") as rec:
        res = GradCAM(net, "res4").explain(x)
    ref = record_activations(net, x, ["stem", "res2"])
    for name in ("stem", "res2"):
        torch.testing.assert_close(rec.activations[name], ref[name])
    torch.testing.assert_close(rec.activations[PENULTIMATE], extract_features(net, x)[0])
    with FeatureRecorder(net, ["stem"], pool=True) as pooled:  # what the screen keeps: channel means and stds
        GradCAM(net, "res4").explain(x)
    np.testing.assert_allclose(pooled.activations["stem"].numpy(), pool_features(ref["stem"], moments=2))
    torch.testing.assert_close(res.logits, net(x))
    assert not net.stem._forward_hooks and not net.head._forward_pre_hooks
    with FeatureRecorder(net, ["stem"], head="head") as rec:  # Score-CAM runs masked inputs after the clean one
        ScoreCAM(net, "res4").explain(x[:1])
    torch.testing.assert_close(rec.activations["stem"], ref["stem"][:1])


# --------------------------------------------------------------------------------------------------- the screen
def _new_screen(**kwargs) -> Screen:
    return Screen(window=WINDOW, early_layers=["stem"], head="head", cam_layer="res4", modality="CT", k=3, **kwargs)


def _engine(net: SmallCNN, screen: Screen | None = None) -> ImagePipeline:
    """The engine that observes images for the screen: the window of _pre as the preprocessing."""
    pre = simple_preprocessing(a_min=WINDOW[0], a_max=WINDOW[1])
    return ImagePipeline(net, "res4", preprocessing=pre, screen=screen, feature_layers=["stem"], head="head")


def _records(screen: Screen, net: SmallCNN, images: list) -> list:
    engine = _engine(net, screen)
    return [screen_record(engine, screen, im) for im in images]


@pytest.fixture(scope="module")
def cohort_obs() -> tuple[SmallCNN, list, np.ndarray, list, np.ndarray]:
    """64 SOS volumes (24^3) observed once by the engine through an untrained SmallCNN (profile, features, logits,
    Grad-CAM)."""
    torch.manual_seed(0)
    cohort = generate("sos", n=64, size=24, seed=0)
    imgs = [_mt(a, cohort.affine) for a in cohort.images]
    net = SmallCNN(3, 1, 5, width=4).eval()
    return net, imgs, cohort.affine, [_engine(net).observe(im) for im in imgs], cohort.labels


@pytest.fixture(scope="module")
def fitted(cohort_obs) -> tuple[Screen, SmallCNN, list, np.ndarray]:
    net, imgs, affine, obs, labels = cohort_obs
    screen = _new_screen().fit(obs, labels, calibration_fraction=0.35, seed=0)
    return screen, net, imgs, affine


@pytest.fixture(scope="module")
def observations(cohort_obs) -> list:
    return cohort_obs[3]


def test_engine_with_a_screen_against_independent_references(fitted):
    """ImagePipeline with the screen (what `gamverify cam --screen` and the cohort run) against the detectors
    recomputed from scratch: the early layer pooled by numpy and a k-NN of scikit-learn, the head input of MONAI's
    feature extractor and scipy's Mahalanobis distance; the combined p-value ranked against the calibration set."""
    screen, net, imgs, _ = fitted
    pipe = _engine(net, screen)
    raw = imgs[0]
    res = pipe.run(raw)
    row = res.screen
    assert row == screen.score(pipe.observe(raw))  # the engine's answer is the screen's on the engine's observation
    x = _pre(raw)[None]
    stem = record_activations(net, x, "stem")["stem"][0].double().numpy().reshape(4, -1)
    early = np.r_[stem.mean(1), stem.std(1)]
    bank = screen.detectors_["knn_early"].bank
    nn_ = NearestNeighbors(n_neighbors=3, metric="cosine").fit(bank)
    cos_d, _ = nn_.kneighbors(early[None])
    assert row["score_knn_early"] == pytest.approx(float(np.sqrt(2 * cos_d[0, -1])), rel=1e-5)
    feats = extract_features(net, x)[0][0].double().numpy()
    det = screen.detectors_["maha_penultimate"].det
    vi = det.precision_.numpy()
    want = min(mahalanobis(feats, m, vi) ** 2 for m in det.means_.numpy())
    assert row["score_maha_penultimate"] == pytest.approx(want, rel=1e-5)
    cal = screen.cal_scores_[:, 5 + 2]  # knn_early's column (DETECTORS order)
    assert row["p_knn_early"] == pytest.approx((1 + np.sum(cal >= row["score_knn_early"])) / (screen.n_cal_ + 1))
    assert res.in_distribution == row["in_distribution"] and res.p_value == row["p_value"]
    assert {"in_distribution", "p_value", "reasons", "score_knn_early", "p_attention"} <= set(row)
    assert screen.n_cal_ == 22 and (screen.n_cal_ + 1) * 0.05 >= 1


def test_screen_false_rejection_rate_binomial_bound(observations, cohort_obs):
    """Exchangeable images (one cohort, a random permutation each draw): the screen's false-rejection rate at alpha
    is at most alpha. One held-out image per draw (independent trials), so the count of rejections is
    Binomial(draws, rate <= alpha): it must stay below the binomial's 0.999 quantile at alpha (a p-value computed
    against the fit images, or any other broken calibration, rejects far more)."""
    from scipy.stats import binom

    labels = cohort_obs[4]
    records = [_new_screen().record(o) for o in observations]
    draws, alpha, rejected = 150, 0.05, 0
    rng = np.random.default_rng(0)
    for _ in range(draws):
        perm = rng.permutation(len(records))
        fit, cal, test = perm[:40], perm[40:63], perm[63]  # 23 calibration images: rate floor(0.05 * 24) / 24
        screen = _new_screen().fit([records[i] for i in fit], labels[fit], calibration=[records[i] for i in cal])
        rejected += not screen.score_observations([records[test]])[0]["in_distribution"]
    assert rejected <= binom.ppf(0.999, draws, alpha), rejected


def test_screen_rejects_far_ood_with_reasons_and_tail(fitted):
    screen, net, _, affine = fitted
    fresh = generate("sos", n=4, size=24, seed=99)
    rng = np.random.default_rng(0)
    odd = {
        "noise": rng.normal(0, 800, (24, 24, 24)),
        "mri": rng.uniform(0, 800, (24, 24, 24)),
        "constant": np.full((24, 24, 24), 40.0),
        "nan": np.where(rng.random((24, 24, 24)) < 0.01, np.nan, fresh.images[0]),
    }
    out = {
        k: r
        for k, r in zip(odd, screen.score_observations(_records(screen, net, [_mt(v, affine) for v in odd.values()])))
    }
    for name, r in out.items():
        assert not r["in_distribution"], name
        assert r["reasons"] and all(isinstance(s, str) for s in r["reasons"]), name
    assert out["constant"]["p_value"] == 0.0 and "constant volume" in out["constant"]["reasons"][0]
    assert "NaN" in out["nan"]["reasons"][0]
    floor = 1 / (screen.n_cal_ + 1)
    assert out["noise"]["p_value"] < floor  # beyond every calibration image: below the rank floor
    # the tail is real: the further beyond every calibration image, the smaller the p-value
    spacings = (4.0, 8.0, 16.0)
    spaced = screen.score_observations(
        _records(screen, net, [_mt(fresh.images[1], np.diag([s, s, s, 1])) for s in spacings])
    )
    assert any("spacing 4 x 4 x 4 mm is outside the training range" in s for s in spaced[0]["reasons"])
    ps = [r["p_value"] for r in spaced]
    assert floor > ps[0] > ps[1] > ps[2] > 0, ps
    assert spaced[0]["p_profile"] > spaced[1]["p_profile"] > spaced[2]["p_profile"]


def test_fit_refuses_too_few_calibration_images(observations):
    with pytest.raises(ValueError, match=r"18 calibration images cannot reject anything at alpha = 0.05"):
        _new_screen().fit(observations[:40], calibration=observations[40:58])
    _new_screen().fit(observations[:40], calibration=observations[40:59])  # 19: 1/20 = alpha, it can reject


def test_save_load_round_trip_and_tampering(fitted, observations, tmp_path):
    screen = fitted[0]
    obs = observations[:3]
    screen.save(tmp_path / "s")
    loaded = Screen.load(tmp_path / "s")
    assert loaded.score_observations(obs) == screen.score_observations(obs)
    # a changed array (re-saved as a valid npz) is refused
    with np.load(tmp_path / "s" / "screen.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["cal_stat"] = arrays["cal_stat"] + 1.0
    np.savez(tmp_path / "s" / "screen.npz", **arrays)
    with pytest.raises(ScreenFileError, match="modified"):
        Screen.load(tmp_path / "s")
    # a changed setting in the JSON is refused
    screen.save(tmp_path / "t")
    content = json.loads((tmp_path / "t" / "screen.json").read_text())
    content["config"]["alpha"] = 0.5
    (tmp_path / "t" / "screen.json").write_text(json.dumps(content))
    with pytest.raises(ScreenFileError, match="modified"):
        Screen.load(tmp_path / "t")
    # an object array (pickle) is never loaded
    screen.save(tmp_path / "u")
    np.savez(tmp_path / "u" / "screen.npz", evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ScreenFileError):
        Screen.load(tmp_path / "u")
    with pytest.raises(ScreenFileError, match="missing"):
        Screen.load(tmp_path / "nothing")


def test_screen_with_a_subset_of_detectors(fitted, observations, tmp_path):
    _, net, imgs, _ = fitted
    screen = Screen(window=WINDOW, early_layers=["stem"], head="head", cam_layer="res4", use=["knn_penultimate"])
    screen.fit(observations[:40], calibration=observations[40:], seed=0)
    assert screen.detectors == ["knn_penultimate"] and screen.n_cal_ == 24
    row = Screen.load(screen.save(tmp_path / "k")).score_observations(_records(screen, net, imgs[:1]))[0]
    assert [k for k in row if k.startswith("p_") and k != "p_value"] == ["p_knn_penultimate"]
    # one detector: the combined p-value is that detector's conformal p-value
    assert row["p_value"] == pytest.approx(row["p_knn_penultimate"])
    const = screen.score_observations(_records(screen, net, [_mt(np.zeros((24,) * 3), np.eye(4))]))[0]
    assert not const["in_distribution"] and "constant volume" in const["reasons"][0]
    with pytest.raises(ValueError, match="unknown detector"):
        Screen(use=["magic"])


# ---------------------------------------------------------------------------------------------------- file input
def _write_dicom_series(vol: np.ndarray, spacing: tuple[float, float, float], out: Path) -> list[Path]:
    """One DICOM file per slice (ITK/GDCM; slice position in each file), vol in (z, y, x) order."""
    itk = pytest.importorskip("itk", reason="writing a DICOM series needs itk (or pydicom)")
    out.mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.2.1125.1.7"
    files = []
    for i in range(vol.shape[0]):
        sl = itk.image_from_array(np.ascontiguousarray(vol[i : i + 1].astype(np.int16)))
        sl.SetSpacing(list(spacing))
        sl.SetOrigin([0.0, 0.0, spacing[2] * i])
        md = sl.GetMetaDataDictionary()
        for tag, val in {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0", "0020|0013": str(i + 1)}.items():
            md[tag] = val
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        files.append(out / f"slice_{i:03d}.dcm")
        itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(files[-1]), ImageIO=io).Update()
    return files


def test_read_dicom_series_and_single_file(tmp_path):
    vol = (np.arange(16 * 20 * 24).reshape(16, 20, 24) % 300 - 100).astype(np.int16)
    files = _write_dicom_series(vol, (0.8, 0.9, 1.5), tmp_path / "series")
    engine = _engine(SmallCNN(3, 1, 5, width=4).eval())  # the screen reads with the engine: one reader policy
    img = engine.load(tmp_path / "series")[0]
    assert tuple(img.shape) == (1, 24, 20, 16)
    np.testing.assert_allclose(img.pixdim.numpy(), [0.8, 0.9, 1.5], rtol=1e-5)
    np.testing.assert_array_equal(img[0].numpy(), vol.transpose(2, 1, 0))
    with pytest.raises(PreprocessingError, match="shorter than 2") as one:  # read, but no volume for a 3D network
        engine.load(files[3])
    assert tuple(one.value.raw_image.shape) == (1, 24, 20, 1)
    np.testing.assert_array_equal(one.value.raw_image[0, ..., 0].numpy(), vol[3].T)
    with pytest.raises(FileNotFoundError, match="nope.nii"):
        engine.load(tmp_path / "nope.nii.gz")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(PreprocessingError, match="broken.nii.gz") as err:
        engine.load(bad)
    assert err.value.raw_image is None  # not readable at all: an error, never a judgement


def test_fit_screen_and_run_screen_on_a_bundle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    summary = make_cohort("sos", n=48, size=24, seed=0, out_dir=tmp_path / "sos", progress=False)
    make_cohort("sos", n=24, size=24, seed=1, out_dir=tmp_path / "sos_more", progress=False)
    ckpt = tmp_path / "model.pt"
    torch.save(SmallCNN(3, 1, 5, width=4).state_dict(), ckpt)
    screen = fit_screen(
        SOS,
        tmp_path / "sos",
        tmp_path / "screen",
        json.dumps(TINY),
        checkpoint=ckpt,
        calibration_dirs=[tmp_path / "sos_more"],
    )
    assert screen.window == WINDOW and screen.early_layers == ["stem", "res2"] and screen.garbage_index is None
    # fitted on the training list, calibrated on the validation list + every item of the extra cohort
    assert screen.n_fit_ == summary["splits"]["training"]
    assert screen.n_cal_ == summary["splits"]["validation"] + 24
    # one split given as a string is that split (never its characters); too few calibration images are refused
    args = (SOS, tmp_path / "sos", tmp_path / "screen_val", json.dumps(TINY))
    val = fit_screen(*args, alpha=0.2, checkpoint=ckpt, calibration_splits="validation")
    assert (val.n_fit_, val.n_cal_) == (summary["splits"]["training"], summary["splits"]["validation"])
    with pytest.raises(ValueError, match=r"calibration images cannot reject anything at alpha = 0.05"):
        fit_screen(*args, checkpoint=ckpt, calibration_splits="validation")
    with pytest.raises(ValueError, match=r"has no list\(s\) \['valdation'\]"):
        fit_screen(*args, checkpoint=ckpt, calibration_splits="valdation")
    vol = generate("sos", n=1, size=24, seed=5).images[0]
    aff = np.diag([40 / 24] * 3 + [1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), aff), str(tmp_path / "sos_new.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((24, 24, 24), 5, np.int16), aff), str(tmp_path / "const.nii.gz"))
    # the same voxels as a DICOM series (array in z, y, x order; DICOM axes are LPS, so this is the NIfTI with the
    # first two axes pointing left and posterior: the same physical image as `sos_lps.nii.gz`)
    files = _write_dicom_series(vol.transpose(2, 1, 0), (40 / 24,) * 3, tmp_path / "dcm")
    lps = np.diag([-40 / 24, -40 / 24, 40 / 24, 1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), lps), str(tmp_path / "sos_lps.nii.gz"))
    paths = [tmp_path / "sos_new.nii.gz", tmp_path / "dcm", files[0], tmp_path / "const.nii.gz", tmp_path / "gone.nii"]
    paths.append(tmp_path / "sos_lps.nii.gz")
    df = run_screen(tmp_path / "screen", paths, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "screen.csv")
    assert list(table.columns[:4]) == ["image", "in_distribution", "p_value", "reasons"]
    assert {"score_maha_penultimate", "p_maha_penultimate", "score_attention", "p_attention"} <= set(table.columns)
    assert len(df) == 6 and bool(table["in_distribution"][0])
    for col in [c for c in table.columns if c.startswith(("score_", "p_"))]:  # DICOM series == its NIfTI twin
        assert table[col][1] == pytest.approx(table[col][5], rel=1e-4, abs=1e-6), col
    assert "orientation LPS was not seen in training" in str(table["notes"][5]) + str(table["reasons"][5])
    assert "single slice" in table["reasons"][2]
    assert "constant volume" in table["reasons"][3]
    # a missing file is an error, not a rejection: no verdict, left out of the dataset test, listed
    assert "not found" in table["error"][4] and "gone.nii" in table["error"][4]
    assert pd.isna(table["in_distribution"][4]) and table["error"].fillna("").astype(bool).sum() == 1
    assert df.attrs["dataset"]["n"] == 5 and [e["image"] for e in df.attrs["dataset"]["errors"]] == [str(paths[4])]
    with pytest.raises(FileNotFoundError, match="gone.nii"):
        run_screen(tmp_path / "screen", [tmp_path / "gone.nii"], tmp_path / "out2", on_error="raise")
    # an unreadable file and any other failure of one image: the other rows are written, the failures listed
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    real = ImagePipeline.observe

    def flaky(self, item, *args, **kwargs):
        if str(item).endswith("sos_lps.nii.gz"):
            raise RuntimeError("boom")
        return real(self, item, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ImagePipeline, "observe", flaky)
        part = run_screen(tmp_path / "screen", [paths[0], broken, paths[5]], tmp_path / "out3")
    again = pd.read_csv(tmp_path / "out3" / "screen.csv")
    assert len(again) == 3 and bool(again["in_distribution"][0]) and again["p_value"][0] == table["p_value"][0]
    assert "broken.nii.gz" in again["error"][1] and again["error"][2] == "RuntimeError: boom"
    assert part.attrs["dataset"]["n"] == 1 and part.attrs["dataset"]["like_training_data"]
    assert (
        json.loads((tmp_path / "out3" / "screen_summary.json").read_text())["errors"][1]["error"]
        == "RuntimeError: boom"
    )
    from monai_gamverify import cli

    said = cli.screen_run(str(tmp_path / "screen"), [str(paths[0]), str(broken)], out=str(tmp_path / "out4"))
    assert said.startswith("1 image(s) screened, 0 out of distribution, 1 could not be screened (column error)")
    assert "as one dataset: like the model's training data (0/1 rejected" in said
    # the same screen wired into the engine (`gamverify cam --screen`): the same p-values from the CAM's own forward
    # pass, and a constant volume is "out of distribution" before any model verdict
    kw = dict(bundle_root=str(SOS), overrides=json.dumps(TINY), checkpoint=str(ckpt), screen=str(tmp_path / "screen"))
    ok = cli.cam(str(tmp_path / "sos_new.nii.gz"), out=str(tmp_path / "cam"), **kw)
    assert ok["in_distribution"] is True and ok["verdict"] != "out of distribution"
    assert ok["p_value"] == pytest.approx(float(table["p_value"][0]), rel=1e-4)
    const = cli.cam(str(tmp_path / "const.nii.gz"), out=str(tmp_path / "cam"), **kw)
    assert const["in_distribution"] is False and const["verdict"] == "out of distribution"
    assert any("constant volume" in r for r in const["reasons"])
    # the screen records what its observations were made with; another CAM method, layer or class is refused
    saved = json.loads((tmp_path / "screen" / "screen.json").read_text())["observation"]
    assert (
        saved["method"] == "gradcam"
        and saved["layer"] == screen.cam_layer
        and saved["class_policy"] == "predicted class"
    )
    new = str(tmp_path / "sos_new.nii.gz")
    with pytest.raises(ValueError, match=r"method 'gradcampp' \(the screen was fitted with 'gradcam'\)"):
        cli.cam(new, out=str(tmp_path / "cam"), method="gradcampp", **kw)
    with pytest.raises(ValueError, match=r"layer 'res2' \(the screen was fitted with 'res4'\)"):
        cli.cam(new, out=str(tmp_path / "cam"), layer="res2", **kw)
    with pytest.raises(ValueError, match=r"class_policy 'output 2' \(the screen was fitted with 'predicted class'\)"):
        cli.cam(new, out=str(tmp_path / "cam"), class_idx=2, **kw)
    # without --method the bundle's declared cam_method is used (the CLI has no default of its own)
    pp = dict(kw, overrides=json.dumps({**TINY, "cam_method": "gradcampp"}), screen=None)
    assert cli.cam(new, out=str(tmp_path / "cam_pp"), **pp)["method"] == "gradcampp"
    # a cohort judges its items in batches (writer thread): the same answers as one image at a time
    from monai_gamverify.apps.cohort import run_cohort

    items = [str(paths[k]) for k in (0, 1, 5, 3)]
    kw = {k: v for k, v in kw.items() if k != "bundle_root"}
    run_cohort(items, tmp_path / "co", bundle_root=SOS, progress=False, feature_batch=3, **kw)
    cohort = pd.read_csv(tmp_path / "co" / "results.csv").set_index("image")
    for k, item in zip((0, 1, 5, 3), items):
        assert bool(cohort.loc[item, "in_distribution"]) == bool(table["in_distribution"][k]), item
        assert cohort.loc[item, "p_value"] == pytest.approx(float(table["p_value"][k]), rel=1e-4), item
    assert cohort.loc[items[3], "verdict"] == "out of distribution" and "constant" in cohort.loc[items[3], "reasons"]


def test_screen_without_window_or_cam(cohort_obs):
    """A bundle without an intensity window (Otsu foreground, histogram range from the training images) and
    without a CAM layer (plain forward): still fits, scores and rejects noise."""
    net, imgs, affine, _, labels = cohort_obs
    screen = Screen(window=None, head="head", cam_layer=None, k=3)
    engine = _engine(net, screen)
    obs = [engine.observe(im, cam=False) for im in imgs]
    screen.fit(obs[:44], labels[:44], calibration=obs[44:])
    assert screen.detectors == ["profile", "layout", "maha_penultimate", "rmaha_penultimate", "knn_penultimate"]
    assert screen.hist_range_ is not None and screen.hist_ref_.size == 16 and screen.intensity_width_ > 0
    noise = _mt(np.random.default_rng(1).normal(0, 800, (24, 24, 24)), affine)
    row = screen.score_observations(_records(screen, net, [noise]))[0]
    assert not row["in_distribution"] and row["p_value"] < 1 / 21


def test_dataset_test_beta_binomial_against_scipy_and_coverage():
    from scipy.stats import betabinom

    from monai_gamverify.screening import beta_binomial_sf, dataset_test

    for k, n, a, b in [(0, 5, 2.0, 3.0), (3, 15, 2.0, 199.0), (15, 15, 1.0, 20.0), (7, 40, 5.5, 2.5)]:
        assert beta_binomial_sf(k, n, a, b) == pytest.approx(betabinom.sf(k - 1, n, a, b), rel=1e-9, abs=1e-15)
    res = dataset_test([False] * 15, n_cal=55, alpha=0.05)
    assert res["n_rejected"] == 15 and res["p_value"] < 1e-6 and not res["like_training_data"]
    assert res["expected_rate"] == pytest.approx(2 / 56)
    assert dataset_test([True] * 15, n_cal=55)["p_value"] == 1.0
    # under the null (calibration and dataset from one distribution, a split-conformal score) the dataset test
    # rejects at most alpha of the time -- where a binomial test, ignoring the shared calibration set, would not
    rng = np.random.default_rng(0)
    n_cal, n, draws, alpha = 39, 30, 3000, 0.05
    rejected = binomial = 0
    from scipy.stats import binom

    for _ in range(draws):
        cal, test = rng.normal(size=n_cal), rng.normal(size=n)
        flags = conformal_pvalues(cal, test) > alpha
        rejected += not dataset_test(flags, n_cal=n_cal, alpha=alpha)["like_training_data"]
        k = int((~flags).sum())
        binomial += binom.sf(k - 1, n, 2 / 40) <= alpha
    se = np.sqrt(alpha * (1 - alpha) / draws)
    assert rejected / draws <= alpha + 3 * se
    assert binomial / draws > rejected / draws  # the naive test is anti-conservative here
    with pytest.raises(ValueError, match="at least one image"):
        dataset_test([], n_cal=10)
