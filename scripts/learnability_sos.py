"""Learnability of the synthetic SOS cohort: a tiny 3D CNN trained for a few minutes on CPU stages the
spheno-occipital synchondrosis (5 classes), and its Grad-CAM maximum should fall inside the synchondrosis mask.

Run: ``python scripts/learnability_sos.py --n-train 400 --n-test 100 --size 32 --epochs 12``
Prints test accuracy, confusion matrix and the pointing-game hit rate (strict, and with 1-voxel tolerance).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from monai_gamverify import GradCAM
from monai_gamverify.synthetic import generate


def tiny_cnn(n_classes: int = 5, width: int = 8) -> nn.Module:
    """Four conv blocks (32^3 -> 16^3 -> 8^3), global average pooling, linear head."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())

    return nn.Sequential(
        nn.Sequential(block(1, width), nn.MaxPool3d(2)),  # 0
        block(width, 2 * width),  # 1 (1/2 resolution)
        block(2 * width, 2 * width),  # 2 (1/2 resolution): Grad-CAM target
        nn.Sequential(nn.MaxPool3d(2), block(2 * width, 4 * width)),  # 3 (1/4)
        block(4 * width, 4 * width),  # 4 (1/4)
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4 * width, n_classes),
    )


def to_input(hu: np.ndarray) -> torch.Tensor:
    """HU -> network input: clip to [-1000, 2000] and scale to about [-1, 2]."""
    return torch.from_numpy(np.clip(hu, -1000, 2000) / 1000.0).float().unsqueeze(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train = generate("sos", n=args.n_train, size=args.size, seed=args.seed)
    test = generate("sos", n=args.n_test, size=args.size, seed=args.seed + 1000)  # disjoint subjects
    print(f"generated {args.n_train}+{args.n_test} SOS volumes of {args.size}^3 in {time.perf_counter() - t0:.1f} s")
    x_tr, y_tr = to_input(train.images), torch.as_tensor(train.labels)
    x_te, y_te = to_input(test.images), torch.as_tensor(test.labels)

    model = tiny_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * int(np.ceil(len(x_tr) / args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(args.seed)
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            xb = x_tr[idx]
            # random flips along left-right (anatomically symmetric) as the only augmentation
            if torch.rand(1, generator=g).item() < 0.5:
                xb = xb.flip(2)
            opt.zero_grad()
            loss = loss_fn(model(xb), y_tr[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        elapsed = time.perf_counter() - t1
        print(f"epoch {epoch + 1:2d}  loss {total / len(x_tr):.3f}  test acc {acc:.3f}  ({elapsed:.0f} s)")
    model.eval()
    with torch.no_grad():
        pred = model(x_te).argmax(1)
    acc = (pred == y_te).float().mean().item()
    cm = np.zeros((5, 5), int)
    np.add.at(cm, (y_te.numpy(), pred.numpy()), 1)
    print(f"TEST ACCURACY (5 stages, n={len(y_te)}): {acc:.3f}  (chance 0.200)")
    print("confusion (rows true stage 1..5, cols predicted):\n" + "\n".join(" ".join(f"{v:3d}" for v in r) for r in cm))

    # pointing game: is the Grad-CAM maximum inside the synchondrosis mask?
    results = {}
    for layer in ("2", "4"):
        cam = GradCAM(model, target_layers=layer)
        maps = torch.cat([cam(x_te[i : i + 20], class_idx=y_te[i : i + 20]) for i in range(0, len(x_te), 20)])
        maps = maps[:, 0].numpy()
        hit, hit_tol = [], []
        for m, mask in zip(maps, test.masks):
            peak = np.unravel_index(np.argmax(m), m.shape)
            hit.append(bool(mask[peak]))
            hit_tol.append(bool(ndimage.binary_dilation(mask > 0, iterations=1)[peak]))
        # how much larger is the attention inside the mask than elsewhere (mean map ratio)
        ratio = np.mean([m[k > 0].mean() / (m[k == 0].mean() + 1e-8) for m, k in zip(maps, test.masks)])
        results[layer] = (np.mean(hit), np.mean(hit_tol), ratio)
        res = "1/2" if layer == "2" else "1/4"
        print(
            f"Grad-CAM layer {layer} ({res} resolution): pointing-game hit rate {np.mean(hit):.3f} strict, "
            f"{np.mean(hit_tol):.3f} within 1 voxel; mean map inside/outside mask {ratio:.2f}"
        )
    mask_frac = float(np.mean([(k > 0).mean() for k in test.masks]))
    print(f"(mask covers {100 * mask_frac:.2f} % of the volume: a random peak would hit with p = {mask_frac:.3f})")
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
