"""Chunked (streamed) similarity features equal the single-pass ones and the scikit-image / scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_similarity import _reference  # the scikit-image / scipy reference loop, one copy

from monai_gamverify.metrics.similarity import ALL_METRICS, BYTES_PER_VOXEL, similarity_metrics


def _budget_mb(voxels: int) -> float:
    """The ``max_memory_mb`` that gives chunks of ``voxels`` voxels."""
    return (voxels + 0.5) * BYTES_PER_VOXEL / 2**20


# (a shape, b batch, slice_axis, chunk sizes in voxels: 1 plane/slice, an uneven split, more than one map)
CASES = [
    ((3, 1, 12, 13), 3, None, (13, 3 * 13, 5 * 13)),  # 2D whole maps, streamed by rows
    ((3, 1, 12, 13), 1, None, (13, 3 * 13, 5 * 13)),  # 2D, broadcast reference
    ((2, 1, 10, 9, 11), 2, None, (99, 3 * 99, 4 * 99)),  # 3D whole volumes, streamed by planes
    ((3, 1, 10, 9, 11), 1, None, (99, 3 * 99, 4 * 99)),  # 3D, broadcast reference
    ((2, 1, 8, 9, 10), 2, 0, (90, 3 * 90, 11 * 90)),  # slice-wise, chunks of slices (and of maps)
    ((3, 1, 8, 9, 10), 1, 0, (90, 3 * 90, 11 * 90)),  # slice-wise, broadcast reference
    ((2, 1, 8, 9, 10), 1, 1, (80, 3 * 80)),  # slice-wise along a strided axis
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, b_batch, slice_axis, chunks", CASES)
def test_chunked_equals_unchunked_equals_reference(shape, b_batch, slice_axis, chunks, dtype):
    g = torch.Generator().manual_seed(sum(shape) + b_batch)
    a = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand((b_batch, *shape[1:]), generator=g, dtype=torch.float64).to(dtype)
    whole = similarity_metrics(a, b, slice_axis=slice_axis, metrics=ALL_METRICS, max_memory_mb=1024)
    ref = _reference(a.numpy(), b.numpy(), slice_axis)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    for name in ALL_METRICS:
        np.testing.assert_allclose(whole[name].numpy(), ref[name], rtol=0, atol=tol, err_msg=name)
    for voxels in chunks:
        got = similarity_metrics(a, b, slice_axis=slice_axis, metrics=ALL_METRICS, max_memory_mb=_budget_mb(voxels))
        assert list(got) == list(ALL_METRICS)
        for name in ALL_METRICS:
            assert got[name].shape == (shape[0],) and got[name].dtype == torch.float64
            np.testing.assert_allclose(got[name].numpy(), whole[name].numpy(), rtol=0, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("metrics", [["iou"], ["dice", "kl"], ["ssim"], ["pearson", "wasserstein"], ["cosine"]])
def test_streamed_subsets_of_metrics(metrics):
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 1, 9, 8, 10, generator=g), torch.rand(1, 1, 9, 8, 10, generator=g)
    got = similarity_metrics(a, b, metrics=metrics, max_memory_mb=_budget_mb(80))
    whole = similarity_metrics(a, b, metrics=ALL_METRICS, max_memory_mb=1024)
    assert list(got) == metrics
    for name in metrics:
        torch.testing.assert_close(got[name], whole[name], rtol=0, atol=1e-12)


def test_streamed_degenerate_maps():
    # constant and all-zero maps streamed plane by plane: the documented values, never NaN
    zeros, const = torch.zeros(1, 1, 8, 8, 8), torch.full((1, 1, 8, 8, 8), 0.5)
    got = similarity_metrics(zeros, const, metrics=ALL_METRICS, max_memory_mb=_budget_mb(64))
    whole = similarity_metrics(zeros, const, metrics=ALL_METRICS, max_memory_mb=1024)
    assert got["iou"].item() == 1.0 and got["dice"].item() == 1.0  # two empty masks
    assert got["cosine"].item() == 0.0 and got["pearson"].item() == 0.0
    for name in ALL_METRICS:
        assert torch.isfinite(got[name]).all()
        torch.testing.assert_close(got[name], whole[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, "8", True])
def test_bad_budget(bad):
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="max_memory_mb"):
        similarity_metrics(x, x, max_memory_mb=bad)


def test_reference_statistics_reused_and_invalidated():
    """A reference compared with one map after another reuses its sorted values; an in-place change of the reference
    (or another reference) is seen: every answer equals the scikit-image / scipy loop."""
    rng = np.random.default_rng(3)
    ref = torch.as_tensor(rng.random((1, 1, 12, 11, 10)), dtype=torch.float32)
    maps = [torch.as_tensor(rng.random((1, 1, 12, 11, 10)), dtype=torch.float32) for _ in range(3)]
    for budget in (0.01, None):  # streamed whole maps, and maps that fit one chunk
        for m in maps:
            got = similarity_metrics(m, ref, max_memory_mb=budget)
            want = _reference(m.numpy(), ref.numpy(), None)
            for name in got:
                np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        ref.mul_(0.5).add_(0.25)  # in place: the cached statistics must not be used
        got = similarity_metrics(maps[0], ref, max_memory_mb=budget)
        want = _reference(maps[0].numpy(), ref.numpy(), None)
        for name in got:
            np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
