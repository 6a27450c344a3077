"""Benchmark: ``similarity_metrics`` (batched torch) against the reference composition, same data, one process.

Reference = per slice: ``np.median`` masks + numpy IoU/Dice, ``skimage.metrics.structural_similarity``,
numpy cosine / ``np.corrcoef``, ``scipy.stats.entropy`` and ``scipy.stats.wasserstein_distance``.
Prints both times, the speed ratio and the largest absolute difference per metric.

Example:
    python scripts/bench_similarity.py --n 100 --size 64 --slice-axis 0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import entropy, wasserstein_distance
from skimage.metrics import structural_similarity

from monai_gamverify.metrics.similarity import DEFAULT_METRICS, similarity_metrics


def smooth_maps(n: int, size: int, seed: int) -> np.ndarray:
    """CAM-like maps: blurred noise, min-max scaled to [0, 1] per map, float32 (what GradCAM returns)."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, 1, size, size, size), dtype=np.float32)
    for i in range(n):
        m = gaussian_filter(rng.random((size, size, size)), sigma=3.0)
        maps[i, 0] = (m - m.min()) / (m.max() - m.min())
    return maps


def reference_pair(x: np.ndarray, y: np.ndarray) -> list[float]:
    mx, my = x > np.median(x), y > np.median(y)
    inter, union, total = np.sum(mx & my), np.sum(mx | my), mx.sum() + my.sum()
    xf, yf = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    nx, ny = np.linalg.norm(xf), np.linalg.norm(yf)
    const = xf.min() == xf.max() or yf.min() == yf.max()
    return [
        inter / union if union else 1.0,
        2 * inter / total if total else 1.0,
        structural_similarity(x, y, data_range=1.0),
        float(xf @ yf / (nx * ny)) if nx * ny > 0 else 0.0,
        0.0 if const else float(np.corrcoef(xf, yf)[0, 1]),
        entropy(xf + 1e-8, yf + 1e-8),  # entropy normalises p and q itself
        wasserstein_distance(xf, yf),
    ]


def reference(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    out = np.empty((a.shape[0], len(DEFAULT_METRICS)))
    for i in range(a.shape[0]):
        x, y = a[i, 0], b[min(i, b.shape[0] - 1), 0]
        slices = [reference_pair(np.take(x, s, axis), np.take(y, s, axis)) for s in range(x.shape[axis])]
        out[i] = np.mean(slices, axis=0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of map pairs")
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic maps")
    parser.add_argument("--slice-axis", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for similarity_metrics, e.g. cuda")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the reference is single-threaded too)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    a = smooth_maps(args.n, args.size, args.seed)
    b = smooth_maps(args.n, args.size, args.seed + 1)
    ta = torch.from_numpy(a).to(args.device)
    tb = torch.from_numpy(b).to(args.device)
    print(
        f"{args.n} pairs of {args.size}^3 float32 maps, slice-wise along axis {args.slice_axis}; "
        f"torch {torch.__version__} on {args.device} ({torch.get_num_threads()} threads)"
    )

    similarity_metrics(ta[:2], tb[:2], slice_axis=args.slice_axis)  # warm-up (allocator, kernels)
    if ta.is_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    got = similarity_metrics(ta, tb, slice_axis=args.slice_axis)
    if ta.is_cuda:
        torch.cuda.synchronize()
    t_torch, c_torch = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    ref = reference(a, b, args.slice_axis)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0

    # one reference map against all (the verification use): broadcast b
    t0 = time.perf_counter()
    similarity_metrics(ta, tb[:1], slice_axis=args.slice_axis)
    if ta.is_cuda:
        torch.cuda.synchronize()
    t_bcast = time.perf_counter() - t0

    # CPU time is printed too: on a shared machine wall time also counts waiting for a core
    print(f"{'':32} {'wall':>9} {'cpu':>9}")
    print(f"{'reference (skimage/scipy/numpy)':32} {t_ref:8.3f}s {c_ref:8.3f}s")
    print(f"{'similarity_metrics (torch)':32} {t_torch:8.3f}s {c_torch:8.3f}s")
    print(f"{'  one broadcast reference map':32} {t_bcast:8.3f}s")
    print(f"speed-up: x{t_ref / t_torch:.1f} wall, x{c_ref / c_torch:.1f} cpu")
    print(f"{'metric':<12} {'max |diff|':>12}")
    worst = 0.0
    for j, name in enumerate(DEFAULT_METRICS):
        diff = float(np.max(np.abs(got[name].double().cpu().numpy() - ref[:, j])))
        worst = max(worst, diff)
        print(f"{name:<12} {diff:12.3e}")
    verdict = "PASS" if t_ref / t_torch >= 3 and worst <= 1e-4 else "FAIL"
    print(f"{verdict}: target >= 3x faster with max |diff| <= 1e-4")


if __name__ == "__main__":
    main()
