"""K+1 garbage class on the synthetic SOS cohort: the study's report and rejection of garbage *not seen in training*.

1. Train a plain 5-stage SOS classifier (default ``small_cnn`` = :class:`monai_gamverify.networks.nets.SmallCNN`).
2. Widen it to 6 classes (:func:`~monai_gamverify.kplus1.widen_classifier`) and fine-tune on SOS + garbage
   (:func:`~monai_gamverify.kplus1.mix_garbage`, class-weighted cross-entropy from
   :func:`~monai_gamverify.kplus1.class_weights`), (a) with garbage = chin and (b) with garbage = cvm. Per-class
   precision / recall / F1 / support on held-out SOS + held-out garbage of the same type, and the 5-stage accuracy
   with and without the garbage class (study form).
3. With the chin-trained K+1 model and the plain 5-class model: AUROC and FPR at 95 % TPR (SOS test = positive,
   in-distribution) for garbage types not seen in training: cvm, head-and-neck quality volumes, pure noise, an empty
   (air) volume and a brain-MRI-like phantom; scores: K+1 (1 - p(garbage)), maximum softmax probability, energy and
   Mahalanobis distance on the penultimate features (post-hoc, plain model).

Every volume reaches the network as the bundle's preprocessing would deliver it: 1.25 mm voxels (cohorts with another
spacing are resampled trilinearly and centre-cropped/padded to ``--size``), HU window [-1000, 2000] -> [0, 1].
The brain-MRI-like phantom (no such kind in :mod:`monai_gamverify.data`) is made here: a whole head on the input
grid, ellipsoidal scalp (bright, fat-like), skull shell (dark cortical bone on T1), CSF rim, grey and white matter
and two lateral ventricles, at T1-like intensities 0-900 (arbitrary MRI units, fed unchanged into the CT window as a
clinic sending an MRI to a CBCT model would), with blur and noise; seeded per subject.

Run (default, ~5-10 min single-threaded on a shared 2-core machine):
    ``python scripts/experiment_garbage.py``
Everything is seeded (``--seed``); keep ``--threads 1`` on a loaded machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from torch import nn
from tqdm.auto import tqdm

from monai_gamverify.data.synthetic import generate
from monai_gamverify.kplus1 import (
    class_weights,
    mix_garbage,
    widen_classifier,
)
from monai_gamverify.metrics.ood import (
    MahalanobisDetector,
    energy_score,
    extract_features,
    kplus1_score,
    msp_score,
    ood_metrics,
)

__all__ = ["build_network", "to_input", "brain_phantom", "noise_volumes", "train", "predict_logits", "main"]

SOS_NAMES = ["stage1_open", "stage2", "stage3", "stage4", "stage5_fused"]
SPACING = 1.25  # mm, the bundle's pixdim
HU_WINDOW = (-1000.0, 2000.0)


def build_network(name: str, num_classes: int) -> nn.Module:
    """A 3D, 1-channel classifier by the sos_staging bundle's ``network_name``.

    Args:
        name: ``small_cnn``, ``convnext_pico``, ``convnext_attn_pico`` or ``resnet18``.
        num_classes: outputs.

    Returns:
        The network.

    Example:
        >>> build_network("small_cnn", 5)(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 5])
    """
    from monai.networks.nets import resnet18

    from monai_gamverify import networks

    builders = {
        "small_cnn": lambda: networks.SmallCNN(3, 1, num_classes),
        "convnext_pico": lambda: networks.convnext_pico(3, 1, num_classes, kernel_size=3),
        "convnext_attn_pico": lambda: networks.convnext_attn_pico(3, 1, num_classes, kernel_size=3),
        "resnet18": lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=num_classes),
    }
    if name not in builders:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(builders)}")
    return builders[name]()


def to_input(hu: np.ndarray, spacing: float = SPACING, size: int = 32) -> torch.Tensor:
    """(N, X, Y, Z) volumes of voxel size ``spacing`` -> (N, 1, size, size, size) network input at 1.25 mm in [0, 1].

    Resampled trilinearly to 1.25 mm (the bundle's ``Spacingd``), centre-cropped or padded with air to ``size``
    (``ResizeWithPadOrCropd``) and windowed (``ScaleIntensityRanged`` [-1000, 2000] HU -> [0, 1], clipped).

    Example:
        >>> to_input(np.full((2, 48, 48, 48), -1000.0), spacing=1.25).shape
        torch.Size([2, 1, 32, 32, 32])
    """
    x = torch.from_numpy(np.asarray(hu, np.float32)).unsqueeze(1)
    if abs(spacing - SPACING) > 1e-6:
        new = [int(round(s * spacing / SPACING)) for s in x.shape[2:]]
        x = F.interpolate(x, size=new, mode="trilinear", align_corners=False)
    x = (x.clamp(*HU_WINDOW) - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])
    out = torch.zeros(x.shape[0], 1, size, size, size)  # padding value 0 = air after windowing
    src, dst = [], []
    for n in x.shape[2:]:
        if n >= size:
            start = (n - size) // 2
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            start = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[(slice(None), slice(None), *dst)] = x[(slice(None), slice(None), *src)]
    return out


def brain_phantom(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Brain-MRI-like phantoms (T1-like arbitrary units 0-900), ``(n, size, size, size)`` float32.

    Whole head on the grid: scalp (~850, fat-bright), skull shell (~150), CSF rim (~250), grey matter (~520), white
    matter (~720), two lateral ventricles (~250); random size, position, rotation about z, Gaussian blur and noise.

    Example:
        >>> brain_phantom(2, 32, seed=0).shape
        (2, 32, 32, 32)
    """
    from scipy.ndimage import gaussian_filter

    c = (np.arange(size) - (size - 1) / 2) / (size / 2)
    gx, gy, gz = np.meshgrid(c, c, c, indexing="ij")
    out = np.zeros((n, size, size, size), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        a = rng.uniform(-0.25, 0.25)  # rotation about z (radians)
        cx, cy, cz = rng.uniform(-0.06, 0.06, 3)
        x = np.cos(a) * (gx - cx) - np.sin(a) * (gy - cy)
        y = np.sin(a) * (gx - cx) + np.cos(a) * (gy - cy)
        z = gz - cz
        r = np.array([0.72, 0.86, 0.74]) * rng.uniform(0.9, 1.05, 3)

        def ell(scale: float, shift=(0.0, 0.0, 0.0), radii=None, x=x, y=y, z=z, r=r) -> np.ndarray:
            rr = r * scale if radii is None else np.asarray(radii)
            return ((x - shift[0]) / rr[0]) ** 2 + ((y - shift[1]) / rr[1]) ** 2 + ((z - shift[2]) / rr[2]) ** 2 <= 1

        img = np.zeros_like(gx)
        img[ell(1.12)] = 850.0  # scalp / subcutaneous fat (bright on T1)
        img[ell(1.06)] = 150.0  # skull (dark cortical bone)
        img[ell(1.0)] = 250.0  # CSF
        img[ell(0.95)] = 520.0  # grey matter
        wm = ell(0.8) & (rng.normal(0, 1, gx.shape) > -1.5)  # white matter, slightly ragged border
        img[wm] = 720.0
        h = rng.uniform(0.1, 0.16)
        vr = [0.1 * rng.uniform(0.8, 1.3), 0.3 * rng.uniform(0.8, 1.2), 0.14]
        img[ell(0, (h, 0.0, 0.08), vr) | ell(0, (-h, 0.0, 0.08), vr)] = 250.0  # lateral ventricles
        img = gaussian_filter(img, rng.uniform(0.5, 1.0)) + rng.normal(0, rng.uniform(10, 30), img.shape)
        out[i] = np.clip(img, 0, None)
    return out


def noise_volumes(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Pure white Gaussian noise in HU (mean ~U(-500, 1000), sd ~U(100, 800) per volume), ``(n, size, size, size)``.

    Example:
        >>> noise_volumes(3, 16, seed=0).shape
        (3, 16, 16, 16)
    """
    out = np.zeros((n, size, size, size), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, 11, i])
        out[i] = rng.normal(rng.uniform(-500, 1000), rng.uniform(100, 800), (size,) * 3)
    return out


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    weight: torch.Tensor | None = None,
    desc: str = "train",
) -> nn.Module:
    """AdamW + one-cycle, left-right flips, (weighted) cross-entropy; seeded.

    Args:
        model: the network (trained in place).
        x: (N, 1, D, H, W) inputs.
        y: (N,) labels.
        epochs: epochs.
        lr: peak learning rate.
        batch: batch size.
        seed: seed of the shuffles and flips.
        weight: class weights of the loss.
        desc: progress-bar label.

    Returns:
        ``model``.

    Example:
        >>> net = build_network("small_cnn", 2)
        >>> train(net, torch.rand(4, 1, 16, 16, 16), torch.tensor([0, 1, 0, 1]), epochs=1, lr=1e-3, batch=2, seed=0)
    """
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, disable=None)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            xb = x[idx].flip(2) if torch.rand(1, generator=g).item() < 0.5 else x[idx]
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.3f}")
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"  {desc} epoch {epoch + 1:3d}  loss {total / len(x):.3f}  ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, chunk: int = 20) -> torch.Tensor:
    """Eval-mode logits in chunks.

    Example:
        >>> predict_logits(build_network("small_cnn", 5), torch.zeros(3, 1, 16, 16, 16)).shape
        torch.Size([3, 5])
    """
    model.eval()
    return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def _mixed_training_set(
    x_real: torch.Tensor, y_real: torch.Tensor, garbage: dict[str, torch.Tensor], ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SOS + garbage with :func:`mix_garbage` (items index the tensors): inputs and labels (garbage = 5)."""
    real = [{"image": ("real", i), "label": int(v)} for i, v in enumerate(y_real)]
    sources = {name: [{"image": (name, j)} for j in range(len(t))] for name, t in garbage.items()}
    mixed = mix_garbage(real, sources, num_classes=5, ratio=ratio, seed=seed)
    pools = {"real": x_real, **garbage}
    x = torch.stack([pools[d["image"][0]][d["image"][1]] for d in mixed])
    return x, torch.tensor([d["label"] for d in mixed])


def _report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> str:
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(len(names)), zero_division=0)
    lines = [f"  {'class':<14}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}"]
    for k, name in enumerate(names):
        lines.append(f"  {name:<14}{p[k]:>10.2f}{r[k]:>8.2f}{f[k]:>8.2f}{s[k]:>9d}")
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    lines.append(f"  {'macro avg':<14}{mp:>10.2f}{mr:>8.2f}{mf:>8.2f}{len(y_true):>9d}")
    lines.append(f"  {'accuracy':<14}{'':>10}{'':>8}{np.mean(y_true == y_pred):>8.2f}{len(y_true):>9d}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="small_cnn", help="small_cnn | convnext_pico | convnext_attn_pico | resnet18")
    p.add_argument("--n-train", type=int, default=140, help="SOS training volumes")
    p.add_argument("--n-test", type=int, default=60, help="SOS test volumes (disjoint seed)")
    p.add_argument("--n-garbage", type=int, default=40, help="garbage training volumes per type")
    p.add_argument("--n-ood", type=int, default=30, help="test volumes per garbage / unseen type")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=40, help="epochs of the plain 5-class model")
    p.add_argument("--kp1-epochs", type=int, default=20, help="fine-tuning epochs of the widened K+1 model")
    p.add_argument("--garbage-ratio", type=float, default=0.3, help="garbage items per SOS training item")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kp1-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    s, seed, test_seed = args.size, args.seed, args.seed + 1000

    # ------------------------------------------------------------------ data (all at 1.25 mm, size^3)
    sos_tr, sos_te = generate("sos", args.n_train, s, seed), generate("sos", args.n_test, s, test_seed)
    x_tr, y_tr = to_input(sos_tr.images), torch.as_tensor(sos_tr.labels)
    x_te, y_te = to_input(sos_te.images), torch.as_tensor(sos_te.labels)
    s_cvm = int(round(s * 60.0 / 40.0))  # cvm FOV 60 mm -> 1.25 mm voxels
    garbage_tr = {
        "chin": to_input(generate("chin", args.n_garbage, s, seed).images),
        "cvm": to_input(generate("cvm", args.n_garbage, s_cvm, seed).images),
    }
    garbage_te = {
        "chin": to_input(generate("chin", args.n_ood, s, test_seed).images),
        "cvm": to_input(generate("cvm", args.n_ood, s_cvm, test_seed).images),
    }
    s_q = max(32, 2 * s)
    quality = generate("quality", args.n_ood, s_q, test_seed)
    unseen = {
        "cvm": garbage_te["cvm"],
        "quality (H&N)": to_input(quality.images, spacing=quality.spacing[0], size=s),
        "pure noise": to_input(noise_volumes(args.n_ood, s, test_seed)),
        "empty (air)": to_input(np.full((1, s, s, s), -1000.0, np.float32)),
        "brain MRI-like": to_input(brain_phantom(args.n_ood, s, test_seed)),
    }
    print(
        f"data: SOS {len(x_tr)} train / {len(x_te)} test, garbage {args.n_garbage} train + {args.n_ood} test per type,"
        f" {s}^3 at {SPACING} mm ({time.perf_counter() - t_start:.0f} s)"
    )

    # ------------------------------------------------------------------ plain 5-class model
    torch.manual_seed(seed)
    plain = train(build_network(args.network, 5), x_tr, y_tr, args.epochs, args.lr, args.batch, seed, desc="5-class")
    logits5 = predict_logits(plain, x_te)
    acc5 = (logits5.argmax(1) == y_te).float().mean().item()
    print(f"\nplain 5-class {args.network}: 5-stage test accuracy {acc5:.3f} (n={len(y_te)})")

    # ------------------------------------------------------------------ K+1 models (a) chin, (b) cvm
    names6 = [*SOS_NAMES, "garbage"]
    kp1: dict[str, nn.Module] = {}
    for tag, gname in (("a", "chin"), ("b", "cvm")):
        x_mix, y_mix = _mixed_training_set(x_tr, y_tr, {gname: garbage_tr[gname]}, args.garbage_ratio, seed)
        weight = class_weights(y_mix, 6)
        model = widen_classifier(plain, init="mean")
        train(model, x_mix, y_mix, args.kp1_epochs, args.kp1_lr, args.batch, seed + 1, weight, desc=f"K+1 {gname}")
        kp1[gname] = model
        x_eval = torch.cat([x_te, garbage_te[gname]])
        y_eval = torch.cat([y_te, torch.full((len(garbage_te[gname]),), 5)]).numpy()
        logits = predict_logits(model, x_eval)
        pred = logits.argmax(1).numpy()
        n = len(y_te)
        acc_with = float(np.mean(pred[:n] == y_eval[:n]))  # a stage predicted as garbage counts as an error
        best_real = logits[:n, :5].argmax(1).numpy()
        acc_real = float(np.mean(best_real == y_eval[:n]))
        sos_rejected = float(np.mean(pred[:n] == 5))
        print(f"\n({tag}) K+1 with garbage = {gname}: {int((y_mix == 5).sum())} garbage + {len(x_tr)} SOS training")
        print(f"  class weights {[round(v, 2) for v in weight.tolist()]}")
        print(f"  test: {n} SOS + {len(garbage_te[gname])} held-out {gname} (new subjects)")
        print(_report(y_eval, pred, names6))
        print(f"  5-stage accuracy without garbage class (plain model):           {acc5:.3f}")
        print(f"  5-stage accuracy with garbage class (6-way argmax):             {acc_with:.3f}")
        print(f"  5-stage accuracy with garbage class (argmax over the 5 stages): {acc_real:.3f}")
        print(f"  SOS test volumes rejected as garbage: {100 * sos_rejected:.1f} %")

    # ------------------------------------------------------------------ (c) unseen garbage: K+1 (chin) vs post-hoc
    model = kp1["chin"]
    maha = MahalanobisDetector(layer=None).fit_model(
        plain, [(x_tr[i : i + 20], y_tr[i : i + 20]) for i in range(0, len(x_tr), 20)]
    )

    def scores(x: torch.Tensor) -> dict[str, np.ndarray]:
        lg5, lg6 = predict_logits(plain, x), predict_logits(model, x)
        feats = extract_features(plain, [x[i : i + 20] for i in range(0, len(x), 20)])[0]
        return {
            "K+1 (chin)": kplus1_score(lg6).numpy(),
            "MSP": msp_score(lg5).numpy(),
            "energy": energy_score(lg5).numpy(),
            "Mahalanobis": maha.score(feats).cpu().numpy(),
        }

    s_in = scores(x_te)
    methods = list(s_in)
    print("\n(c) garbage types not seen in training: K+1 model trained with chin vs post-hoc scores of the plain model")
    print(f"    in-distribution = {len(x_te)} SOS test volumes; AUROC (higher better) / FPR at 95 % TPR (lower better)")
    head = f"  {'OOD set':<16}{'n':>4}" + "".join(f"{m:>20}" for m in methods) + f"{'K+1 rejects':>13}"
    print(head)
    sets = {"chin (seen type)": garbage_te["chin"], **unseen}
    for name, x in sets.items():
        s_out = scores(x)
        cells = []
        for m in methods:
            r = ood_metrics(s_in[m], s_out[m], tpr=0.95)
            cells.append(f"{r['auroc']:.3f} / {r['fpr_at_tpr']:.2f}")
        rejected = float(np.mean(predict_logits(model, x).argmax(1).numpy() == 5))
        print(f"  {name:<16}{len(x):>4}" + "".join(f"{c:>20}" for c in cells) + f"{100 * rejected:>12.0f}%")
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
