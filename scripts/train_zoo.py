"""Train the model zoo of the verification-study reproduction on the synthetic cohorts (CPU minutes, cached).

Run: ``python scripts/train_zoo.py [--nets sos_small_cnn,sos_resnet18] [--epochs N] [--n 200] [--size 32]
[--out runs/zoo]``

Every model trains on ``generate(data, n=--n, size=--size, seed=0)`` split (stratified, seeded) into training
(85 %) and validation (15 %), and is tested on the disjoint cohort ``generate(data, n=100, size, seed=1000)``.
Input: HU clipped to [-1000, 2000] and scaled to [0, 1] (as the sos_staging bundle). Recipe as the bundle: AdamW
(lr 2e-3, weight decay 0.05), cosine schedule, batch 8, random left-right flip; the checkpoint with the best
validation accuracy is kept. Zoo members (``DATA_ARCH``): SOS-trained SmallCNN, MONAI ResNet18/34/50 (3D, narrowed
with ``widen_factor=0.25`` so that they train on a shared CPU), ConvNeXt-pico and ConvNeXt+Attn-pico (kernel 3, as
the bundle); chin- and cvm-trained SmallCNN and ConvNeXt+Attn (the "unsuitable" candidates). ConvNeXt models are
trained last. Each model is saved as ``<out>/<name>.pt`` (state dict) + ``<out>/<name>.json`` (settings, test and
validation accuracy, epochs, seconds); a model whose JSON has the same settings (including the hash of
``monai_gamverify/networks.py`` for the package's networks) is skipped.

Prints one line per epoch (tqdm) and a table ``model | data | classes | epochs | val acc | test acc | seconds``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import monai_gamverify.networks.nets as gnets
from monai_gamverify.data.synthetic import generate, stratified_split
from monai_gamverify.io import atomic_path, write_json

HU_WINDOW = (-1000.0, 2000.0)
N_CLASSES = {"sos": 5, "chin": 2, "cvm": 6}
RESNET_WIDEN = 0.25
#: zoo member -> (training data, architecture, default epochs); training order = this order (ConvNeXt last)
DATA_ARCH = {
    "sos_small_cnn": ("sos", "small_cnn", 40),
    "chin_small_cnn": ("chin", "small_cnn", 30),
    "cvm_small_cnn": ("cvm", "small_cnn", 30),
    "sos_resnet18": ("sos", "resnet18", 12),
    "sos_resnet34": ("sos", "resnet34", 8),
    "sos_resnet50": ("sos", "resnet50", 12),
    "sos_convnext_pico": ("sos", "convnext_pico", 20),
    "sos_convnext_attn_pico": ("sos", "convnext_attn_pico", 20),
    "chin_convnext_attn_pico": ("chin", "convnext_attn_pico", 12),
    "cvm_convnext_attn_pico": ("cvm", "convnext_attn_pico", 12),
}
#: Grad-CAM target (last stage) and early feature layers (Method 2) of each architecture
CAM_LAYER = {"small_cnn": "res4", "resnet": "layer4", "convnext": "stages.2"}
FEATURE_LAYERS = {"small_cnn": ("stem", "res2"), "resnet": ("layer1", "layer2"), "convnext": ("stages.0", "stages.1")}


def start_run(args: argparse.Namespace) -> tuple[torch.device, Path, float]:
    """Threads, device (CUDA when present), the output folder and the start time of an experiment script."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), out, time.perf_counter()


def family(arch: str) -> str:
    """``small_cnn``, ``resnet`` or ``convnext``."""
    return "resnet" if arch.startswith("resnet") else "convnext" if arch.startswith("convnext") else arch


#: hash of ``monai_gamverify/networks.py`` as imported by this process (a changed definition retrains those networks)
_NETWORKS_SHA = hashlib.sha256(Path(gnets.__file__).read_bytes()).hexdigest()[:16]


def networks_sha() -> str:
    """Hash of ``monai_gamverify/networks.py`` taken at import (the code this process trains)."""
    return _NETWORKS_SHA


def build_network(arch: str, n_classes: int) -> nn.Module:
    """A fresh 3D, 1-channel classifier of the given architecture."""
    if arch == "small_cnn":
        return gnets.SmallCNN(spatial_dims=3, in_channels=1, out_channels=n_classes)
    if arch in ("convnext_pico", "convnext_attn_pico"):
        return getattr(gnets, arch)(spatial_dims=3, in_channels=1, out_channels=n_classes, kernel_size=3)
    if arch in ("resnet18", "resnet34", "resnet50"):
        from monai.networks import nets

        return getattr(nets, arch)(spatial_dims=3, n_input_channels=1, num_classes=n_classes, widen_factor=RESNET_WIDEN)
    raise ValueError(f"unknown architecture {arch!r}")


def to_input(hu: np.ndarray) -> torch.Tensor:
    """(n, *spatial) HU -> (n, 1, *spatial) float32 in [0, 1] (clip to the HU window, then scale)."""
    lo, hi = HU_WINDOW
    return torch.from_numpy((np.clip(hu, lo, hi) - lo) / (hi - lo)).float().unsqueeze(1)


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified training / validation indices (85 / 15 %)."""
    names = np.asarray(stratified_split(labels, seed=seed, fractions=(0.85, 0.15, 0.0)))
    return np.flatnonzero(names == "training"), np.flatnonzero(names == "validation")


def cohorts(data: str, n: int, size: int, seed: int = 0, n_test: int = 100) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{"train"|"val"|"test": (x, y)}`` of a kind; test = the disjoint cohort of seed ``seed + 1000``."""
    dev = generate(data, n=n, size=size, seed=seed)
    test = generate(data, n=n_test, size=size, seed=seed + 1000)
    tr, va = split(np.asarray(dev.labels), seed)
    x, y = to_input(dev.images), torch.as_tensor(np.array(dev.labels)).long()
    return {
        "train": (x[tr], y[tr]),
        "val": (x[va], y[va]),
        "test": (to_input(test.images), torch.as_tensor(np.array(test.labels)).long()),
    }


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Logits of ``x`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def settings_of(name: str, epochs: int, args: argparse.Namespace) -> dict:
    data, arch, _ = DATA_ARCH[name]
    s = {
        "name": name,
        "data": data,
        "arch": arch,
        "n_classes": N_CLASSES[data],
        "epochs": int(epochs),
        "n": args.n,
        "size": args.size,
        "seed": args.seed,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch": args.batch,
    }
    if arch.startswith("resnet"):
        s["widen_factor"] = RESNET_WIDEN
    else:
        s["networks_sha"] = networks_sha()
    return s


def train_one(settings: dict, data: dict) -> tuple[nn.Module, dict]:
    """Train with the bundle's recipe; returns the best-validation model and its metrics."""
    torch.manual_seed(settings["seed"])
    g = torch.Generator().manual_seed(settings["seed"])
    model = build_network(settings["arch"], settings["n_classes"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings["epochs"])
    loss_fn = nn.CrossEntropyLoss()
    (x_tr, y_tr), (x_va, y_va) = data["train"], data["val"]
    best, best_state, t0 = -1.0, None, time.perf_counter()
    bar = tqdm(range(settings["epochs"]), desc=settings["name"], leave=False)
    for _ in bar:
        model.train()
        perm, total = torch.randperm(len(x_tr), generator=g), 0.0
        for i in range(0, len(perm), settings["batch"]):
            idx = perm[i : i + settings["batch"]]
            xb = x_tr[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # random left-right flip per sample (axis x)
            xb = torch.where(flip.view(-1, 1, 1, 1, 1), xb.flip(2), xb)
            opt.zero_grad()
            loss = loss_fn(model(xb), y_tr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        val_acc = (predict(model, x_va).argmax(1) == y_va).float().mean().item()
        if val_acc > best:
            best, best_state = val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{total / len(x_tr):.3f}", val=f"{val_acc:.2f}", best=f"{best:.2f}")
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    x_te, y_te = data["test"]
    test_acc = (predict(model, x_te).argmax(1) == y_te).float().mean().item()
    return model, {"val_acc": best, "test_acc": test_acc, "seconds": seconds, "chance": 1.0 / settings["n_classes"]}


def load_member(out: str | Path, name: str) -> tuple[nn.Module, dict]:
    """A trained zoo member (eval mode) and its JSON record."""
    out = Path(out)
    info = json.loads((out / f"{name}.json").read_text())
    model = build_network(info["arch"], info["n_classes"])
    model.load_state_dict(torch.load(out / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval(), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default=",".join(DATA_ARCH), help="comma-separated zoo members")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every member (default: per member)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/zoo")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.strip() for s in args.nets.split(",") if s.strip()]
    unknown = [s for s in names if s not in DATA_ARCH]
    if unknown:
        raise SystemExit(f"unknown zoo member(s) {unknown}; choose from {list(DATA_ARCH)}")
    names = [s for s in DATA_ARCH if s in names]  # ConvNeXt last
    cache: dict[str, dict] = {}
    rows = []
    for name in names:
        settings = settings_of(name, args.epochs or DATA_ARCH[name][2], args)
        record = out / f"{name}.json"
        if record.is_file() and (out / f"{name}.pt").is_file():
            old = json.loads(record.read_text())
            if old.get("settings") == settings:
                print(f"{name}: already trained with these settings, skipped")
                rows.append(old)
                continue
        if settings["data"] not in cache:
            cache[settings["data"]] = cohorts(settings["data"], args.n, args.size, args.seed)
        model, metrics = train_one(settings, cache[settings["data"]])
        with atomic_path(out / f"{name}.pt") as tmp:
            torch.save(model.state_dict(), tmp)
        info = {**settings, **metrics, "settings": settings}
        write_json(info, record)
        rows.append(info)
        print(
            f"{name}: test acc {metrics['test_acc']:.3f} (chance {metrics['chance']:.3f}), {metrics['seconds']:.0f} s"
        )
    print(f"\n| model | data | classes | epochs | val acc | test acc | seconds |\n|{'---|' * 7}")
    for r in rows:
        print(
            f"| {r['arch']} | {r['data']} | {r['n_classes']} | {r['epochs']} | {r['val_acc']:.3f} | "
            f"{r['test_acc']:.3f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
