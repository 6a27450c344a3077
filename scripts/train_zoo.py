"""Train the model zoo of the verification experiments on the synthetic cohorts (CPU minutes, cached, resumable).

Run: ``python scripts/train_zoo.py [--zoo suitability|classic] [--nets a,b] [--epochs N] [--n 200] [--size 32]
[--out runs/zoo_suit] [--threads 1] [--budget-min 90]``

Zoos:

- ``suitability`` (issue 22, the default): 47 models of 5 architectures (SmallCNN, MONAI DenseNet narrowed
  (``densenet_tiny``), MONAI ResNet18 narrowed (``widen_factor`` 0.25), ConvNeXt-pico, ConvNeXt+Attn-pico), at the
  sos_staging bundle's region of interest (32^3 of 1.25 mm) with the bundle's own recipe: its
  ``train#random_transforms`` (flip, affine, intensity scale, noise) parsed from
  ``bundles/sos_staging/configs/train.json``, AdamW (lr 2e-3, weight decay 0.05), cosine schedule, batch 8, the
  checkpoint with the best validation accuracy. Every CAM layer keeps 8^3 voxels at 32^3 (``CAM_LAYER``: the deepest
  stage with >= 6 voxels per axis). Members: SOS-trained models (several seeds, no augmentation, a finer acquisition
  grid) and unsuitable kinds, each named: **other task** (chin, cvm, quality), **label-shuffled**,
  **contrast-inverted**, **other orientation** (axes permuted), **other field of view** (zoomed out 2x), **heavily
  corrupted** training data (noise + blur + intensity jitter) and **shortcut** ("Clever Hans") models trained on data
  carrying a label-encoding cue (``generate(..., cue="marker"|"offset")``).
- ``classic`` (``DATA_ARCH``): the 10 models of earlier runs.

**Ground truth is measured, not assumed.** Every model is tested on the held-out **target cohort**
``generate("sos", n=--n-test, size, seed=1000)`` (clean SOS; never shown to a verifier) and every SOS-task model also
on the same cohort carrying the marker cue (``cue_acc``). Each model's own-task test accuracy (``own_acc``, on a
held-out cohort of its own training distribution) shows that it learned what it was trained on. Labels:

- ``suitable`` (label 1): trained for SOS staging and target accuracy >= chance + 0.3;
- ``unsuitable`` (label 0): another task; or target accuracy <= chance + 0.15; or a shortcut model whose accuracy
  collapses without its cue (cue accuracy >= chance + 0.5 and target accuracy < chance + 0.3);
- ``between`` (label -1): anything else; reported and left out of scoring.

Each model is saved as ``<out>/<name>.pt`` (state dict) + ``<out>/<name>.json`` (settings, kind, CAM and feature
layers, validation confidences for label-free accuracy estimates, accuracies, label, seconds); a model whose JSON
has the same settings is skipped (rerun the same command to resume). Prints the time budget left after each model
and a table ``model | kind | arch | own acc | target acc | cue acc | label | s``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import monai_gamverify.networks.nets as gnets
from monai_gamverify.data.synthetic import _CLASS_NAMES, generate, stratified_split
from monai_gamverify.io import atomic_path, write_json

REPO = Path(__file__).resolve().parents[1]
BUNDLE_TRAIN = REPO / "bundles" / "sos_staging" / "configs" / "train.json"
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
#: default epochs per architecture in the suitability zoo (about a minute of one core each at 32^3)
EPOCHS = {"small_cnn": 30, "densenet_tiny": 30, "resnet18": 14, "convnext_pico": 18, "convnext_attn_pico": 20}
ARCHS = tuple(EPOCHS)


def _member(data: str, arch: str, seed: int = 0, kind: str = "suitable", **options) -> dict:
    spec = {"data": data, "arch": arch, "seed": seed, "kind": kind, "aug": "bundle", "spacing": 1.0}
    spec.update(corrupt="", cue="none", fov=1.0, permute=False)
    spec.update(options)
    return spec


def _suitability_zoo() -> dict[str, dict]:
    zoo: dict[str, dict] = {}
    for arch in ARCHS:  # SOS-trained: seeds, no augmentation, a 1.25x finer acquisition grid
        zoo[f"sos_{arch}_s0"] = _member("sos", arch, 0)
        zoo[f"sos_{arch}_s1"] = _member("sos", arch, 1)
        zoo[f"sos_{arch}_s2_noaug"] = _member("sos", arch, 2, aug="none")
        zoo[f"sos_{arch}_s3_sp125"] = _member("sos", arch, 3, spacing=1.25)
    zoo["sos_small_cnn_s4"] = _member("sos", "small_cnn", 4)
    unsuitable = {
        "other_task": [
            ("chin", "small_cnn"), ("chin", "densenet_tiny"), ("chin", "convnext_attn_pico"),
            ("cvm", "small_cnn"), ("cvm", "resnet18"), ("cvm", "convnext_pico"),
            ("quality", "small_cnn"), ("quality", "densenet_tiny"),
        ],
        "shuffled": [("sos", "small_cnn"), ("sos", "resnet18"), ("sos", "convnext_attn_pico")],
        "inverted": [("sos", "small_cnn"), ("sos", "densenet_tiny"), ("sos", "convnext_pico")],
        "orientation": [("sos", "small_cnn"), ("sos", "resnet18")],
        "fov": [("sos", "small_cnn"), ("sos", "convnext_attn_pico")],
        "corrupted": [("sos", "small_cnn"), ("sos", "densenet_tiny")],
        "shortcut": [
            ("sos", "small_cnn"), ("sos", "densenet_tiny"), ("sos", "resnet18"),
            ("sos", "convnext_pico"), ("sos", "convnext_attn_pico"),
        ],
    }  # fmt: skip
    options = {
        "other_task": {},
        "shuffled": {"corrupt": "shuffle"},
        "inverted": {"corrupt": "invert"},
        "orientation": {"permute": True},
        "fov": {"fov": 2.0},
        "corrupted": {"corrupt": "heavy"},
        "shortcut": {"cue": "marker"},
    }
    for kind, members in unsuitable.items():
        for data, arch in members:
            prefix = data if kind == "other_task" else kind
            zoo[f"{prefix}_{arch}"] = _member(data, arch, 0, kind=kind, **options[kind])
    zoo["shortcut_offset_small_cnn"] = _member("sos", "small_cnn", 1, kind="shortcut", cue="offset")
    return zoo


#: the suitability zoo (issue 22): name -> spec
ZOO = _suitability_zoo()
#: Grad-CAM target of each architecture family at 32^3: the deepest stage that keeps >= 6 voxels per axis (8^3)
CAM_LAYER = {"small_cnn": "res4", "resnet": "layer2", "convnext": "stages.1", "densenet": "features.denseblock1"}
#: early feature layers (Method 2)
FEATURE_LAYERS = {
    "small_cnn": ("stem", "res2"),
    "resnet": ("layer1",),
    "convnext": ("stages.0",),
    "densenet": ("features.relu0",),
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


def cam_layer(arch: str, size: int = 32) -> str:
    """Grad-CAM target layer of an architecture (>= 6 voxels per axis from 24^3 up, 8^3 at 32^3)."""
    return CAM_LAYER[family(arch)]


#: hash of ``monai_gamverify/networks/nets.py`` as imported by this process (a changed definition retrains them)
_NETWORKS_SHA = hashlib.sha256(Path(gnets.__file__).read_bytes()).hexdigest()[:16]


def networks_sha() -> str:
    """Hash of ``monai_gamverify/networks/nets.py`` taken at import (the code this process trains)."""
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


def zoom_out(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Another field of view: the volume shrunk ``factor`` times and padded with air (0) back to its size."""
    size = x.shape[-1]
    inner = max(2, int(round(size / factor)))
    small = _resize(x, inner)
    lo = (size - inner) // 2
    out = torch.zeros_like(x)
    out[..., lo : lo + inner, lo : lo + inner, lo : lo + inner] = small
    return out


def load_cohort(
    data: str, n: int, size: int, seed: int, spacing: float = 1.0, cue: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 1, size^3) in [0, 1], y (n,) class) of a kind.

    ``spacing`` = f != 1 acquires the same field of view on a grid of ``size * f`` voxels (voxel size / f, another
    scanner resolution) and resamples it trilinearly to ``size``; ``quality`` is generated at >= 32^3 (its minimum)
    and its overall consensus score rounded to classes 0..4; ``cue`` burns a label-encoding cue into every volume.
    """
    gen_size = max(int(round(size * spacing)), 24)
    if data == "quality":
        gen_size = max(gen_size, 32)
    c = generate(data, n=n, size=gen_size, seed=seed, cue=cue)
    x = _resize(to_input(c.images), size)
    labels = np.asarray(c.labels)
    if data == "quality":
        labels = np.clip(np.rint(labels[:, -1]) - 1, 0, 4)
    return x, torch.as_tensor(labels.astype(np.int64))


def corrupt(x: torch.Tensor, y: torch.Tensor, how: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``shuffle``: labels permuted (seeded); ``invert``: contrast inverted; ``heavy``: strong blur, noise (sd 0.25)
    and intensity jitter (x0.5-1.5) on every volume (seeded); ``""``: unchanged."""
    g = torch.Generator().manual_seed(1000 + seed)
    if how == "shuffle":
        return x, y[torch.randperm(len(y), generator=g)]
    if how == "invert":
        return 1.0 - x, y
    if how == "heavy":
        blurred = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
        scale = 0.5 + torch.rand(len(x), 1, 1, 1, 1, generator=g)
        return (blurred * scale + 0.25 * torch.randn(x.shape, generator=g)).clamp(0, 1), y
    if how:
        raise ValueError(f"unknown corruption {how!r}")
    return x, y


def member_data(spec: dict, n: int, size: int, seed: int, n_test: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{"train"|"val"|"own_test": (x, y)}`` of a member's training distribution (own_test: a disjoint cohort,
    seed ``seed + 1000``, with the member's own corruption, cue, orientation and field of view)."""

    def shape(x: torch.Tensor) -> torch.Tensor:
        if spec["permute"]:
            x = x.permute(0, 1, 4, 2, 3).contiguous()
        if spec["fov"] != 1.0:
            x = zoom_out(x, spec["fov"])
        return x

    x, y = load_cohort(spec["data"], n, size, seed, spec["spacing"], spec["cue"])
    x, y = corrupt(shape(x), y, spec["corrupt"], seed)
    tr, va = split(y.numpy(), seed)
    xt, yt = load_cohort(spec["data"], n_test, size, seed + 1000, spec["spacing"], spec["cue"])
    own = corrupt(shape(xt), yt, spec["corrupt"], seed + 1)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "own_test": own}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Logits of ``x`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def spec_of(name: str) -> dict:
    """The spec of a zoo member (suitability or classic zoo)."""
    if name in ZOO:
        return dict(ZOO[name])
    if name in DATA_ARCH:
        data, arch, _ = DATA_ARCH[name]
        return _member(data, arch, aug="flip")
    raise KeyError(name)


def settings_of(name: str, epochs: int | None, args: argparse.Namespace) -> dict:
    spec = spec_of(name)
    default_epochs = DATA_ARCH[name][2] if name in DATA_ARCH else EPOCHS[spec["arch"]]
    s = {
        "name": name,
        **spec,
        "n_classes": N_CLASSES[spec["data"]],
        "epochs": int(epochs or default_epochs),
        "n": args.n,
        "n_test": args.n_test,
        "size": args.size,
        "seed": args.seed + spec["seed"],
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch": args.batch,
    }
    if spec["arch"].startswith("resnet"):
        s["widen_factor"] = RESNET_WIDEN
    if not spec["arch"].startswith(("resnet", "densenet")):
        s["networks_sha"] = networks_sha()
    return s


def bundle_augmentation(seed: int):
    """The sos_staging bundle's own training augmentation (``train#random_transforms`` of its train.json), seeded."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_TRAIN))
    transforms = Compose(ConfigParser({"t": parser.get("train#random_transforms")}).get_parsed_content("t"))
    transforms.set_random_state(seed)
    return transforms


def _augment(xb: torch.Tensor, aug: str, g: torch.Generator, transforms=None) -> torch.Tensor:
    if aug == "none":
        return xb
    if aug == "bundle":
        return torch.stack([torch.as_tensor(transforms({"image": v})["image"]) for v in xb]).float()
    flip = torch.rand(len(xb), generator=g) < 0.5  # classic zoo: random left-right flip per sample (axis x)
    return torch.where(flip.view(-1, 1, 1, 1, 1), xb.flip(2), xb)


def train_one(settings: dict, data: dict) -> tuple[nn.Module, dict]:
    """Train with the bundle's recipe; returns the best-validation model and its metrics (validation confidences:
    the maximum softmax probability and correctness of each validation image, for label-free accuracy estimates)."""
    torch.manual_seed(settings["seed"])
    g = torch.Generator().manual_seed(settings["seed"])
    transforms = bundle_augmentation(settings["seed"]) if settings.get("aug") == "bundle" else None
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
            xb = _augment(x_tr[idx], settings.get("aug", "flip"), g, transforms)
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
    probs = predict(model, x_va).softmax(1)
    val_conf = {
        "max_prob": [round(float(v), 6) for v in probs.max(1).values],
        "correct": [int(v) for v in (probs.argmax(1) == y_va)],
    }
    x_te, y_te = data["own_test"]
    own_acc = (predict(model, x_te).argmax(1) == y_te).float().mean().item()
    metrics = {"val_acc": best, "own_acc": own_acc, "seconds": seconds, "chance": 1.0 / settings["n_classes"]}
    return model, {**metrics, "val_conf": val_conf}


def ground_truth(info: dict) -> tuple[int, str]:
    """(label, reason): 1 suitable, 0 unsuitable, -1 in between (left out of scoring); see the module docstring."""
    chance = 1.0 / N_CLASSES["sos"]
    if info["data"] != "sos":
        return 0, f"other task ({info['data']})"
    acc = info["target_acc"]
    if info["kind"] == "shortcut":  # with its cue = on its own test cohort (marker or offset), without = the target
        cue_acc = info["own_acc"]
        if cue_acc >= chance + 0.5 and acc < chance + 0.3:
            return 0, f"shortcut: {cue_acc:.2f} with the cue, {acc:.2f} without"
        return -1, f"shortcut that did not collapse ({cue_acc:.2f} with the cue, {acc:.2f} without)"
    if info["kind"] == "shuffled":
        return 0, "label-shuffled training data"
    if acc >= chance + 0.3:
        return 1, f"target accuracy {acc:.2f} >= chance + 0.3"
    if acc <= chance + 0.15:
        why = "trained on SOS but did not learn it" if info["kind"] == "suitable" else info["kind"]
        return 0, f"target accuracy {acc:.2f} <= chance + 0.15 ({why})"
    return -1, f"target accuracy {acc:.2f} between chance + 0.15 and chance + 0.3 ({info['kind']})"


def target_cohorts(n_test: int, size: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The held-out SOS target cohort (seed ``seed + 1000``), clean and with the marker cue."""
    return {cue: load_cohort("sos", n_test, size, seed + 1000, cue=cue) for cue in ("none", "marker")}


def load_member(out: str | Path, name: str) -> tuple[nn.Module, dict]:
    """A trained zoo member (eval mode) and its JSON record."""
    out = Path(out)
    info = json.loads((out / f"{name}.json").read_text())
    info.setdefault("label", int(info["data"] == "sos" and not info.get("corrupt")))
    model = build_network(info["arch"], info["n_classes"])
    model.load_state_dict(torch.load(out / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval(), info


#: class names of each training kind, as the bundle would be trained with (``--class_names``)
CLASS_NAMES = {**{k: list(v) for k, v in _CLASS_NAMES.items()}, "quality": [f"overall_{i}" for i in range(1, 6)]}
#: the sos_staging bundle's ``network_name`` of each zoo architecture
BUNDLE_NETWORK = {a: a for a in ("small_cnn", "convnext_pico", "convnext_attn_pico", "densenet_tiny", "resnet18")}


def export_bundle(zoo: str | Path, name: str, out: str | Path) -> Path:
    """Write a zoo member as a sos_staging bundle (its configs, ``models/model.pt`` and a passport with the settings
    it was trained with and its validation confidences), as if trained with ``python -m monai.bundle run``."""
    import shutil

    from monai_gamverify.handlers.passport import write_passport

    info = json.loads((Path(zoo) / f"{name}.json").read_text())
    root = Path(out) / name
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(REPO / "bundles" / "sos_staging", root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    (root / "models").mkdir(exist_ok=True)
    shutil.copy2(Path(zoo) / f"{name}.pt", root / "models" / "model.pt")
    settings = {
        "network_name": BUNDLE_NETWORK[info["arch"]],
        "num_classes": info["n_classes"],
        "class_names": CLASS_NAMES[info["data"]],
        "hu_window": list(HU_WINDOW),
        "roi_size": [info["size"]] * 3,
    }
    if info["arch"].startswith("resnet"):
        settings["resnet_widen_factor"] = RESNET_WIDEN
    write_passport(root, settings, info["cam_layer"], info["feature_layers"], info.get("val_conf"))
    return root


def zoo_names(zoo: str) -> list[str]:
    """Member names of ``"suitability"`` or ``"classic"``."""
    if zoo not in ("suitability", "classic"):
        raise ValueError(f"zoo must be 'suitability' or 'classic', got {zoo!r}")
    return list(ZOO if zoo == "suitability" else DATA_ARCH)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="suitability", choices=("suitability", "classic"))
    p.add_argument("--nets", default=None, help="comma-separated zoo members (default: the whole zoo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every member (default: per architecture)")
    p.add_argument("--n", type=int, default=200, help="training + validation volumes per model")
    p.add_argument("--n-test", type=int, default=100, help="volumes of the target and own-test cohorts")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="added to every member's seed (another zoo: another seed)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-min", type=float, default=90.0, help="stop starting new models after this many minutes")
    p.add_argument("--out", default="runs/zoo_suit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    members = zoo_names(args.zoo)
    names = members if args.nets is None else [s.strip() for s in args.nets.split(",") if s.strip()]
    unknown = [s for s in names if s not in members]
    if unknown:
        raise SystemExit(f"unknown zoo member(s) {unknown}; choose from {members}")
    names = [s for s in members if s in names]
    # cheap architectures first, so that a spent budget leaves whole kinds of every label rather than none
    names.sort(key=lambda s: list(EPOCHS).index(spec_of(s)["arch"]) if spec_of(s)["arch"] in EPOCHS else 0)
    targets = target_cohorts(args.n_test, args.size, args.seed)
    cache: dict[tuple, dict] = {}
    rows = []
    t_all = time.perf_counter()
    for k, name in enumerate(names):
        settings = settings_of(name, args.epochs, args)
        record = out / f"{name}.json"
        if record.is_file() and (out / f"{name}.pt").is_file():
            old = json.loads(record.read_text())
            if old.get("settings") == settings:
                rows.append(old)
                continue
        elapsed = (time.perf_counter() - t_all) / 60
        if elapsed > args.budget_min:
            print(f"time budget of {args.budget_min:.0f} min spent: {len(names) - k} model(s) left; rerun to resume")
            break
        spec = spec_of(name)
        key = tuple(spec[k] for k in ("data", "spacing", "corrupt", "cue", "fov", "permute"))
        if key not in cache:
            cache.clear()  # one training distribution in memory at a time (the zoo is ordered by architecture)
            cache[key] = member_data(spec, args.n, args.size, settings["seed"] - spec["seed"], args.n_test)
        model, metrics = train_one(settings, cache[key])
        info = {**settings, **metrics, "cam_layer": cam_layer(spec["arch"]), "settings": settings}
        info["feature_layers"] = list(FEATURE_LAYERS[family(spec["arch"])])
        if spec["data"] == "sos":
            for cue, field in (("none", "target_acc"), ("marker", "cue_acc")):
                x, y = targets[cue]
                info[field] = (predict(model, x).argmax(1) == y).float().mean().item()
        info["label"], info["ground_truth"] = ground_truth(info)
        with atomic_path(out / f"{name}.pt") as tmp:
            torch.save(model.state_dict(), tmp)
        write_json(info, record)
        rows.append(info)
        spent = (time.perf_counter() - t_all) / 60
        target_acc, cue_acc = info.get("target_acc", float("nan")), info.get("cue_acc", float("nan"))
        print(
            f"[{k + 1}/{len(names)}] {name}: own {metrics['own_acc']:.2f}, target {target_acc:.2f}, cue {cue_acc:.2f}"
            f" -> label {info['label']} ({info['ground_truth']}); {metrics['seconds']:.0f} s; "
            f"{spent:.1f} of {args.budget_min:.0f} min budget spent; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    print(f"\n| model | kind | arch | own acc | target acc | cue acc | label | s |\n|{'---|' * 8}")
    for r in rows:
        print(
            f"| {r['name']} | {r.get('kind', r['data'])} | {r['arch']} | {r.get('own_acc', float('nan')):.2f} | "
            f"{r.get('target_acc', float('nan')):.2f} | {r.get('cue_acc', float('nan')):.2f} | {r['label']} | "
            f"{r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
