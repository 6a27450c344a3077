from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity
from torch import nn

from monai_gamverify import GradCAM
from monai_gamverify.metrics import (
    TemperatureScaled,
    TemperatureScaler,
    auc,
    binarize,
    cascading_randomization,
    deletion_curve,
    expected_calibration_error,
    insertion_curve,
    map_dice,
    map_iou,
    maximum_calibration_error,
    otsu_threshold,
    pointing_game,
    relevance_mass,
    reliability_bins,
    reliability_diagram_png,
    score_layers,
    sparseness,
)
from monai_gamverify.visualize.text import describe_map, describe_maps

# 2D and 3D spatial shapes in one list
SHAPES = [(20, 24), (12, 14, 16)]


def rand_maps(shape, b=3, seed=0, power=3.0):
    g = np.random.default_rng(seed)
    return torch.from_numpy((g.random((b, 1, *shape)) ** power).astype(np.float32))


def blob_masks(shape, b=3, seed=1):
    """Boxes at random places, one per sample."""
    g = np.random.default_rng(seed)
    masks = np.zeros((b, 1, *shape), dtype=bool)
    for i in range(b):
        lo = [g.integers(0, s // 2) for s in shape]
        masks[(i, 0, *[slice(lo_, lo_ + s // 3) for lo_, s in zip(lo, shape)])] = True
    return torch.from_numpy(masks)


# ---------------------------------------------------------------------------------------------------- localisation
@pytest.mark.parametrize("shape", SHAPES)
def test_otsu_matches_skimage(shape):
    maps = rand_maps(shape, b=4)
    maps[3] = 0.25  # constant map: skimage returns its value
    ours = otsu_threshold(maps).numpy()
    ref = [threshold_otsu(m[0].numpy()) for m in maps]
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    got = binarize(maps, "otsu").numpy()
    expected = np.stack([m.numpy() > t for m, t in zip(maps, ref)])
    np.testing.assert_array_equal(got, expected)
    assert not got[3].any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threshold", ["median", "otsu", 0.3])
def test_iou_dice_against_numpy(shape, threshold):
    maps, masks = rand_maps(shape), blob_masks(shape)
    for b in range(maps.shape[0]):
        m = maps[b, 0].numpy()
        t = {"median": np.median(m), "otsu": threshold_otsu(m)}.get(threshold, threshold)
        pred, gt = (m > t).ravel(), masks[b, 0].numpy().ravel()
        inter = sum(1 for p, g_ in zip(pred, gt) if p and g_)
        union = sum(1 for p, g_ in zip(pred, gt) if p or g_)
        assert map_iou(maps, masks, threshold)[b].item() == pytest.approx(inter / union, abs=1e-6)
        assert map_dice(maps, masks, threshold)[b].item() == pytest.approx(
            2 * inter / (pred.sum() + gt.sum()), abs=1e-6
        )


def test_iou_empty_regions_and_errors():
    maps = torch.zeros(1, 1, 8, 8)
    masks = torch.zeros(1, 1, 8, 8)
    assert map_iou(maps, masks).item() == 1.0 and map_dice(maps, masks, "otsu").item() == 1.0
    with pytest.raises(ValueError, match="shape"):
        map_iou(maps, torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="threshold"):
        map_iou(maps, masks, "mean")
    with pytest.raises(ValueError, match="B, 1"):
        map_iou(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="NaN"):
        map_iou(torch.full((1, 1, 4, 4), float("nan")), torch.zeros(1, 1, 4, 4))


def pointing_reference(m, gt, tol, spacing):
    """Brute force: distance from every maximum voxel to every mask voxel, in mm."""
    peaks = np.argwhere(m == m.max())
    inside = np.argwhere(gt)
    d = np.sqrt((((peaks[:, None, :] - inside[None, :, :]) * np.asarray(spacing)) ** 2).sum(-1))
    return float((d <= tol + 1e-9).any())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tol", [0.0, 2.0, 5.0])
def test_pointing_game_against_brute_force(shape, tol):
    spacing = (1.0, 2.5, 0.7)[: len(shape)]
    maps, masks = rand_maps(shape, b=6, seed=3), blob_masks(shape, b=6, seed=4)
    hits = pointing_game(maps, masks, tolerance_mm=tol, spacing=spacing)
    ref = [pointing_reference(maps[b, 0].numpy(), masks[b, 0].numpy(), tol, spacing) for b in range(6)]
    np.testing.assert_array_equal(hits.numpy(), ref)
    # the map's maximum placed inside the mask always hits
    inside = maps.clone()
    for b in range(6):
        idx = tuple(torch.nonzero(masks[b, 0])[0].tolist())
        inside[(b, 0, *idx)] = 2.0
    assert pointing_game(inside, masks).eq(1).all()


def test_pointing_game_edge_cases():
    maps, masks = rand_maps((8, 8), b=2), torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[1, 0, :4] = True
    hits = pointing_game(maps, masks)
    assert torch.isnan(hits[0]) and not torch.isnan(hits[1])
    assert pointing_game(torch.ones(2, 1, 8, 8), masks)[1].item() == 0.0  # a constant map has no peak
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, masks, tolerance_mm=-1)


@pytest.mark.parametrize("shape", SHAPES)
def test_relevance_mass_and_sparseness_against_numpy(shape):
    maps, masks = rand_maps(shape), blob_masks(shape)
    maps[2] = 0.0
    rm, gini = relevance_mass(maps, masks), sparseness(maps)
    for b in range(3):
        m, g_ = maps[b, 0].numpy().astype(np.float64).ravel(), masks[b, 0].numpy().ravel()
        total = sum(m)
        assert rm[b].item() == pytest.approx(sum(v for v, k in zip(m, g_) if k) / total if total else 0.0, abs=1e-6)
        # Gini as the mean absolute difference over all pairs / (2 * mean)
        if total:
            mad = np.abs(m[:, None] - m[None, :]).mean()
            assert gini[b].item() == pytest.approx(mad / (2 * m.mean()), abs=1e-5)
    assert rm[2].item() == 0.0 and gini[2].item() == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        relevance_mass(maps - 1, masks)


def test_against_quantus_2d():
    quantus = pytest.importorskip("quantus")
    maps, masks = rand_maps((16, 16), b=5, seed=7), blob_masks((16, 16), b=5, seed=8)
    x = torch.rand(5, 1, 16, 16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    y = np.zeros(5, dtype=int)
    kw = dict(model=model, x_batch=x.numpy(), y_batch=y, a_batch=maps.numpy(), s_batch=masks.numpy().astype(float))
    common = dict(disable_warnings=True, display_progressbar=False)
    q_pg = quantus.PointingGame(**common)(**kw, device="cpu")
    q_rm = quantus.RelevanceMassAccuracy(**common)(**kw, device="cpu")
    q_sp = quantus.Sparseness(**common)(**kw, device="cpu")
    np.testing.assert_array_equal(pointing_game(maps, masks).numpy(), np.asarray(q_pg, dtype=float))
    np.testing.assert_allclose(relevance_mass(maps, masks).numpy(), q_rm, atol=1e-5)
    np.testing.assert_allclose(sparseness(maps).numpy(), q_sp, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- faithfulness
class RegionModel(nn.Module):
    """Two classes; the logit of class 1 grows with the mean intensity inside a known region (a fixed mask)."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()
        self.drop = nn.Dropout(0.5)  # must be off during evaluation

    def forward(self, x):
        s = (x * self.region).flatten(1).sum(1, keepdim=True) / self.region.sum()
        return self.head(self.drop(s))


def region_of(shape):
    r = torch.zeros(1, 1, *shape)
    r[(0, 0, *[slice(s // 4, s // 4 + 3) for s in shape])] = 1
    return r


@pytest.mark.parametrize("shape", SHAPES)
def test_deletion_and_insertion_prefer_the_true_region(shape):
    region = region_of(shape)
    model = RegionModel(region)
    model.train()
    model.head.bias.requires_grad_(False)
    x = torch.rand(2, 1, *shape) * 0.2 + region  # bright region decides class 1
    perfect = region.expand(2, -1, *shape) + 0.01 * torch.rand(2, 1, *shape)
    random = torch.rand(2, 1, *shape)
    d_good, d_rand = deletion_curve(model, x, perfect, steps=10), deletion_curve(model, x, random, steps=10)
    i_good = insertion_curve(model, x, perfect, steps=10, baseline="zero")
    i_rand = insertion_curve(model, x, random, steps=10, baseline="zero")
    assert d_good.curve.shape == (2, 11) and d_good.auc.shape == (2,)
    assert (d_good.auc < d_rand.auc - 0.1).all()
    assert (i_good.auc > i_rand.auc + 0.1).all()
    p0 = torch.softmax(model.eval()(x), 1)[:, 1]
    model.train()
    torch.testing.assert_close(d_good.curve[:, 0], p0)  # nothing removed yet
    torch.testing.assert_close(d_good.curve[:, -1], torch.full((2,), 0.5))  # all zero: logits equal
    torch.testing.assert_close(i_good.curve[:, -1], p0)  # everything revealed
    # the caller's model is exactly as before
    assert model.training and model.drop.training
    assert model.head.weight.requires_grad and not model.head.bias.requires_grad
    assert model.head.weight.grad is None


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("baseline", ["zero", "mean", "blur"])
def test_deletion_curve_against_numpy_on_a_linear_model(shape, baseline):
    """Raw output of a linear model: the curve is a cumulative sum over voxels in map order, computed here in numpy."""
    g = np.random.default_rng(5)
    w = torch.from_numpy(g.normal(size=(2, *shape)).astype(np.float32))
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w.reshape(2, -1))
    x = torch.rand(3, 1, *shape)
    maps = rand_maps(shape, b=3, seed=6)
    steps = 6
    out = deletion_curve(model, x, maps, class_idx=[0, 1, 1], steps=steps, baseline=baseline, activation="none")
    if baseline == "zero":
        base = np.zeros_like(x.numpy())
    elif baseline == "mean":
        base = np.broadcast_to(x.numpy().mean(axis=tuple(range(2, x.ndim)), keepdims=True), x.shape)
    else:
        from scipy.ndimage import gaussian_filter

        sigma = max(1.0, 0.1 * min(shape))
        base = np.stack([gaussian_filter(v[0], sigma, mode="nearest")[None] for v in x.numpy().astype(np.float64)])
    n = int(np.prod(shape))
    for b, c in enumerate([0, 1, 1]):
        order = np.argsort(-maps[b, 0].numpy().ravel(), kind="stable")
        xv, bv, wv = x[b, 0].numpy().ravel(), base[b, 0].ravel(), w[c].numpy().ravel()
        for k in range(steps + 1):
            cur = xv.astype(np.float64).copy()
            removed = order[: int(round(k / steps * n))]
            cur[removed] = bv[removed]
            assert out.curve[b, k].item() == pytest.approx(float(cur @ wv), abs=1e-4)
    torch.testing.assert_close(out.auc, torch.from_numpy(np.trapezoid(out.curve.numpy(), dx=1 / steps, axis=1)))


def test_curves_batching_seed_and_errors():
    shape = (8, 8, 8)
    model = RegionModel(region_of(shape))
    x = torch.rand(3, 1, *shape)
    maps = torch.zeros(3, 1, *shape)  # all ties: order decided by the seed
    a = deletion_curve(model, x, maps, steps=5, batch_size=1, seed=3)
    b = deletion_curve(model, x, maps, steps=5, batch_size=7, seed=3)
    c = deletion_curve(model, x, maps, steps=5, batch_size=7, seed=4)
    torch.testing.assert_close(a.curve, b.curve)
    assert not torch.allclose(a.curve, c.curve)
    with pytest.raises(ValueError, match="baseline"):
        deletion_curve(model, x, maps, baseline="noise")
    with pytest.raises(ValueError, match="maps"):
        deletion_curve(model, x, maps[:, :, :4])
    with pytest.raises(ValueError, match="class_idx"):
        deletion_curve(model, x, maps, class_idx=5)
    with pytest.raises(ValueError, match="activation"):
        insertion_curve(model, x, maps, activation="relu")


def test_auc_helper():
    assert auc(torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    assert auc(torch.tensor([[0.0, 1.0, 1.0]])).tolist() == pytest.approx([0.75])
    assert auc([0.0, 1.0], fractions=[0.0, 0.5]).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="2 points"):
        auc(torch.tensor([1.0]))


# ----------------------------------------------------------------------------------------------------- calibration
def test_ece_mce_hand_computation():
    # top-class confidences 0.95, 0.85, 0.65, 0.62, 0.55 with correctness 1, 0, 1, 1, 0; 5 bins of width 0.2
    probs = torch.tensor([[0.95, 0.05], [0.15, 0.85], [0.65, 0.35], [0.38, 0.62], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    # bin (0.4, 0.6]: {0.55, wrong}        gap |0 - 0.55| = 0.55, weight 1/5
    # bin (0.6, 0.8]: {0.65, 0.62, right}  gap |1 - 0.635| = 0.365, weight 2/5
    # bin (0.8, 1.0]: {0.95 right, 0.85 wrong} gap |0.5 - 0.9| = 0.4, weight 2/5
    expected = 0.55 / 5 + 0.365 * 2 / 5 + 0.4 * 2 / 5
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)
    assert maximum_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.55)
    bins = reliability_bins(probs.numpy(), labels.numpy(), n_bins=5)
    assert bins["count"].tolist() == [0, 0, 1, 2, 2]
    # a binary (N,) probability of the positive class is the same as two columns
    assert expected_calibration_error(probs[:, 1], labels, n_bins=5) == pytest.approx(expected)


def test_ece_against_numpy_loop():
    g = np.random.default_rng(0)
    logits = g.normal(size=(300, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = g.integers(0, 4, 300)
    conf, pred = probs.max(1), probs.argmax(1)
    ece, mce = 0.0, 0.0
    for i in range(15):
        lo, hi = i / 15, (i + 1) / 15
        inb = [j for j in range(300) if lo < conf[j] <= hi]
        if inb:
            gap = abs(np.mean([pred[j] == labels[j] for j in inb]) - np.mean([conf[j] for j in inb]))
            ece += len(inb) / 300 * gap
            mce = max(mce, gap)
    assert expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-9)
    assert maximum_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels)) == pytest.approx(mce)
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(logits, labels)
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(probs, labels[:10])


def overconfident(n=3000, k=4, temperature=3.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports z * temperature, i.e. over-confident by that factor."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * temperature, labels


def test_temperature_scaler_recovers_known_temperature(tmp_path):
    logits, labels = overconfident()
    scaler = TemperatureScaler()
    assert not hasattr(scaler, "temperature_") and scaler.get_params() == {"init_temperature": 1.0, "max_iter": 100}
    with torch.no_grad():  # fitting must work inside inference code
        scaler.fit(logits, labels)
    assert scaler.temperature_ == pytest.approx(3.0, rel=0.1)
    assert scaler.nll_after_ < scaler.nll_before_
    assert F.cross_entropy(scaler.transform(logits), labels) < F.cross_entropy(logits, labels)
    # a brute-force grid search over T finds the same minimum
    grid = torch.linspace(1.0, 6.0, 251, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits.double() / t, labels) for t in grid])
    assert scaler.temperature_ == pytest.approx(float(grid[nll.argmin()]), abs=0.02)
    probs = scaler.predict_proba(logits)
    assert torch.equal(probs.argmax(1), logits.argmax(1))
    ece_before = expected_calibration_error(torch.softmax(logits, 1), labels)
    assert expected_calibration_error(probs, labels) < ece_before / 2
    assert isinstance(scaler.predict_proba(logits.numpy()), np.ndarray)
    path = reliability_diagram_png(probs, labels, tmp_path / "rel.png", title="after")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_scaler_errors_and_transform():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        TemperatureScaler().transform(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels"):
        TemperatureScaler().fit(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="K >= 2"):
        TemperatureScaler().fit(torch.zeros(4), torch.zeros(4))
    logits, labels = overconfident(n=500, temperature=2.0)
    scaler = TemperatureScaler().fit(logits, labels)
    data = {"pred": logits[0], "label": labels[0]}
    out = TemperatureScaled(keys="pred", temperature=scaler)(data)
    torch.testing.assert_close(out["pred"], logits[0] / scaler.temperature_)
    assert out["label"] is data["label"]
    torch.testing.assert_close(
        TemperatureScaled(temperature=2.0)({"pred": torch.ones(3)})["pred"], torch.full((3,), 0.5)
    )
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaled(temperature=0.0)


# ----------------------------------------------------------------------------------------------------- sanity check
class TinyNet(nn.Module):
    def __init__(self, dims):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.fc = nn.Linear(8, 3)  # registered first, called last: the order must come from the forward pass
        self.conv1, self.bn1, self.conv2 = conv(1, 4, 3, padding=1), norm(4), conv(4, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("shape", SHAPES)
def test_cascading_randomization(shape):
    torch.manual_seed(0)
    net = TinyNet(len(shape)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, *shape)
    df = cascading_randomization(net, x, GradCAM, "conv2", seed=1)
    assert list(df.columns) == ["step", "layer", "sample", "ssim", "spearman"]
    assert df.drop_duplicates("step")["layer"].tolist() == ["(none)", "fc", "conv2", "conv1"]  # top first, no norm
    first = df[df.step == 0]
    assert np.allclose(first.ssim, 1.0, atol=1e-5) and np.allclose(first.spearman, 1.0)
    assert len(df) == 2 * 4
    # the caller's model is untouched
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    again = cascading_randomization(net, x, GradCAM, "conv2", seed=1)
    np.testing.assert_allclose(df[["ssim", "spearman"]].to_numpy(), again[["ssim", "spearman"]].to_numpy())
    with_norm = cascading_randomization(net, x, GradCAM, "conv2", seed=1, include_norm=True)
    assert "bn1" in set(with_norm.layer)


def test_cascading_randomization_step_matches_manual_reinitialisation():
    shape = SHAPES[0]
    torch.manual_seed(0)
    net = TinyNet(2).eval()
    x = torch.rand(2, 1, *shape)
    df = cascading_randomization(net, x, GradCAM, "conv2", seed=5)
    target = net(x).argmax(1)
    original = GradCAM(net, target_layers="conv2")(x, class_idx=target)
    manual = TinyNet(2).eval()
    manual.load_state_dict(net.state_dict())
    with torch.random.fork_rng():
        torch.manual_seed(5)  # step 1 re-draws the top layer with seed + 0
        manual.fc.reset_parameters()
    randomised = GradCAM(manual, target_layers="conv2")(x, class_idx=target)
    step1 = df[df.step == 1].sort_values("sample")
    for b in range(2):
        a, r = original[b].flatten().numpy(), randomised[b].flatten().numpy()
        expected = spearmanr(a, r).statistic if np.ptp(a) > 0 and np.ptp(r) > 0 else np.nan
        np.testing.assert_allclose(step1.spearman.iloc[b], expected, atol=1e-6)
        ssim = structural_similarity(original[b, 0].numpy(), randomised[b, 0].numpy(), data_range=1.0)
        np.testing.assert_allclose(step1.ssim.iloc[b], ssim, atol=1e-4)


# -------------------------------------------------------------------------------------------------- layer comparison
@pytest.mark.parametrize("shape", SHAPES)
def test_score_layers(shape):
    masks = blob_masks(shape, b=2)
    maps = {"a": rand_maps(shape, b=2, seed=1), "b": masks.float() * 0.9 + 0.05}
    df = score_layers(maps, masks, threshold="otsu")
    assert df.layer.tolist() == ["a", "a", "b", "b"]
    np.testing.assert_allclose(df[df.layer == "a"].iou, map_iou(maps["a"], masks, "otsu").numpy())
    assert (df[df.layer == "b"].iou == 1.0).all() and (df[df.layer == "b"].pointing_game == 1.0).all()
    model = RegionModel(region_of(shape))
    x = torch.rand(2, 1, *shape)
    df2 = score_layers(maps, masks, model=model, x=x, steps=4)
    assert {"deletion_auc", "insertion_auc"} <= set(df2.columns)
    torch.testing.assert_close(
        torch.tensor(df2[df2.layer == "b"].deletion_auc.to_numpy()), deletion_curve(model, x, maps["b"], steps=4).auc
    )
    with pytest.raises(ValueError, match="both"):
        score_layers(maps, masks, model=model)


# ------------------------------------------------------------------------------------------------------------- text
def blob(shape, centre, radii):
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (sum(((g_ - c) / r) ** 2 for g_, c, r in zip(grid, centre, radii)) <= 1).astype(np.float32)


@pytest.mark.parametrize(
    "shape, centre, flip, expected, absent",
    [
        # identity affine = RAS: a high first index is the patient's right
        ((32, 32, 32), (25, 16, 16), False, ["right"], ["left", "anterior", "posterior", "superior", "inferior"]),
        ((32, 32, 32), (25, 16, 16), True, ["left"], ["right"]),  # first axis pointing left (LPS-like)
        ((32, 32, 32), (16, 5, 27), False, ["posterior", "superior"], ["left", "right", "anterior"]),
        ((40, 40), (8, 32), False, ["left", "anterior"], ["right", "posterior", "superior"]),
        ((40, 40), (20, 20), False, ["centre"], ["left", "right", "anterior", "posterior"]),
    ],
)
def test_describe_map_location(shape, centre, flip, expected, absent):
    m = blob(shape, centre, (4,) * len(shape))
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    if flip:
        affine[0, 0] = -2.0
    text = describe_map(torch.from_numpy(m)[None], affine=affine)
    words = set(text.replace(",", " ").replace(".", " ").split())
    assert all(w in words for w in expected), text
    assert not any(w in words for w in absent), text
    assert ("volume" if len(shape) == 3 else "image") in words


@pytest.mark.parametrize("shape", SHAPES)
def test_describe_map_extent_shape_boundary(shape):
    big = tuple(2 * s for s in shape)
    centre = tuple(s // 2 for s in big)
    sphere = blob(big, centre, (6,) * len(big))
    text = describe_map(sphere)
    assert f"{100 * sphere.mean():.1f}%" in text and "compact" in text and "smooth" in text and "one" in text
    rod = blob(big, centre, (14,) + (2,) * (len(big) - 1))
    assert "elongated" in describe_map(rod)
    noisy = sphere * (np.random.default_rng(0).random(big) > 0.35)
    assert "irregular" in describe_map(noisy)
    two = np.maximum(blob(big, (5,) * len(big), (2,) * len(big)), blob(big, tuple(s - 6 for s in big), (2,) * len(big)))
    assert "2 separate" in describe_map(two)
    assert "flat" in describe_map(np.zeros(big))
    peaked = sphere * 0.8
    peaked[centre] = 0.9
    assert "Peak intensity 0.90" in describe_map(peaked)
    texts = describe_maps(torch.from_numpy(np.stack([sphere, rod]))[:, None])
    assert len(texts) == 2 and "elongated" in texts[1]
    with pytest.raises(ValueError, match="threshold"):
        describe_map(sphere, threshold=0.0)


def test_figures_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path, monkeypatch):
    # a user with an interactive backend must keep it: no matplotlib.use, no pyplot import, no global figure
    import sys

    import matplotlib

    from monai_gamverify.energy import energy_scatter_png
    from monai_gamverify.handlers import cam_overlay_rgb
    from monai_gamverify.visualize.plots import overlay_png

    def refuse(*args, **kwargs):
        raise AssertionError("library code called matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", refuse)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any `import matplotlib.pyplot` now fails
    backend = matplotlib.rcParams._get_backend_or_none()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40)
    assert reliability_diagram_png(probs, probs.argmax(1), tmp_path / "rel.png").stat().st_size > 0
    assert overlay_png(rng.random((8, 8, 8)), rng.random((8, 8, 8)), tmp_path / "ov.png").stat().st_size > 0
    assert energy_scatter_png(rng.random(6), rng.random(6), tmp_path / "sc.png").stat().st_size > 0
    assert cam_overlay_rgb(rng.random((1, 8, 8)), rng.random((1, 8, 8))).shape == (8, 8, 3)
    assert matplotlib.rcParams._get_backend_or_none() == backend
