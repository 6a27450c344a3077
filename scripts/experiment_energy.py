"""Attribution-energy experiment on the synthetic head-and-neck CBCT quality cohort (the study's table, replicated).

A 2D slice regressor (``monai_gamverify.networks.nets.SmallCNN(spatial_dims=2)``, the ``small_cnn`` option of the
``cbct_quality`` bundle) is trained on axial slices, each labelled with its volume's five consensus scores
(standardised with the training mean/std). On held-out volumes it is applied to every axial slice and the slice
predictions are averaged (``SliceAggregateInferer``); per-category MAE and Spearman rho of prediction vs consensus
say whether the model learned. Then the attribution energy (AE: sum of raw Grad-CAM over all axial slices, streamed,
one pass for the five outputs: ``cohort_energy``) of each test volume and category is analysed against the consensus
with ``energy_report`` (full-sample and leave-one-out Spearman, bootstrap interval, Holm, atypical cases, scatter
PNGs), for the first ``--n-small`` test volumes (16, as in the study) and for all ``--n-test``.

Also printed: the spread of the study's summary over disjoint 16-volume subsets of the test set, and controls on the
large test set -- AE vs the phantom's true (rater-noise-free) quality, vs the model's own prediction, vs the larynx
latent factor (drawn independently of the image: AE cannot track it) and vs permuted scores.

Run (default: 200 training + 100 test volumes of 48^3, 1 thread; about 5 min on a loaded 2-core machine)::

    python scripts/experiment_energy.py --out-dir out/energy_experiment

Everything is seeded (cohort, initialisation, slice sampling, bootstrap); ``--threads 1`` is advised on shared CPUs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from monai_gamverify.data.synthetic import QUALITY_CATEGORIES, generate
from monai_gamverify.energy import cohort_energy, energy_report, spearman_loo
from monai_gamverify.inferers import SliceAggregateInferer
from monai_gamverify.io import write_csv
from monai_gamverify.metrics.regression import regression_metrics
from monai_gamverify.networks.nets import SmallCNN
from monai_gamverify.visualize.cam import GradCAM

__all__ = ["to_input", "train_slice_regressor", "predict_volumes", "image_only_quality", "main"]

CATS = list(QUALITY_CATEGORIES)
HU_WINDOW = (-1000.0, 1500.0)  # the cbct_quality bundle's window


def to_input(hu: np.ndarray) -> torch.Tensor:
    """HU volumes (n, X, Y, Z) -> (n, 1, X, Y, Z) float32 in [0, 1] (the bundle's HU window [-1000, 1500]).

    Args:
        hu: HU volumes.

    Returns:
        Network input.

    Example:
        >>> to_input(np.full((1, 32, 32, 32), -1000.0)).max()
        tensor(0.)
    """
    lo, hi = HU_WINDOW
    return torch.from_numpy(np.clip((hu - lo) / (hi - lo), 0.0, 1.0)).float().unsqueeze(1)


def train_slice_regressor(
    x: torch.Tensor,
    y: np.ndarray,
    *,
    width: int,
    epochs: int,
    slices_per_volume: int,
    batch: int,
    lr: float,
    seed: int,
) -> tuple[nn.Module, list[float]]:
    """Train a 2D SmallCNN on random axial slices, each labelled with its volume's standardised scores.

    Args:
        x: (n, 1, X, Y, Z) volumes (axial = last axis).
        y: (n, K) standardised targets.
        width: SmallCNN width.
        epochs: passes; each takes ``slices_per_volume`` random axial slices of every volume.
        slices_per_volume: slices drawn per volume and epoch.
        batch: slices per step.
        lr: peak learning rate of the one-cycle schedule (AdamW).
        seed: initialisation and sampling seed.

    Returns:
        The trained model (eval mode) and the mean loss of each epoch.

    Example:
        >>> model, losses = train_slice_regressor(
        ...     x, y, width=8, epochs=2, slices_per_volume=4, batch=32, lr=3e-3, seed=0
        ... )
    """
    torch.manual_seed(seed)
    n, depth = x.shape[0], x.shape[-1]
    model = SmallCNN(spatial_dims=2, in_channels=1, out_channels=y.shape[1], width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = n * slices_per_volume
    steps = epochs * int(np.ceil(per_epoch / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.SmoothL1Loss(beta=0.5)
    yt = torch.as_tensor(y, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        vol = torch.arange(n).repeat_interleave(slices_per_volume)
        sl = torch.randint(0, depth, (per_epoch,), generator=g)
        perm = torch.randperm(per_epoch, generator=g)
        vol, sl = vol[perm], sl[perm]
        total = 0.0
        for i in range(0, per_epoch, batch):
            v, s = vol[i : i + batch], sl[i : i + batch]
            xb = x[v, :, :, :, s]  # (b, 1, X, Y): advanced indexing over (volume, slice) pairs
            flip = torch.rand(len(v), generator=g) < 0.5  # left-right flip (the phantom is symmetric)
            xb = torch.where(flip[:, None, None, None], xb.flip(2), xb)
            loss = loss_fn(model(xb), yt[v])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(v)
        losses.append(total / per_epoch)
        print(f"epoch {epoch + 1:2d}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval(), losses


@torch.no_grad()
def predict_volumes(model: nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Volume predictions: the 2D model on every axial slice, slice outputs averaged (``SliceAggregateInferer``).

    Args:
        model: 2D model in eval mode.
        x: (n, 1, X, Y, Z) volumes.
        batch: slices per forward.

    Returns:
        (n, K) predictions (in the model's output units).

    Example:
        >>> predict_volumes(model, x_test).shape
        (100, 5)
    """
    inferer = SliceAggregateInferer(spatial_dim=2, sw_batch_size=batch, reduction="mean")
    return torch.cat([inferer(x[i : i + 1], model) for i in range(len(x))]).numpy().astype(np.float64)


def image_only_quality(table: pd.DataFrame) -> pd.DataFrame:
    """The part of each true quality that the image carries: ``true_<cat>``, except for the larynx.

    The phantom rates the larynx from ``0.5 * image degradation + 0.5 * 1.4 * larynx_latent`` (see
    ``monai_gamverify.data.synthetic._quality_subject``); inverting ``true = 1 + 4 exp(-degr)`` and removing the latent
    term gives the larynx quality the image alone determines, ``1 + 4 exp(-image degradation)``.

    Args:
        table: the cohort table (``true_<cat>`` and ``larynx_latent`` columns).

    Returns:
        DataFrame with one column per category.

    Example:
        >>> image_only_quality(generate("quality", n=4, size=32).table).columns.tolist()
        ['parotid', 'submandibular', 'larynx', 'mandible', 'overall']
    """
    out = pd.DataFrame({c: table[f"true_{c}"].to_numpy(np.float64) for c in CATS})
    degr = -np.log(np.clip((out["larynx"] - 1.0) / 4.0, 1e-12, None))
    out["larynx"] = 1.0 + 4.0 * np.exp(-2.0 * (degr - 0.7 * table["larynx_latent"].to_numpy(np.float64)))
    return out


def _fmt_table(rows: list[dict], title: str) -> str:
    df = pd.DataFrame(rows)
    out = pd.DataFrame(
        {
            "category": df["category"],
            "n": df["n"],
            "rho": df["rho"].map("{:+.2f}".format),
            "p": df["p"].map("{:.2g}".format),
            "medLOO_rho": df["median_loo_rho"].map("{:+.2f}".format),
            "medLOO_p": df["median_loo_p"].map("{:.2g}".format),
            "LOO_range": [f"[{a:+.2f}, {b:+.2f}]" for a, b in zip(df["min_loo_rho"], df["max_loo_rho"])],
            "95%_CI": [f"[{a:+.2f}, {b:+.2f}]" for a, b in zip(df["ci_low"], df["ci_high"])],
            "p_Holm": df["p_holm"].map("{:.2g}".format),
            "sig": df["significant_holm"].map({True: "yes", False: "no"}),
        }
    )
    return f"{title}\n{out.to_string(index=False)}"


def _spearman(a: np.ndarray, b: np.ndarray) -> str:
    if np.ptp(np.asarray(a)) == 0:
        return "n/a (AE constant)"
    r = stats.spearmanr(a, b)
    return f"{float(r.statistic):+.2f} (p {float(r.pvalue):.2g})"


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment (see the module docstring); returns the tables and metrics."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-small", type=int, default=16, help="test volumes per category of the study's table")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--slices-per-volume", type=int, default=16, help="random axial slices per volume and epoch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--layers", default="res4,res8", help="Grad-CAM target layer(s), comma-separated; first = main")
    p.add_argument("--ae-batch", type=int, default=16, help="slices per CAM call (x5 outputs)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="out/energy_experiment")
    args = p.parse_args(argv)
    if args.n_small < 4 or args.n_test < args.n_small:
        raise SystemExit(f"need 4 <= --n-small <= --n-test, got {args.n_small} and {args.n_test}")
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    out = Path(args.out_dir)
    t_start = time.perf_counter()

    # one cohort (one set of raters), split by subject index: training = first n_train, test = the rest
    cohort = generate("quality", n=args.n_train + args.n_test, size=args.size, seed=args.seed, progress=True)
    table = cohort.table
    ids = table["id"].tolist()
    x = to_input(cohort.images)
    del cohort
    tr, te = slice(0, args.n_train), slice(args.n_train, args.n_train + args.n_test)
    y = table[[f"consensus_{c}" for c in CATS]].to_numpy(np.float64)
    mu, sd = y[tr].mean(0), y[tr].std(0)
    print(
        f"generated {args.n_train} training + {args.n_test} test quality volumes of {args.size}^3 "
        f"in {time.perf_counter() - t_start:.0f} s; training consensus mean {np.round(mu, 2).tolist()}, "
        f"std {np.round(sd, 2).tolist()}"
    )

    model, _ = train_slice_regressor(
        x[tr],
        (y[tr] - mu) / sd,
        width=args.width,
        epochs=args.epochs,
        slices_per_volume=args.slices_per_volume,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
    )
    t_train = time.perf_counter()
    pred_std = predict_volumes(model, x[te])
    pred = pred_std * sd + mu
    reg = regression_metrics(pred, y[te], CATS)
    reg["mae_constant"] = np.abs(y[te] - mu).mean(0)  # predicting the training mean: the no-learning baseline
    img_q = image_only_quality(table.iloc[te])
    reg["spearman_vs_true"] = [
        float(stats.spearmanr(pred[:, j], table[f"true_{c}"].to_numpy()[te]).statistic) for j, c in enumerate(CATS)
    ]
    # ceilings: how well the noise-free truth, and the part of it the image carries, rank the consensus
    reg["ceiling_true"] = [
        float(stats.spearmanr(table[f"true_{c}"].to_numpy()[te], y[te, j]).statistic) for j, c in enumerate(CATS)
    ]
    reg["ceiling_image"] = [float(stats.spearmanr(img_q[c], y[te, j]).statistic) for j, c in enumerate(CATS)]
    print(f"\nmodel on the {args.n_test} test volumes (all axial slices, mean), trained in {t_train - t_start:.0f} s:")
    print(reg.drop(columns=["rmse", "bias"]).round(3).to_string(index=False))
    print(
        "(mae_constant: MAE of predicting the training mean; spearman_vs_true: vs the rater-noise-free quality; "
        "ceiling_true / ceiling_image: Spearman of the true / image-only quality with the consensus)"
    )
    write_csv(reg, out / "regression_metrics.csv", float_format="%.6g")

    test_ids = ids[te]
    scores = pd.DataFrame({"id": test_ids, **{c: y[te, j] for j, c in enumerate(CATS)}})
    s_csv = write_csv(scores, out / "consensus.csv", float_format="%.6g")
    results: dict = {"regression": reg, "layers": {}}
    columns = {c: j for j, c in enumerate(CATS)}
    for layer in [s.strip() for s in args.layers.split(",") if s.strip()]:
        t0 = time.perf_counter()
        cam = GradCAM(model, target_layers=layer)
        vols = ((vid, x[i]) for vid, i in zip(test_ids, range(te.start, te.stop)))
        ae = cohort_energy(
            cam,
            tqdm(vols, total=args.n_test, desc=f"AE {layer}"),
            columns,
            slice_axis=2,
            batch_size=args.ae_batch,
            progress=False,
        )
        print(
            f"\n=== Grad-CAM layer {layer}: AE of {args.n_test} volumes x 5 outputs in {time.perf_counter() - t0:.0f} s"
        )
        ldir = out / layer
        tabs = {}
        for n in (args.n_small, args.n_test):
            e_csv = write_csv(ae.iloc[:n], ldir / f"energy_n{n}.csv", float_format="%.10g")
            usable = [c for c in CATS if np.ptp(ae[c].to_numpy()[:n]) > 0]  # all-zero AE: rho undefined
            if len(usable) < len(CATS):
                print(f"n = {n}: AE is constant (all raw maps zero) for {sorted(set(CATS) - set(usable))}; left out")
            if not usable:
                continue
            rep = energy_report(
                e_csv, s_csv, ldir / f"n{n}", categories=usable, n_boot=args.n_boot, seed=args.seed, progress=False
            )
            tabs[n] = rep["table"]
            study = f"  (as the study: first {n} test volumes)" if n == args.n_small else ""
            print(_fmt_table(rep["table"], f"\nAE vs consensus, n = {n}{study}"))
            atyp = pd.read_csv(rep["paths"]["atypical_csv"])
            flagged = atyp[atyp["flag"]]
            print(f"atypical AE (Theil-Sen residual outside Tukey k=1.5), n = {n}: {len(flagged)} flag(s)")
            for r in flagged.itertuples():
                print(f"  {r.category:<14} {r.id}  score {r.score:.2f}  AE {r.energy:.4g}  ({r.direction})")
        # spread of the study's summary over disjoint n_small-volume subsets
        k = args.n_test // args.n_small
        sub = []
        for j in range(k):
            part = slice(j * args.n_small, (j + 1) * args.n_small)
            for i, c in enumerate(CATS):
                try:
                    r = spearman_loo(ae[c].to_numpy()[part], y[te, i][part], n_boot=0)
                except ValueError:  # constant AE (or scores) in this subset: no rho
                    continue
                sub.append({"subset": j, "category": c, "median_loo_rho": r.median_rho, "median_loo_p": r.median_p})
        sub = pd.DataFrame(sub, columns=["subset", "category", "median_loo_rho", "median_loo_p"])
        spread = sub.groupby("category", sort=False).agg(
            medLOO_rho_min=("median_loo_rho", "min"),
            medLOO_rho_median=("median_loo_rho", "median"),
            medLOO_rho_max=("median_loo_rho", "max"),
            n_medLOO_p_below_05=("median_loo_p", lambda v: int((v < 0.05).sum())),
        )
        print(f"\nmedian LOO rho over {k} disjoint subsets of {args.n_small} test volumes (the study's n):")
        print(spread.round(2).to_string())
        # controls on all test volumes
        true = table.iloc[te]
        perm = np.random.default_rng(args.seed).permutation(args.n_test)
        ctrl = pd.DataFrame(
            {
                "category": CATS,
                "AE~consensus": [_spearman(ae[c], y[te, j]) for j, c in enumerate(CATS)],
                "AE~true": [_spearman(ae[c], true[f"true_{c}"]) for c in CATS],
                "AE~image_only": [_spearman(ae[c], img_q[c]) for c in CATS],
                "AE~prediction": [_spearman(ae[c], pred[:, j]) for j, c in enumerate(CATS)],
                "AE~larynx_latent": [_spearman(ae[c], true["larynx_latent"]) for c in CATS],
                "AE~permuted": [_spearman(ae[c], y[te, j][perm]) for j, c in enumerate(CATS)],
            }
        )
        print(f"\ncontrols, n = {args.n_test} (Spearman rho, p):")
        print(ctrl.to_string(index=False))
        write_csv(sub, ldir / "subsets.csv", float_format="%.6g")
        write_csv(ctrl, ldir / "controls.csv")
        results["layers"][layer] = {"tables": tabs, "subsets": spread, "controls": ctrl}
    print(f"\noutputs in {out}; total time {time.perf_counter() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
