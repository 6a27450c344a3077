from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.stats import entropy, wasserstein_distance
from skimage.metrics import structural_similarity

from monai_gamverify.metrics import similarity
from monai_gamverify.metrics.similarity import ALL_METRICS, DEFAULT_METRICS, similarity_metrics

TOL = 1e-9  # float64 inputs: only summation order differs from the references


def _ref_pair(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Independent reference for one 2D slice or 3D volume (numpy / scipy / scikit-image)."""
    mx, my = x > np.median(x), y > np.median(y)
    inter, union, total = np.sum(mx & my), np.sum(mx | my), mx.sum() + my.sum()
    xf, yf = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    nx, ny = np.linalg.norm(xf), np.linalg.norm(yf)
    const = xf.min() == xf.max() or yf.min() == yf.max()
    out = {
        "iou": inter / union if union else 1.0,
        "dice": 2 * inter / total if total else 1.0,
        "ssim": structural_similarity(x, y, data_range=1.0),
        "cosine": float(xf @ yf / (nx * ny)) if nx * ny > 0 else 0.0,
        "pearson": 0.0 if const else float(np.corrcoef(xf, yf)[0, 1]),
        "kl": entropy((xf + 1e-8) / np.sum(xf + 1e-8), (yf + 1e-8) / np.sum(yf + 1e-8)),
        "wasserstein": wasserstein_distance(xf, yf),
    }
    # spatial EMD: per-axis marginals of (map + eps) on positions i / (L - 1), averaged over axes
    emds = []
    for k in range(x.ndim):
        other = tuple(j for j in range(x.ndim) if j != k)
        pos = np.linspace(0.0, 1.0, x.shape[k])
        wx, wy = (x + 1e-8).sum(axis=other), (y + 1e-8).sum(axis=other)
        emds.append(wasserstein_distance(pos, pos, wx, wy))
    out["spatial_wasserstein"] = float(np.mean(emds))
    return out


def _reference(a: np.ndarray, b: np.ndarray, slice_axis: int | None) -> dict[str, np.ndarray]:
    b = np.broadcast_to(b, a.shape)
    rows = []
    for x, y in zip(a[:, 0], b[:, 0]):
        if slice_axis is None:
            rows.append(_ref_pair(x, y))
        else:
            per = [_ref_pair(np.take(x, i, slice_axis), np.take(y, i, slice_axis)) for i in range(x.shape[slice_axis])]
            rows.append({k: np.mean([p[k] for p in per]) for k in per[0]})
    return {k: np.array([r[k] for r in rows]) for k in ALL_METRICS}


CASES = [
    # (a shape, b batch, slice_axis, dtype)
    ((3, 1, 16, 20), 3, None, torch.float64),  # 2D
    ((3, 1, 16, 20), 1, None, torch.float64),  # 2D, broadcast reference
    ((2, 1, 9, 10, 11), 2, None, torch.float64),  # 3D volume
    ((2, 1, 9, 10, 11), 1, None, torch.float64),
    ((2, 1, 8, 10, 12), 2, 0, torch.float64),  # slice-wise along each axis
    ((2, 1, 8, 10, 12), 2, 1, torch.float64),
    ((2, 1, 8, 10, 12), 1, 2, torch.float64),
    ((2, 1, 8, 10, 12), 2, -1, torch.float64),
    ((2, 1, 7, 9, 8), 1, 0, torch.float32),  # float32 input
    ((3, 1, 8, 9), 3, None, torch.float32),
]


@pytest.mark.parametrize("shape, b_batch, slice_axis, dtype", CASES)
def test_matches_references(shape, b_batch, slice_axis, dtype):
    g = torch.Generator().manual_seed(sum(shape) + b_batch)
    a = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand((b_batch, *shape[1:]), generator=g, dtype=torch.float64).to(dtype)
    got = similarity_metrics(a, b, slice_axis=slice_axis, metrics=ALL_METRICS)
    ref_axis = None if slice_axis is None else slice_axis % 3
    ref = _reference(a.numpy(), b.numpy(), ref_axis)
    tol = TOL if dtype == torch.float64 else 1e-5  # skimage computes float32 input in float32
    assert list(got) == list(ALL_METRICS)
    for name in ALL_METRICS:
        assert got[name].shape == (shape[0],) and got[name].dtype == torch.float64
        np.testing.assert_allclose(got[name].numpy(), ref[name], atol=tol, rtol=0, err_msg=name)


@pytest.mark.parametrize("shape, slice_axis", [((4, 1, 12, 10), None), ((3, 1, 8, 8, 9), 1), ((3, 1, 8, 8, 9), None)])
def test_ties_follow_numpy_median(shape, slice_axis):
    # quantised maps: many values equal the median, and even-length maps average the two middle values
    rng = np.random.default_rng(7)
    a = rng.integers(0, 4, size=shape) / 3.0
    b = rng.integers(0, 3, size=(1, *shape[1:])) / 2.0
    got = similarity_metrics(a, b, slice_axis=slice_axis, metrics=ALL_METRICS)
    ref = _reference(a, b, slice_axis)
    for name in ALL_METRICS:
        np.testing.assert_allclose(got[name].numpy(), ref[name], atol=TOL, rtol=0, err_msg=name)


def test_default_metrics_and_selection():
    a = torch.rand(2, 1, 8, 8)
    assert tuple(similarity_metrics(a, a)) == DEFAULT_METRICS
    assert DEFAULT_METRICS == ("iou", "dice", "ssim", "cosine", "pearson", "kl", "wasserstein")
    assert "spatial_wasserstein" in ALL_METRICS and "spatial_wasserstein" not in DEFAULT_METRICS
    assert list(similarity_metrics(a, a, metrics=["kl", "iou", "kl"])) == ["kl", "iou"]
    assert list(similarity_metrics(a, a, metrics="dice")) == ["dice"]


SHAPES_2D_3D = [(1, 1, 10, 12), (1, 1, 8, 9, 10)]


@pytest.mark.parametrize("shape", SHAPES_2D_3D)
def test_identical_maps(shape):
    a = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = similarity_metrics(a, a.clone(), metrics=ALL_METRICS)
    expected = {"iou": 1, "dice": 1, "ssim": 1, "cosine": 1, "pearson": 1, "kl": 0, "wasserstein": 0}
    expected["spatial_wasserstein"] = 0
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("shape", SHAPES_2D_3D)
def test_degenerate_maps_exact(shape):
    zeros, half = torch.zeros(shape), torch.full(shape, 0.5)
    rand = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    # two all-zero maps: empty masks are identical, every distance vanishes, no NaN
    got = similarity_metrics(zeros, zeros, metrics=ALL_METRICS)
    for name, value in {"iou": 1, "dice": 1, "ssim": 1, "cosine": 0, "pearson": 0, "kl": 0, "wasserstein": 0}.items():
        assert got[name].item() == value, name
    assert got["spatial_wasserstein"].item() == pytest.approx(0.0, abs=1e-15)
    # constant maps: both masks empty -> 1; pearson 0 (not NaN); wasserstein = |0.5 - 0|
    got = similarity_metrics(half, zeros, metrics=ALL_METRICS)
    assert got["iou"].item() == 1 and got["dice"].item() == 1
    assert got["pearson"].item() == 0 and got["cosine"].item() == 0
    assert got["wasserstein"].item() == pytest.approx(0.5, abs=1e-12)
    assert got["kl"].item() == pytest.approx(0.0, abs=1e-12)  # both normalise to the uniform distribution
    # one empty mask against a non-empty one
    got = similarity_metrics(half, rand, metrics=ALL_METRICS)
    assert got["iou"].item() == 0 and got["dice"].item() == 0 and got["pearson"].item() == 0
    assert got["cosine"].item() > 0
    got = similarity_metrics(zeros, rand, metrics=["cosine", "pearson"])
    assert got["cosine"].item() == 0 and got["pearson"].item() == 0
    for pair in [(zeros, rand), (rand, zeros), (half, rand), (zeros, half)]:
        for name, value in similarity_metrics(*pair, metrics=ALL_METRICS).items():
            assert torch.isfinite(value).all(), name
            ref = _ref_pair(pair[0][0, 0].double().numpy(), pair[1][0, 0].double().numpy())[name]
            assert value.item() == pytest.approx(ref, abs=1e-6), name


def test_spatial_wasserstein_sees_location():
    # same values (so value-wasserstein is 0) at opposite corners: spatial EMD is maximal on both axes
    a, b = torch.zeros(1, 1, 9, 9), torch.zeros(1, 1, 9, 9)
    a[..., 0, 0], b[..., -1, -1] = 1.0, 1.0
    got = similarity_metrics(a, b, metrics=["wasserstein", "spatial_wasserstein"])
    assert got["wasserstein"].item() == 0
    assert got["spatial_wasserstein"].item() == pytest.approx(1.0, abs=1e-6)


def test_chunking_matches_single_pass(monkeypatch):
    g = torch.Generator().manual_seed(11)
    a, b = torch.rand(5, 1, 8, 8, 9, generator=g), torch.rand(1, 1, 8, 8, 9, generator=g)
    whole = similarity_metrics(a, b, slice_axis=0, metrics=ALL_METRICS)
    whole_vol = similarity_metrics(a, b, metrics=ALL_METRICS)
    # one slice per chunk, three slices per chunk (uneven split), two maps per chunk
    for elements in (1, 3 * 8 * 9, 2 * 8 * 8 * 9):
        monkeypatch.setattr(similarity, "_CHUNK_ELEMENTS", elements)
        for bb in (b, b.expand(5, -1, -1, -1, -1)):
            chunked = similarity_metrics(a, bb, slice_axis=0, metrics=ALL_METRICS)
            chunked_vol = similarity_metrics(a, bb, metrics=ALL_METRICS)
            for name in ALL_METRICS:
                torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-12)
                torch.testing.assert_close(chunked_vol[name], whole_vol[name], rtol=0, atol=1e-12)


def test_numpy_and_metatensor_inputs():
    a = np.random.default_rng(0).random((2, 1, 8, 8))
    ref = similarity_metrics(torch.from_numpy(a), torch.from_numpy(a[:1]))
    for x in (a, MetaTensor(torch.from_numpy(a))):
        got = similarity_metrics(x, a[:1])
        for name in DEFAULT_METRICS:
            torch.testing.assert_close(got[name], ref[name])
    masks = similarity_metrics(torch.from_numpy(a > 0.5), torch.from_numpy(a[:1] > 0.5), metrics=["iou"])
    assert masks["iou"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 1, 8, 9, 10, generator=g), torch.rand(1, 1, 8, 9, 10, generator=g)
    cpu = similarity_metrics(a, b, slice_axis=2, metrics=ALL_METRICS)
    gpu = similarity_metrics(a.cuda(), b.cuda(), slice_axis=2, metrics=ALL_METRICS)
    for name in ALL_METRICS:
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "a, b, kwargs, error, match",
    [
        (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9), {}, ValueError, "same shape"),
        (torch.rand(3, 1, 8, 8), torch.rand(2, 1, 8, 8), {}, ValueError, "broadcast"),
        (torch.rand(8, 8), torch.rand(8, 8), {}, ValueError, "shape"),
        (torch.rand(1, 1, 1, 8, 8, 8), torch.rand(1, 1, 1, 8, 8, 8), {}, ValueError, "shape"),
        (torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8), {}, ValueError, "one channel"),
        (torch.rand(0, 1, 8, 8), torch.rand(1, 1, 8, 8), {}, ValueError, "empty"),
        (torch.rand(1, 1, 8, 8) + 1, torch.rand(1, 1, 8, 8), {}, ValueError, r"\[0, 1\]"),
        (torch.rand(1, 1, 8, 8), -torch.rand(1, 1, 8, 8), {"metrics": ["kl"]}, ValueError, r"\[0, 1\]"),
        (torch.full((1, 1, 8, 8), float("nan")), torch.rand(1, 1, 8, 8), {}, ValueError, "NaN"),
        (torch.rand(1, 1, 8, 8), torch.full((1, 1, 8, 8), float("inf")), {"metrics": ["iou"]}, ValueError, "inf"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"metrics": ["ssim", "foo"]}, ValueError, "valid names"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"metrics": []}, ValueError, "at least one"),
        (torch.rand(1, 1, 6, 8), torch.rand(1, 1, 6, 8), {}, ValueError, "window"),
        (torch.rand(1, 1, 8, 8, 6), torch.rand(1, 1, 8, 8, 6), {"slice_axis": 0}, ValueError, "window"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"slice_axis": 0}, ValueError, "3D"),
        (torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), {"slice_axis": 3}, ValueError, "slice_axis"),
        (torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), {"slice_axis": 1.0}, TypeError, "slice_axis"),
        (torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), {"slice_axis": True}, TypeError, "slice_axis"),
        ([[[[0.5]]]], torch.rand(1, 1, 1, 1), {}, TypeError, "torch.Tensor"),
        (torch.rand(1, 1, 8, 8, dtype=torch.complex64), torch.rand(1, 1, 8, 8), {}, TypeError, "real"),
    ],
)
def test_bad_input(a, b, kwargs, error, match):
    with pytest.raises(error, match=match):
        similarity_metrics(a, b, **kwargs)


def test_huge_finite_values_are_not_flagged():
    # the fast finiteness check sums the map; an overflowing sum of finite values must not raise
    a = torch.full((1, 1, 8, 8), 1e308, dtype=torch.float64)
    assert similarity_metrics(a, a, metrics=["iou"])["iou"].item() == 1.0


def test_relaxed_checks_when_metric_allows():
    # values outside [0, 1] are fine for metrics that do not assume them; small maps are fine without ssim
    a, b = torch.randn(2, 1, 4, 5), torch.randn(2, 1, 4, 5)
    got = similarity_metrics(a, b, metrics=["iou", "dice", "cosine", "pearson", "wasserstein"])
    ref = np.corrcoef(a[1].ravel().numpy(), b[1].ravel().numpy())[0, 1]
    assert got["pearson"][1].item() == pytest.approx(ref, abs=1e-6)
