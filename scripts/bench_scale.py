"""Benchmark at real size: CAMs on MONAI resnet18 (3D, 1 channel) and the similarity features, time and peak memory.

Every measurement runs in a fresh subprocess (so peak memory is that call's alone): data and model are built,
the code path is warmed up on a small input (similarity: the first 16 planes of the same maps), then the call is
timed (wall and CPU time) while a thread polls the resident set size every millisecond; peak memory = highest RSS
during the call minus the RSS just before it (CUDA: ``torch.cuda.max_memory_allocated`` above the allocation
before the call). Ratios are to forward-only inference of the same input (CAMs) and to the reference loop on the
same maps (similarity: ``skimage.metrics.structural_similarity`` / ``scipy.stats.wasserstein_distance`` /
``scipy.stats.entropy`` / numpy, per slice or per volume, as in ``scripts/bench_similarity.py``).

Score-CAM runs with ``top_k`` and ``max_memory_mb``. ``--agree-size`` measures the agreement of top-k Score-CAM
with full Score-CAM (Pearson and IoU of median-binarised maps, from ``similarity_metrics``). ``--project-sizes``
measures one probe and one budget-sized chunk of masked forwards at that size and projects the time of the whole
call from them (labelled as a projection in the table).

    python scripts/bench_scale.py --sim-sizes 64 128 --cam-sizes 64 --out docs/scale.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the reference loop of bench_similarity.py

LAYER = "layer4"
N_CLASSES = 5


# ---------------------------------------------------------------------------------------------- measurement helpers
class Peak:
    """Peak memory of a block above its start: polled RSS on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.bytes = 0

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base, self.high, self.done = self.rss(), [0], threading.Event()

        def poll() -> None:
            while not self.done.is_set():
                self.high[0] = max(self.high[0], self.rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.done.set()
        self.thread.join()
        self.bytes = max(self.high[0], self.rss()) - self.base


def timed(fn, device: torch.device) -> tuple[object, float, float, int]:
    """(result, wall seconds, CPU seconds, peak bytes) of one call."""
    with Peak(device) as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, wall, cpu, peak.bytes


# ---------------------------------------------------------------------------------------------- similarity worker
def smooth_maps(size: int, seed: int) -> np.ndarray:
    """One CAM-like map (1, 1, size, size, size): blurred noise scaled to [0, 1], float32."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    m = gaussian_filter(rng.random((size, size, size), dtype=np.float32), sigma=3.0)
    return ((m - m.min()) / (m.max() - m.min())).astype(np.float32)[None, None]


def sim_worker(spec: dict) -> dict:
    from bench_similarity import reference, reference_pair

    from monai_gamverify.metrics.similarity import DEFAULT_METRICS, similarity_metrics

    dev = torch.device(spec["device"])
    axis = spec["axis"]
    a, b = smooth_maps(spec["size"], 0), smooth_maps(spec["size"], 1)
    if spec["impl"] == "torch":
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)

        def run(x, y):
            got = similarity_metrics(x, y, slice_axis=axis, max_memory_mb=spec.get("max_memory_mb"))
            return [float(got[m][0]) for m in DEFAULT_METRICS]

        args = (ta, tb)
        warm = (ta[:, :, :16].contiguous(), tb[:, :, :16].contiguous())
    else:

        def run(x, y):
            if axis is None:
                return [float(v) for v in reference_pair(x[0, 0], y[0, 0])]
            return [float(v) for v in reference(x, y, axis)[0]]

        args = (a, b)
        warm = (a[:, :, :16].copy(), b[:, :, :16].copy())
    run(*warm)  # imports, allocator, kernels: 16 full-size planes, so both sides warm up at the slice size measured
    values, wall, cpu, peak = timed(lambda: run(*args), dev)
    return {"values": values, "wall": wall, "cpu": cpu, "peak": peak}


# ---------------------------------------------------------------------------------------------- CAM workers
def build(device: torch.device) -> torch.nn.Module:
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    return resnet18(spatial_dims=3, n_input_channels=1, num_classes=N_CLASSES).eval().to(device)


def make_input(size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, size, size, size, generator=g).to(device)


def cam_worker(spec: dict) -> dict:
    import monai_gamverify as gv

    dev = torch.device(spec["device"])
    net = build(dev)
    x = make_input(spec["size"], dev)
    method = spec["method"]
    extra: dict = {}
    if method == "forward":

        def run(inp):
            with torch.no_grad():
                return net(inp)

    elif method == "ScoreCAM":
        cam = gv.ScoreCAM(net, LAYER, max_memory_mb=spec["max_memory_mb"], top_k=spec["top_k"])

        def run(inp):
            return cam(inp)

    else:
        cam = getattr(gv, method)(net, LAYER)

        def run(inp):
            return cam(inp)

    if method != "ScoreCAM":
        run(make_input(32, dev))  # warm-up on a small input (Score-CAM: the call itself is hundreds of forwards)
    _, wall, cpu, peak = timed(lambda: run(x), dev)
    if method == "ScoreCAM":
        extra = {"chunk": cam.last_chunk_size, "probe_bytes": cam.last_probe_bytes, "top_k": spec["top_k"]}
    return {"wall": wall, "cpu": cpu, "peak": peak, **extra}


def project_worker(spec: dict) -> dict:
    """One probe and one budget-sized chunk of masked forwards at ``size``: the parts a Score-CAM call repeats."""
    import monai_gamverify as gv
    from monai_gamverify.visualize.hooks import record_activations

    dev = torch.device(spec["device"])
    net = build(dev)
    x = make_input(spec["size"], dev)
    cam = gv.ScoreCAM(net, LAYER, max_memory_mb=spec["max_memory_mb"])
    with torch.no_grad():
        acts = record_activations(net, x, LAYER)[LAYER]
        t0 = time.perf_counter()
        idx = net(x).argmax(1)
        t_forward = time.perf_counter() - t0
        n_channels = acts.shape[1]
        t0 = time.perf_counter()
        _, probe = cam._probe(x, acts[0, :1], x.shape[2:], idx, None)
        t_probe = time.perf_counter() - t0
        chunk = max(1, int(spec["max_memory_mb"] * 2**20 // probe))
        chunk = min(chunk, n_channels)
        _, t_chunk, _, peak = timed(lambda: cam._masked_scores(x, acts[0, 1 : 1 + chunk], x.shape[2:], idx, None), dev)
    out = {"chunk": chunk, "probe_bytes": probe, "t_forward": t_forward, "t_probe": t_probe, "t_chunk": t_chunk}
    out["chunk_peak"] = peak
    out["channels"] = n_channels
    # a call: the clean forward, the zero-input baseline forward, the probe, then chunks for the other channels
    for k in sorted({*spec["ks"], n_channels}):
        out[f"projected_s_k{k}"] = 2 * t_forward + t_probe + math.ceil((k - 1) / chunk) * t_chunk
    return out


def agree_worker(spec: dict) -> dict:
    """Agreement of top-k Score-CAM with full Score-CAM on resnet18 (random weights, seed 0) for a few inputs."""
    import monai_gamverify as gv
    from monai_gamverify.metrics.similarity import similarity_metrics

    dev = torch.device(spec["device"])
    net = build(dev)
    rows = []
    t_full = 0.0
    for seed in range(spec["n_inputs"]):
        x = make_input(spec["size"], dev, seed=seed)
        t0 = time.perf_counter()
        full = gv.ScoreCAM(net, LAYER, batch_size=32)(x)
        t_full += time.perf_counter() - t0
        for rank_by in ("variance", "gradient"):
            for k in spec["ks"]:
                t0 = time.perf_counter()
                approx = gv.ScoreCAM(net, LAYER, batch_size=32, top_k=k, rank_by=rank_by)(x)
                t_k = time.perf_counter() - t0
                feats = similarity_metrics(approx, full, metrics=["pearson", "iou"])
                rows.append(
                    {"seed": seed, "rank_by": rank_by, "k": k, "seconds": t_k}
                    | {m: float(v[0]) for m, v in feats.items()}
                )
    return {"rows": rows, "t_full": t_full / spec["n_inputs"]}


WORKERS = {"sim": sim_worker, "cam": cam_worker, "project": project_worker, "agree": agree_worker}


def measure(spec: dict, threads: int, timeout: float) -> dict:
    """Run one measurement in a fresh subprocess and return its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    """Several runs of one measurement: the fastest wall and CPU times, the largest peak (the conservative side)."""
    out = dict(runs[0])
    out["wall"] = min(r["wall"] for r in runs)
    out["cpu"] = min(r["cpu"] for r in runs)
    out["peak"] = max(r["peak"] for r in runs)
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim-sizes", type=int, nargs="*", default=[64, 128], help="similarity: cubic map edges")
    p.add_argument("--cam-sizes", type=int, nargs="*", default=[64], help="forward / Grad-CAM / Grad-CAM++ sizes")
    p.add_argument("--scorecam-sizes", type=int, nargs="*", default=[64], help="top-k Score-CAM, measured")
    p.add_argument("--project-sizes", type=int, nargs="*", default=[], help="Score-CAM projected from one chunk")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--max-memory-mb", type=float, default=2048.0, help="Score-CAM budget of the masked forwards")
    p.add_argument("--agree-size", type=int, default=0, help="edge for the top-k vs full agreement (0: skip)")
    p.add_argument("--agree-ks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--agree-inputs", type=int, default=2)
    p.add_argument("--sim-repeats", type=int, default=1, help="similarity runs per cell: min time, max peak")
    p.add_argument("--sim-threads", type=int, default=1, help="threads for similarity (the reference uses one)")
    p.add_argument("--cam-threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--out", default=None, help="write the markdown tables here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return

    from monai_gamverify.metrics.similarity import DEFAULT_METRICS

    started = time.time()
    lines = [
        "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "`",
        "",
        f"Device: {a.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs), "
        f"torch {torch.__version__}, numpy {np.__version__}; similarity with {a.sim_threads} torch thread(s), "
        f"CAMs with {a.cam_threads}. Each figure is one call in a fresh subprocess after a warm-up on a small input; "
        "peak memory = highest RSS during the call above the RSS just before it (CUDA: allocator peak).",
        "",
    ]
    if a.sim_sizes:
        lines += [
            "### Similarity features (7 default metrics, one pair of float32 maps)",
            "",
            "| size | mode | reference s (cpu s) | torch s (cpu s) | speed-up wall (cpu) | reference peak MiB "
            "| torch peak MiB | memory ratio | max abs diff |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for size in a.sim_sizes:
            for axis in (0, None):
                spec = {"kind": "sim", "size": size, "axis": axis, "device": a.device}
                refs, gots = [], []
                for _ in range(a.sim_repeats):  # alternated, each in a fresh process
                    refs.append(measure({**spec, "impl": "reference", "device": "cpu"}, 1, a.timeout))
                    gots.append(measure({**spec, "impl": "torch"}, a.sim_threads, a.timeout))
                ref, got = best(refs), best(gots)
                diff = max(abs(u - v) for u, v in zip(ref["values"], got["values"]))
                mode = "volume-wise" if axis is None else "slice-wise (axis 0)"
                row = (
                    f"| {size}³ | {mode} | {ref['wall']:.3f} ({ref['cpu']:.3f}) | {got['wall']:.3f} ({got['cpu']:.3f}) "
                    f"| ×{ref['wall'] / got['wall']:.1f} (×{ref['cpu'] / got['cpu']:.1f}) | {mib(ref['peak'])} "
                    f"| {mib(got['peak'])} | {got['peak'] / max(ref['peak'], 1):.2f} | {diff:.1e} |"
                )
                lines.append(row)
                print(row, flush=True)
        lines += [
            "",
            f"Metrics: {', '.join(DEFAULT_METRICS)}; max abs diff over all of them. {a.sim_repeats} run(s) per cell "
            "(alternating reference and torch, each in a fresh process): fastest time, largest peak.",
            "",
        ]

    cam_sizes = sorted(set(a.cam_sizes) | set(a.scorecam_sizes))
    if cam_sizes:
        lines += [
            f"### CAMs on MONAI resnet18 (3D, 1 channel, {N_CLASSES} classes, random weights, seed 0), "
            f"target `{LAYER}`, batch 1",
            "",
            "| size | method | time s (cpu s) | × forward time | peak MiB | × forward memory | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for size in cam_sizes:
            methods = ["forward"]
            if size in a.cam_sizes:
                methods += ["GradCAM", "GradCAMpp"]
            if size in a.scorecam_sizes:
                methods.append("ScoreCAM")
            fwd = None
            for method in methods:
                spec = {"kind": "cam", "method": method, "size": size, "device": a.device}
                spec |= {"top_k": a.top_k, "max_memory_mb": a.max_memory_mb}
                r = measure(spec, a.cam_threads, a.timeout)
                fwd = fwd or r
                name = method
                note = ""
                if method == "ScoreCAM":
                    name = f"ScoreCAM top_k={a.top_k}, max_memory_mb={a.max_memory_mb:g}"
                    note = f"chunk {r['chunk']} (probe: {mib(r['probe_bytes'])} MiB per masked input)"
                row = (
                    f"| {size}³ | {name} | {r['wall']:.2f} ({r['cpu']:.2f}) | {r['wall'] / fwd['wall']:.2f} "
                    f"| {mib(r['peak'])} | {r['peak'] / max(fwd['peak'], 1):.2f} | {note} |"
                )
                lines.append(row)
                print(row, flush=True)
        lines.append("")

    if a.project_sizes:
        lines += [
            "### Score-CAM projected from one measured chunk (not a full run)",
            "",
            "| size | budget MiB | probe MiB / masked input | chunk | chunk s | chunk peak MiB | projected s |",
            "|---|---|---|---|---|---|---|",
        ]
        for size in a.project_sizes:
            spec = {"kind": "project", "size": size, "device": a.device, "max_memory_mb": a.max_memory_mb}
            spec["ks"] = [a.top_k]
            r = measure(spec, a.cam_threads, a.timeout)
            proj = ", ".join(
                f"k={k.split('_k')[1]}: {v:.0f} s ({v / 60:.1f} min)"
                for k, v in r.items()
                if k.startswith("projected_s_k")
            )
            row = (
                f"| {size}³ | {a.max_memory_mb:g} | {mib(r['probe_bytes'])} | {r['chunk']} | {r['t_chunk']:.1f} "
                f"| {mib(r['chunk_peak'])} | {proj} |"
            )
            lines.append(row)
            print(row, flush=True)
        lines += [
            "",
            "Projection = 2 × clean forward (measured) + probe (measured) + ⌈(k − 1) / chunk⌉ × chunk time "
            "(measured once); k = all channels is full Score-CAM.",
            "",
        ]

    if a.agree_size:
        spec = {"kind": "agree", "size": a.agree_size, "device": a.device, "ks": a.agree_ks}
        spec["n_inputs"] = a.agree_inputs
        r = measure(spec, a.cam_threads, a.timeout)
        lines += [
            f"### Top-k Score-CAM vs full Score-CAM ({a.agree_size}³, resnet18 random weights, "
            f"{a.agree_inputs} random inputs; full Score-CAM {r['t_full']:.0f} s per input)",
            "",
            "| rank_by | k | time s | Pearson (mean, min) | IoU of median masks (mean, min) |",
            "|---|---|---|---|---|",
        ]
        for rank_by in ("variance", "gradient"):
            for k in a.agree_ks:
                rows = [q for q in r["rows"] if q["rank_by"] == rank_by and q["k"] == k]
                pear = [q["pearson"] for q in rows]
                iou = [q["iou"] for q in rows]
                row = (
                    f"| {rank_by} | {k} | {np.mean([q['seconds'] for q in rows]):.1f} "
                    f"| {np.mean(pear):.3f}, {min(pear):.3f} | {np.mean(iou):.3f}, {min(iou):.3f} |"
                )
                lines.append(row)
                print(row, flush=True)
        lines.append("")
    lines.append(f"Total benchmark time: {(time.time() - started) / 60:.1f} min.")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
