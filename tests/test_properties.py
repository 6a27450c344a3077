"""Property tests (hypothesis): similarity metrics and CAM outputs keep their contracts on random inputs.

Every example is small (maps of at most 9^3 voxels, networks of a few channels) and the runs are derandomised, so
the file stays well under a minute on two CPU cores and fails the same way on every machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_state import assert_same_state, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from monai_gamverify import GradCAM, GradCAMpp, ScoreCAM
from monai_gamverify.metrics.similarity import ALL_METRICS, similarity_metrics
from monai_gamverify.visualize.cam import normalize_maps

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
CAM_SETTINGS = settings(SETTINGS, max_examples=30)

# (spatial dims, slice_axis): 2D and 3D in one list; 3D per volume and slice-wise
GEOMETRIES = [(2, None), (3, None), (3, 0), (3, 2)]

RANGES = {
    "iou": (0.0, 1.0),
    "dice": (0.0, 1.0),
    "ssim": (-1.0, 1.0),
    "cosine": (0.0, 1.0),  # maps are non-negative
    "pearson": (-1.0, 1.0),
    "kl": (0.0, np.inf),
    "wasserstein": (0.0, np.inf),
    "spatial_wasserstein": (0.0, 1.0),
}
SYMMETRIC = ("iou", "dice", "ssim", "cosine", "pearson", "wasserstein", "spatial_wasserstein")  # not kl
TOL = 1e-9  # float64 accumulation: rounding only
MAP_KINDS = ("uniform", "sparse", "ties", "binary", "blob", "constant", "zeros", "ones", "tiny", "hypothesis")


@st.composite
def maps(draw, dims: int, batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """(batch, 1, *shape) float32 maps in [0, 1], mixing kinds that stress the edge cases of the definitions."""
    out = np.empty((batch, 1, *shape), np.float32)
    for i in range(batch):
        kind = draw(st.sampled_from(MAP_KINDS))
        if kind == "hypothesis":  # hypothesis' own edge values: 0, 1, subnormals, repeated values
            out[i, 0] = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
            continue
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "uniform":
            m = rng.random(shape)
        elif kind == "sparse":
            m = rng.random(shape) * (rng.random(shape) < 0.1)
        elif kind == "ties":
            m = rng.integers(0, 3, shape) / 2
        elif kind == "binary":
            m = (rng.random(shape) < 0.5).astype(float)
        elif kind == "blob":
            grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
            centre = rng.random(dims).reshape(-1, *([1] * dims))
            m = np.exp(-((grid - centre) ** 2).sum(0) / 0.05)
        elif kind == "constant":
            m = np.full(shape, rng.random())
        elif kind == "zeros":
            m = np.zeros(shape)
        elif kind == "ones":
            m = np.ones(shape)
        else:  # "tiny": values far below KL_EPS and the SSIM constants
            m = rng.random(shape) * 1e-12
        out[i, 0] = m
    return np.clip(out, 0, 1)


@st.composite
def map_pairs(draw, dims: int):
    side = st.integers(7, 12) if dims == 2 else st.integers(7, 9)  # >= the 7-wide SSIM window
    shape = tuple(draw(side) for _ in range(dims))
    batch = draw(st.integers(1, 3))
    return draw(maps(dims, batch, shape)), draw(maps(dims, batch, shape))


def _check_range(values: dict[str, torch.Tensor], batch: int) -> None:
    assert list(values) == list(ALL_METRICS)
    for name, v in values.items():
        assert v.shape == (batch,) and v.dtype == torch.float64, name
        assert torch.isfinite(v).all(), f"{name} not finite: {v}"
        lo, hi = RANGES[name]
        assert (v >= lo - TOL).all() and (v <= hi + TOL).all(), f"{name} = {v.tolist()} outside [{lo}, {hi}]"


@pytest.mark.parametrize("dims,slice_axis", GEOMETRIES)
def test_metrics_range_finite_symmetric(dims, slice_axis):
    @SETTINGS
    @given(pair=map_pairs(dims))
    def check(pair):
        a, b = (torch.from_numpy(m) for m in pair)
        ab = similarity_metrics(a, b, slice_axis=slice_axis, metrics=ALL_METRICS)
        ba = similarity_metrics(b, a, slice_axis=slice_axis, metrics=ALL_METRICS)
        _check_range(ab, a.shape[0])
        _check_range(ba, a.shape[0])
        for name in SYMMETRIC:
            torch.testing.assert_close(ab[name], ba[name], rtol=0, atol=TOL, msg=f"{name} is not symmetric")

    check()


@pytest.mark.parametrize("dims,slice_axis", GEOMETRIES)
def test_metrics_identical_maps_score_perfectly(dims, slice_axis):
    @SETTINGS
    @given(pair=map_pairs(dims))
    def check(pair):
        a = torch.from_numpy(pair[0])
        got = similarity_metrics(a, a.clone(), slice_axis=slice_axis, metrics=ALL_METRICS)
        _check_range(got, a.shape[0])
        # the items the metric is computed on (whole maps or slices): cosine / pearson degenerate per item
        items = a[:, 0].unsqueeze(1) if slice_axis is None else a[:, 0].movedim(1 + slice_axis, 1)
        flat = items.flatten(2)  # (B, items, voxels)
        nonzero = (flat != 0).any(-1).double().mean(1)  # fraction of items that are not all-zero
        nonconst = (flat.amax(-1) != flat.amin(-1)).double().mean(1)  # fraction of non-constant items
        ones = torch.ones(a.shape[0], dtype=torch.float64)
        for name in ("iou", "dice", "ssim"):
            torch.testing.assert_close(got[name], ones, rtol=0, atol=1e-9, msg=name)
        torch.testing.assert_close(got["cosine"], nonzero, rtol=0, atol=1e-9, msg="cosine")
        torch.testing.assert_close(got["pearson"], nonconst, rtol=0, atol=1e-9, msg="pearson")
        assert (got["wasserstein"] == 0).all()
        for name in ("kl", "spatial_wasserstein"):
            assert (got[name].abs() < 1e-9).all(), (name, got[name])

    check()


# ---------------------------------------------------------------------------------------------------- CAM outputs
class _Net(nn.Module):
    """A random small conv classifier: conv blocks (optionally strided, BN, in-place ReLU), pooled, linear head."""

    def __init__(self, dims: int, in_ch: int, widths: list[int], strides: list[int], bn: list[bool], n_out: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        ch = in_ch
        for w, s, b in zip(widths, strides, bn):
            block = [conv(ch, w, 3, stride=s, padding=1)] + ([norm(w)] if b else []) + [nn.ReLU(inplace=True)]
            layers.append(nn.Sequential(*block))
            ch = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(ch, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@st.composite
def cam_cases(draw, dims: int):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 4)) for _ in range(depth)]
    strides = [draw(st.sampled_from([1, 2])) for _ in range(depth)]
    bn = [draw(st.booleans()) for _ in range(depth)]
    in_ch, n_out = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = _Net(dims, in_ch, widths, strides, bn, n_out)
    net.train(draw(st.booleans()))  # the caller's mode must come back
    if draw(st.booleans()):
        net.double()
    layer = f"features.{draw(st.integers(0, depth - 1))}"
    side = st.integers(5, 12) if dims == 2 else st.integers(3, 7)
    shape = (draw(st.integers(1, 3)), in_ch, *(draw(side) for _ in range(dims)))
    x = torch.randn(shape, dtype=next(net.parameters()).dtype) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    class_idx = draw(st.one_of(st.none(), st.integers(0, n_out - 1)))
    method = draw(st.sampled_from(["gradcam", "gradcampp", "scorecam"]))
    if method == "scorecam":
        cam = ScoreCAM(net, layer, batch_size=draw(st.integers(1, 3)))
    else:
        cam = (GradCAM if method == "gradcam" else GradCAMpp)(net, layer)
    return net, cam, x, class_idx


@pytest.mark.parametrize("dims", [2, 3])
def test_cam_contract_on_random_networks(dims):
    @CAM_SETTINGS
    @given(case=cam_cases(dims))
    def check(case):
        net, cam, x, class_idx = case
        x_before, before = x.clone(), snapshot(net)
        raw = cam(x, class_idx=class_idx, normalize=False)
        norm = cam(x, class_idx=class_idx, normalize=True)
        for m in (raw, norm):
            assert m.shape == (x.shape[0], 1, *x.shape[2:])
            assert m.dtype == torch.float32 and m.device == x.device
            assert not m.requires_grad and torch.isfinite(m).all()
        assert (raw >= 0).all()
        flat = norm.flatten(1)
        assert (flat >= 0).all() and (flat <= 1).all()
        for row in flat:  # each map spans exactly [0, 1], or is all zeros
            assert (row.max() == 1 and row.min() == 0) or (row == 0).all(), row
        torch.testing.assert_close(norm, normalize_maps(raw))  # the two calls explain the same thing
        assert torch.equal(x, x_before)
        assert_same_state(net, before)
        assert torch.is_grad_enabled()

    check()
