"""Train the model zoo of the verification experiments on the synthetic cohorts (CPU minutes, cached).

Run: ``python scripts/train_zoo.py [--zoo full|classic] [--nets a,b] [--epochs N] [--n 200] [--size 32]
[--out runs/zoo] [--threads 1]``

Two zoos:

- ``classic`` (``DATA_ARCH``, the default of earlier runs): 10 models, SOS-trained SmallCNN, MONAI ResNet18/34/50
  (``widen_factor=0.25``), ConvNeXt-pico, ConvNeXt+Attn-pico; chin- and cvm-trained SmallCNN and ConvNeXt+Attn.
- ``full`` (``ZOO``, issue 16): 26 models of 5 architectures (SmallCNN, ConvNeXt-pico, ConvNeXt+Attn-pico, MONAI
  ResNet18 narrowed, MONAI DenseNet narrowed to 2 dense blocks (``densenet_tiny``: growth 8, blocks (6, 12), so that
  its last block keeps 3^3 voxels at 24^3)). *Suitable* (label 1) = trained on SOS, with several seeds,
  augmentations (``flip``; ``none``; ``flip_noise``: flip + Gaussian noise + intensity scaling) and spacings
  (``spacing`` = 1.25: the same field of view acquired on a 1.25x finer grid, i.e. smaller voxels, and resampled
  to the common size). *Unsuitable* (label 0) = trained on chin, cvm, quality (overall score rounded to 5 classes;
  generated at 32^3 and resampled), **label-shuffled SOS** (the images of SOS, labels permuted with a seed) and
  **contrast-inverted SOS** (``1 - x``: another modality's contrast, same anatomy and labels).

Every model trains on ``generate(data, n=--n, size=--size, seed=0)`` split (stratified, seeded) into training
(85 %) and validation (15 %), and is tested on the disjoint cohort ``generate(data, n=100, size, seed=1000)`` (with
the member's own corruption: a label-shuffled model is tested on shuffled labels, so its test accuracy is chance).
Input: HU clipped to [-1000, 2000] and scaled to [0, 1] (as the sos_staging bundle). Recipe as the bundle: AdamW
(lr 2e-3, weight decay 0.05), cosine schedule, batch 8, random left-right flip (unless ``aug="none"``); the
checkpoint with the best validation accuracy is kept. Each model is saved as ``<out>/<name>.pt`` (state dict) +
``<out>/<name>.json`` (settings, label, CAM and feature layers, test and validation accuracy, epochs, seconds); a
model whose JSON has the same settings (including the hash of ``monai_gamverify/networks.py`` for the package's
networks) is skipped.

Prints one line per epoch (tqdm) and a table ``model | data | arch | label | epochs | val acc | test acc | s``.
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
N_CLASSES = {"sos": 5, "chin": 2, "cvm": 6, "quality": 5}
RESNET_WIDEN = 0.25
#: classic zoo member -> (training data, architecture, default epochs); training order = this order (ConvNeXt last)
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
#: default epochs per architecture in the full zoo
EPOCHS = {"small_cnn": 30, "convnext_pico": 15, "convnext_attn_pico": 15, "resnet18": 12, "densenet_tiny": 15}


def _member(data: str, arch: str, seed: int = 0, aug: str = "flip", spacing: float = 1.0, corrupt: str = "") -> dict:
    label = int(data == "sos" and not corrupt)
    return {
        "data": data,
        "arch": arch,
        "seed": seed,
        "aug": aug,
        "spacing": spacing,
        "corrupt": corrupt,
        "label": label,
    }


#: full zoo (issue 16): name -> spec; label 1 = suitable for SOS staging (trained on SOS), 0 = not
ZOO = {
    # suitable: SOS, several seeds / augmentations / spacings, 5 architectures
    "sos_small_cnn_s0": _member("sos", "small_cnn", 0),
    "sos_small_cnn_s1": _member("sos", "small_cnn", 1),
    "sos_small_cnn_s2_noaug": _member("sos", "small_cnn", 2, aug="none"),
    "sos_small_cnn_s3_noise": _member("sos", "small_cnn", 3, aug="flip_noise"),
    "sos_small_cnn_s4_sp125": _member("sos", "small_cnn", 4, spacing=1.25),
    "sos_resnet18_s0": _member("sos", "resnet18", 0),
    "sos_resnet18_s1_noaug": _member("sos", "resnet18", 1, aug="none"),
    "sos_densenet_tiny_s0": _member("sos", "densenet_tiny", 0),
    "sos_densenet_tiny_s1_sp125": _member("sos", "densenet_tiny", 1, spacing=1.25),
    "sos_convnext_pico_s0": _member("sos", "convnext_pico", 0),
    "sos_convnext_pico_s1_noise": _member("sos", "convnext_pico", 1, aug="flip_noise"),
    "sos_convnext_attn_pico_s0": _member("sos", "convnext_attn_pico", 0),
    "sos_convnext_attn_pico_s1_sp125": _member("sos", "convnext_attn_pico", 1, spacing=1.25),
    # unsuitable: other tasks / wrong data
    "chin_small_cnn": _member("chin", "small_cnn"),
    "chin_resnet18": _member("chin", "resnet18"),
    "chin_convnext_attn_pico": _member("chin", "convnext_attn_pico"),
    "cvm_small_cnn": _member("cvm", "small_cnn"),
    "cvm_densenet_tiny": _member("cvm", "densenet_tiny"),
    "cvm_convnext_pico": _member("cvm", "convnext_pico"),
    "quality_small_cnn": _member("quality", "small_cnn"),
    "quality_resnet18": _member("quality", "resnet18"),
    "shuffled_sos_small_cnn": _member("sos", "small_cnn", corrupt="shuffle"),
    "shuffled_sos_densenet_tiny": _member("sos", "densenet_tiny", corrupt="shuffle"),
    "shuffled_sos_convnext_pico": _member("sos", "convnext_pico", corrupt="shuffle"),
    "inverted_sos_small_cnn": _member("sos", "small_cnn", corrupt="invert"),
    "inverted_sos_convnext_attn_pico": _member("sos", "convnext_attn_pico", corrupt="invert"),
}
#: Grad-CAM target (last stage) and early feature layers (Method 2) of each architecture family
CAM_LAYER = {"small_cnn": "res4", "resnet": "layer4", "convnext": "stages.2", "densenet": "features.denseblock2"}
#: Grad-CAM target below 32^3, where ResNet ``layer4`` has a single voxel (24^3 -> 1^3; ``layer2`` keeps 3^3)
CAM_LAYER_SMALL = {**CAM_LAYER, "resnet": "layer2"}
FEATURE_LAYERS = {
    "small_cnn": ("stem", "res2"),
    "resnet": ("layer1", "layer2"),
    "convnext": ("stages.0", "stages.1"),
    "densenet": ("features.relu0", "features.denseblock1"),
}


def start_run(args: argparse.Namespace) -> tuple[torch.device, Path, float]:
    """Threads, device (CUDA when present), the output folder and the start time of an experiment script."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), out, time.perf_counter()


def family(arch: str) -> str:
    """``small_cnn``, ``resnet``, ``densenet`` or ``convnext``."""
    for fam in ("resnet", "convnext", "densenet"):
        if arch.startswith(fam):
            return fam
    return arch


def cam_layer(arch: str, size: int) -> str:
    """Grad-CAM target layer of an architecture at an input size."""
    return (CAM_LAYER if size >= 32 else CAM_LAYER_SMALL)[family(arch)]


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
    if arch == "densenet_tiny":
        from monai.networks import nets

        return nets.DenseNet(
            spatial_dims=3, in_channels=1, out_channels=n_classes, init_features=8, growth_rate=8,
            block_config=(6, 12), bn_size=2,
        )  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}")


def to_input(hu: np.ndarray) -> torch.Tensor:
    """(n, *spatial) HU -> (n, 1, *spatial) float32 in [0, 1] (clip to the HU window, then scale)."""
    lo, hi = HU_WINDOW
    return torch.from_numpy((np.clip(hu, lo, hi) - lo) / (hi - lo)).float().unsqueeze(1)


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified training / validation indices (85 / 15 %)."""
    names = np.asarray(stratified_split(labels, seed=seed, fractions=(0.85, 0.15, 0.0)))
    return np.flatnonzero(names == "training"), np.flatnonzero(names == "validation")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[2:]) == (size,) * 3:
        return x
    return torch.nn.functional.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)


def load_cohort(data: str, n: int, size: int, seed: int, spacing: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 1, size^3) in [0, 1], y (n,) class) of a kind.

    ``spacing`` = f != 1 acquires the same field of view on a grid of ``size * f`` voxels (voxel size / f, another
    scanner resolution) and resamples it trilinearly to ``size`` (different partial-volume blur, same anatomy);
    ``quality`` is generated at >= 32^3 (its minimum) and its overall consensus score rounded to classes 0..4.
    """
    gen_size = max(int(round(size * spacing)), 24)
    if data == "quality":
        gen_size = max(gen_size, 32)
    c = generate(data, n=n, size=gen_size, seed=seed)
    x = _resize(to_input(c.images), size)
    labels = np.asarray(c.labels)
    if data == "quality":
        labels = np.clip(np.rint(labels[:, -1]) - 1, 0, 4)
    return x, torch.as_tensor(labels.astype(np.int64))


def corrupt(x: torch.Tensor, y: torch.Tensor, how: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``shuffle``: labels permuted (seeded); ``invert``: contrast inverted; ``""``: unchanged."""
    if how == "shuffle":
        return x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))]
    if how == "invert":
        return 1.0 - x, y
    if how:
        raise ValueError(f"unknown corruption {how!r}")
    return x, y


def cohorts(
    data: str, n: int, size: int, seed: int = 0, n_test: int = 100, spacing: float = 1.0, how: str = ""
) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{"train"|"val"|"test": (x, y)}`` of a kind; test = the disjoint cohort of seed ``seed + 1000``."""
    x, y = corrupt(*load_cohort(data, n, size, seed, spacing), how, seed)
    tr, va = split(y.numpy(), seed)
    test = corrupt(*load_cohort(data, n_test, size, seed + 1000, spacing), how, seed + 1)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": test}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Logits of ``x`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def spec_of(name: str) -> dict:
    """The spec of a zoo member (full or classic zoo)."""
    if name in ZOO:
        return dict(ZOO[name])
    if name in DATA_ARCH:
        data, arch, _ = DATA_ARCH[name]
        return _member(data, arch)
    raise KeyError(name)


def settings_of(name: str, epochs: int | None, args: argparse.Namespace) -> dict:
    spec = spec_of(name)
    default_epochs = DATA_ARCH[name][2] if name in DATA_ARCH else EPOCHS[spec["arch"]]
    s = {
        "name": name,
        "data": spec["data"],
        "arch": spec["arch"],
        "n_classes": N_CLASSES[spec["data"]],
        "epochs": int(epochs or default_epochs),
        "n": args.n,
        "size": args.size,
        "seed": args.seed + spec["seed"],
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch": args.batch,
    }
    if name in ZOO:  # classic members keep their old settings (and caches)
        s.update(aug=spec["aug"], spacing=spec["spacing"], corrupt=spec["corrupt"], label=spec["label"])
    if spec["arch"].startswith(("resnet", "densenet")):
        s["widen_factor"] = RESNET_WIDEN if spec["arch"].startswith("resnet") else None
    else:
        s["networks_sha"] = networks_sha()
    return s


def _augment(xb: torch.Tensor, aug: str, g: torch.Generator) -> torch.Tensor:
    if aug == "none":
        return xb
    flip = torch.rand(len(xb), generator=g) < 0.5  # random left-right flip per sample (axis x)
    xb = torch.where(flip.view(-1, 1, 1, 1, 1), xb.flip(2), xb)
    if aug == "flip_noise":
        scale = 1.0 + 0.1 * (2 * torch.rand(len(xb), 1, 1, 1, 1, generator=g) - 1)
        xb = xb * scale + 0.03 * torch.randn(xb.shape, generator=g)
    elif aug != "flip":
        raise ValueError(f"unknown augmentation {aug!r}")
    return xb


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
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = _augment(x_tr[idx], settings.get("aug", "flip"), g)
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
    """A trained zoo member (eval mode) and its JSON record (``label`` added for classic members)."""
    out = Path(out)
    info = json.loads((out / f"{name}.json").read_text())
    info.setdefault("label", int(info["data"] == "sos" and not info.get("corrupt")))
    model = build_network(info["arch"], info["n_classes"])
    model.load_state_dict(torch.load(out / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval(), info


def zoo_names(zoo: str) -> list[str]:
    """Member names of ``"full"`` or ``"classic"``."""
    if zoo not in ("full", "classic"):
        raise ValueError(f"zoo must be 'full' or 'classic', got {zoo!r}")
    return list(ZOO if zoo == "full" else DATA_ARCH)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="classic", choices=("classic", "full"))
    p.add_argument("--nets", default=None, help="comma-separated zoo members (default: the whole zoo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every member (default: per member)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--n-test", type=int, default=100)
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
    members = zoo_names(args.zoo)
    names = members if args.nets is None else [s.strip() for s in args.nets.split(",") if s.strip()]
    unknown = [s for s in names if s not in members]
    if unknown:
        raise SystemExit(f"unknown zoo member(s) {unknown}; choose from {members}")
    names = [s for s in members if s in names]  # zoo order
    cache: dict[tuple, dict] = {}
    rows = []
    t_all = time.perf_counter()
    for name in names:
        settings = settings_of(name, args.epochs, args)
        record = out / f"{name}.json"
        if record.is_file() and (out / f"{name}.pt").is_file():
            old = json.loads(record.read_text())
            if old.get("settings") == settings:
                print(f"{name}: already trained with these settings, skipped")
                rows.append(old)
                continue
        spec = spec_of(name)
        key = (spec["data"], spec["spacing"], spec["corrupt"])
        if key not in cache:
            cache[key] = cohorts(
                spec["data"], args.n, args.size, args.seed, args.n_test, spec["spacing"], spec["corrupt"]
            )
        model, metrics = train_one(settings, cache[key])
        with atomic_path(out / f"{name}.pt") as tmp:
            torch.save(model.state_dict(), tmp)
        layers = {
            "cam_layer": cam_layer(spec["arch"], args.size),
            "feature_layers": FEATURE_LAYERS[family(spec["arch"])],
        }
        info = {**settings, **metrics, **layers, "label": spec["label"], "settings": settings}
        write_json(info, record)
        rows.append(info)
        print(
            f"{name}: test acc {metrics['test_acc']:.3f} (chance {metrics['chance']:.3f}), {metrics['seconds']:.0f} s"
        )
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    print(f"\n| model | data | arch | label | epochs | val acc | test acc | chance | seconds |\n|{'---|' * 9}")
    for r in rows:
        print(
            f"| {r['name']} | {r['data']}{'/' + r['corrupt'] if r.get('corrupt') else ''} | {r['arch']} | "
            f"{r.get('label', int(r['data'] == 'sos'))} | {r['epochs']} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
            f"{r['chance']:.3f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
