"""Learnability of the synthetic SOS cohort: a small 3D CNN trained for a few minutes on CPU stages the
spheno-occipital synchondrosis (5 classes), and its Grad-CAM maximum should fall inside the synchondrosis region.

Run: ``python scripts/learnability_sos.py --n-train 400 --n-test 100 --size 48 --epochs 12``

Prints test accuracy, the confusion matrix and, for Grad-CAM at 1/2, 1/4 and 1/8 of the input resolution, the
pointing-game hit rate (strict: the map maximum inside the synchondrosis region ``mask > 0``; and within
``--tolerance-mm`` of it) and the relevance mass (fraction of the map inside the region). The strict hit rate against
the plate alone (``mask == 1``) is printed for reference. Everything is seeded; on a loaded machine keep
``--threads 1`` (more threads than free cores makes PyTorch's CPU convolutions many times slower).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from monai_gamverify import GradCAM
from monai_gamverify.data.synthetic import generate
from monai_gamverify.metrics.evaluation import pointing_game, relevance_mass
from monai_gamverify.networks.nets import SmallCNN

#: Grad-CAM target layers of :func:`sos_cnn` and their resolution relative to the input
CAM_LAYERS = {"res2": "1/2", "res4": "1/4", "res8": "1/8"}


def sos_cnn(n_classes: int = 5, width: int = 8) -> nn.Module:
    """The package's small 3D BatchNorm CNN (``monai_gamverify.networks.nets.SmallCNN``), stages res2/res4/res8."""
    return SmallCNN(spatial_dims=3, in_channels=1, out_channels=n_classes, width=width)


def to_input(hu: np.ndarray) -> torch.Tensor:
    """HU -> network input: clip to [-1000, 2000] and scale to about [-1, 2]."""
    return torch.from_numpy(np.clip(hu, -1000, 2000) / 1000.0).float().unsqueeze(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--tolerance-mm", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    train = generate("sos", n=args.n_train, size=args.size, seed=args.seed)
    test = generate("sos", n=args.n_test, size=args.size, seed=args.seed + 1000)  # disjoint subjects
    spacing = test.spacing
    print(
        f"generated {args.n_train}+{args.n_test} SOS volumes of {args.size}^3 ({spacing[0]:.3f} mm) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    x_tr, y_tr = to_input(train.images), torch.as_tensor(np.array(train.labels))
    x_te, y_te = to_input(test.images), torch.as_tensor(np.array(test.labels))

    model = sos_cnn(width=args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * int(np.ceil(len(x_tr) / args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
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
        print(f"epoch {epoch + 1:2d}  loss {total / len(x_tr):.3f}  ({time.perf_counter() - t1:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_te[i : i + 20]).argmax(1) for i in range(0, len(x_te), 20)])
    acc = (pred == y_te).float().mean().item()
    cm = np.zeros((5, 5), int)
    np.add.at(cm, (y_te.numpy(), pred.numpy()), 1)
    print(f"TEST ACCURACY (5 stages, n={len(y_te)}): {acc:.3f}  (chance 0.200)")
    print("confusion (rows true stage 1..5, cols predicted):\n" + "\n".join(" ".join(f"{v:3d}" for v in r) for r in cm))

    # localisation of the Grad-CAM of the predicted class against the synchondrosis region (mask > 0)
    masks = torch.from_numpy(test.masks).unsqueeze(1)
    region, plate = masks > 0, masks == 1
    tol = args.tolerance_mm
    print("Grad-CAM of the predicted class; region = synchondrosis plate + subchondral bone plates (mask > 0)")
    for layer, res in CAM_LAYERS.items():
        cam = GradCAM(model, target_layers=layer)
        maps = torch.cat([cam(x_te[i : i + 20], class_idx=pred[i : i + 20]) for i in range(0, len(x_te), 20)])
        strict = pointing_game(maps, region, spacing=spacing).nanmean().item()
        within = pointing_game(maps, region, tolerance_mm=tol, spacing=spacing).nanmean().item()
        mass = relevance_mass(maps, region).nanmean().item()
        strict_plate = pointing_game(maps, plate, spacing=spacing).nanmean().item()
        print(
            f"  layer {layer} ({res}): POINTING GAME strict {strict:.2f}, within {tol:g} mm {within:.2f}; "
            f"relevance mass {mass:.3f}; (plate only: strict {strict_plate:.2f})"
        )
    frac_r, frac_p = region.float().mean().item(), plate.float().mean().item()
    print(f"(region covers {100 * frac_r:.2f} % of the volume, the plate {100 * frac_p:.2f} %: chance level of the")
    print(" strict pointing game and of the relevance mass of a uniform map)")
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
