"""Benchmark: this package's CAMs against forward-only inference, ``monai.visualize.GradCAM`` and captum.

One process for the timings (runs interleaved method by method, medians reported), a fresh subprocess per
method for peak memory (CPU: peak resident set size, polled during the call, above the RSS just before it;
CUDA: ``torch.cuda.max_memory_allocated`` above the baseline).

    python scripts/bench_cam.py                       # resnet18 + DenseNet121, 3D, 64^3, batch 1 and 4
    python scripts/bench_cam.py --repeats 3 --no-scorecam --out docs/bench_cam.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore")

NETS = {"resnet18": "layer4", "densenet121": "class_layers.relu"}


def build(name: str) -> torch.nn.Module:
    from monai.networks.nets import DenseNet121, resnet18

    torch.manual_seed(0)
    if name == "resnet18":
        net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=5)
    else:
        net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=5)
    return net.eval()


def runner(method: str, net: torch.nn.Module, layer: str, x: torch.Tensor):
    """A zero-argument callable doing one explanation (or one inference) of ``x``."""
    import monai_gamverify as gv

    if method == "forward":

        def run():
            with torch.no_grad():
                return net(x)

    elif method in ("GradCAM", "GradCAMpp", "ScoreCAM"):
        cls = getattr(gv, method)
        cam = cls(net, layer, batch_size=32) if method == "ScoreCAM" else cls(net, layer)

        def run():
            return cam(x)

    elif method == "monai.GradCAM":
        from monai.visualize import GradCAM as MonaiGradCAM

        # monai's CAM keeps its hooks for the object's lifetime; build it once like a user would
        cam = MonaiGradCAM(nn_module=net, target_layers=layer)

        def run():
            return cam(x)

    elif method == "captum.LayerGradCam":
        from captum.attr import LayerAttribution, LayerGradCam

        lgc = LayerGradCam(net, dict(net.named_modules())[layer])
        with torch.no_grad():
            target = net(x).argmax(1)

        def run():
            attr = lgc.attribute(x, target=target, relu_attributions=True)
            return LayerAttribution.interpolate(attr, x.shape[2:], "trilinear")

    else:
        raise ValueError(method)
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_worker(method: str, net_name: str, batch: int, size: int, device: str) -> None:
    dev = torch.device(device)
    net = build(net_name).to(dev)
    x = torch.randn(batch, 1, size, size, size, device=dev)
    run = runner(method, net, NETS[net_name], x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync(dev)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # ru_maxrss is a lifetime high-water mark (imports, init); poll the current RSS during the call instead
        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        base, high, done = rss(), [0], threading.Event()

        def poll() -> None:
            while not done.is_set():
                high[0] = max(high[0], rss())
                time.sleep(0.0005)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        run()
        done.set()
        t.join()
        peak = max(high[0], rss()) - base
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(method: str, net_name: str, batch: int, size: int, device: str) -> float:
    cmd = [sys.executable, __file__, "--peak-worker", method, net_name, str(batch), str(size), device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--nets", nargs="+", default=list(NETS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-scorecam", action="store_true", help="skip Score-CAM (channels x forward passes)")
    p.add_argument("--scorecam-nets", nargs="+", default=["resnet18"], help="networks Score-CAM is timed on")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--peak-worker", nargs=5, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peak_worker:
        m, n, b, s, d = a.peak_worker
        peak_worker(m, n, int(b), int(s), d)
        return
    dev = torch.device(a.device)
    methods = ["forward", "GradCAM", "GradCAMpp", "monai.GradCAM", "captum.LayerGradCam"]
    rows = []
    for net_name in a.nets:
        net = build(net_name).to(dev)
        layer = NETS[net_name]
        for batch in a.batches:
            x = torch.randn(batch, 1, a.size, a.size, a.size, device=dev)
            runs = {m: runner(m, net, layer, x) for m in methods}
            for run in runs.values():  # warm-up
                run()
            times: dict[str, list[float]] = {m: [] for m in methods}
            for _ in range(a.repeats):  # interleaved: every method once per round
                for m, run in runs.items():
                    sync(dev)
                    t0 = time.perf_counter()
                    run()
                    sync(dev)
                    times[m].append(time.perf_counter() - t0)
            med = {m: statistics.median(v) for m, v in times.items()}
            if not a.no_scorecam and batch == min(a.batches) and net_name in a.scorecam_nets:
                run = runner("ScoreCAM", net, layer, x)
                t0 = time.perf_counter()
                run()
                med["ScoreCAM"] = time.perf_counter() - t0
            for m, t in med.items():
                mem = None if a.no_memory else peak_memory(m, net_name, batch, a.size, a.device)
                rows.append(dict(net=net_name, batch=batch, method=m, seconds=t, ratio=t / med["forward"], mem=mem))
                print(
                    f"{net_name:12s} B={batch} {m:20s} {t * 1000:9.1f} ms  x{t / med['forward']:5.2f} of forward"
                    + ("" if mem is None else f"  peak {mem:8.1f} MiB"),
                    flush=True,
                )
    # ratios of memory to forward-only, and speed-up over monai
    lines = [
        f"Device: {dev} ({torch.get_num_threads()} threads), input (B, 1, {a.size}, {a.size}, {a.size}), "
        f"torch {torch.__version__}, {a.repeats} interleaved repeats (median; Score-CAM: one run).",
        "",
        "| network | B | method | time (ms) | × forward | peak memory (MiB) | × forward memory | monai time / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = [q for q in rows if q["net"] == r["net"] and q["batch"] == r["batch"]]
        fwd = next(q for q in same if q["method"] == "forward")
        mon = next(q for q in same if q["method"] == "monai.GradCAM")
        mem = "" if r["mem"] is None else f"{r['mem']:.0f}"
        mem_ratio = "" if r["mem"] is None or not fwd["mem"] else f"{r['mem'] / fwd['mem']:.2f}"
        speed = f"{mon['seconds'] / r['seconds']:.2f}" if r["method"] not in ("forward", "monai.GradCAM") else ""
        lines.append(
            f"| {r['net']} | {r['batch']} | {r['method']} | {r['seconds'] * 1000:.0f} | {r['ratio']:.2f} | {mem} | "
            f"{mem_ratio} | {speed} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
