"""In-distribution screen on the demo's SOS models: in-distribution vs near- and far-OOD, beside single baselines.

1. The demo's SOS cohort (``make_cohort("sos", n=100, size=32, seed=0)``, the cohort the shipped ``sos_ref`` and
   ``sos_kplus1`` weights were trained on) is written to ``OUT/data/sos``; a screen is fitted per model with
   :func:`monai_gamverify.screening.fit_screen` through the bundle's own preprocessing (``bundles/sos_staging``,
   ``network_name=small_cnn``): detectors on the ``training`` items (70), conformal calibration on images the
   models never saw, the ``validation`` items (15) plus ``--n_cal`` unseen SOS subjects (seed 2000).
2. In-distribution test: the cohort's ``test`` split (15) + fresh SOS subjects of another seed (``--n_fresh``).
3. Near-OOD (fresh seeds, never seen by any model): chin, cvm, head-and-neck quality volumes (160 mm field of view),
   SOS rotated 30 degrees, SOS at 1.0 mm voxels (the same 32^3 grid: 32 mm instead of 40 mm field of view).
   Far-OOD: pure white noise in HU, smooth noise (the demo's noise cohort recipe), constant volumes, SOS blurred
   (Gaussian, sigma 3 voxels), SOS anatomy in an MRI-like intensity range (HU mapped linearly to 0-800), a
   brain-MRI-like phantom (``scripts/experiment_garbage.py``), and every volume shipped in nibabel's test data
   (NIfTI, MGH, single DICOM slices, the two DICOM slices as one series directory) read from the installed package.
4. Scores, one convention each (higher = more OOD for the table's AUROC): the screen's combined statistic (hard
   failures = +inf), MSP and energy of ``sos_ref``, class-conditional Mahalanobis alone (``sos_ref`` penultimate),
   the K+1 garbage probability alone (``sos_kplus1``). AUROC and FPR at 95 % TPR of in-distribution test vs each
   source (:func:`monai_gamverify.metrics.ood.ood_metrics`), and the rejection rate at alpha: for the screen its own
   decision; for a single baseline the conformal p-value of its score against the same calibration images.
   A baseline cannot score an input the network cannot take (wrong dimensionality/channels, single slice, NaN):
   those are left out of its row (column ``n_scored``).

Run (about 9 min on one thread of a shared 2-core machine; docs/screening.md has the measured table):
    ``python scripts/experiment_screen.py --out screen_experiment --n_fresh 300``
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from scipy.ndimage import gaussian_filter

from monai_gamverify.apps.demo import MODELS, bundles_dir, demo_settings, shipped_weights
from monai_gamverify.apps.pipeline import PreprocessingError
from monai_gamverify.apps.screening import fit_screen, screen_engine, screen_record
from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.data.synthetic import generate, make_cohort
from monai_gamverify.io import write_csv
from monai_gamverify.metrics.ood import energy_score, msp_score, ood_metrics
from monai_gamverify.screening import DETECTORS, PENULTIMATE, FeatureRecorder, conformal_pvalues
from monai_gamverify.visualize.hooks import preserved_state

NEAR = ("chin", "cvm", "quality", "sos_rot30", "sos_1mm")
FAR = ("noise_white", "noise_smooth", "constant", "sos_blurred", "sos_mri_range", "brain_mri_phantom", "nibabel_real")
METHODS = ("screen_ref", "screen_kplus1", "msp", "energy", "mahalanobis", "kplus1")


def _experiment_garbage() -> object:
    """``scripts/experiment_garbage.py`` as a module (its brain phantom and noise recipes)."""
    path = Path(__file__).resolve().parent / "experiment_garbage.py"
    spec = importlib.util.spec_from_file_location("experiment_garbage", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mt(arr: np.ndarray, spacing: float, name: str) -> MetaTensor:
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -(np.asarray(arr.shape) - 1) / 2 * spacing
    img = MetaTensor(torch.as_tensor(np.asarray(arr, np.float32))[None], affine=torch.as_tensor(affine))
    img.meta["filename_or_obj"] = name
    return img


def _sources(size: int, n: int, n_fresh: int, data: Path, test_items: list) -> dict[str, list]:
    """source -> list of (name, raw channel-first MetaTensor or path)."""
    eg = _experiment_garbage()
    sp = 40.0 / size
    out: dict[str, list] = {"in_test": [(Path(e["image"]).name, e["image"]) for e in test_items]}
    fresh = generate("sos", n=n_fresh, size=size, seed=1000)
    out["in_fresh"] = [(f"sos_fresh_{i}", _mt(v, sp, f"sos_fresh_{i}")) for i, v in enumerate(fresh.images)]
    for kind, seed in (("chin", 101), ("cvm", 102), ("quality", 103)):
        c = generate(kind, n=n, size=size, seed=seed)
        out[kind] = [(f"{kind}_{i}", _mt(v, c.spacing[0], f"{kind}_{i}")) for i, v in enumerate(c.images)]
    rot = generate("sos", n=n, size=size, seed=104, rotate=30.0)
    out["sos_rot30"] = [(f"rot_{i}", _mt(v, sp, f"rot_{i}")) for i, v in enumerate(rot.images)]
    onemm = generate("sos", n=n, size=size, seed=105, spacing=1.0)
    out["sos_1mm"] = [(f"sos1mm_{i}", _mt(v, 1.0, f"sos1mm_{i}")) for i, v in enumerate(onemm.images)]
    out["noise_white"] = [
        (f"white_{i}", _mt(v, sp, f"white_{i}")) for i, v in enumerate(eg.noise_volumes(n, size, 106))
    ]
    smooth = []
    for i in range(n):
        rng = np.random.default_rng([107, i])
        vol = gaussian_filter(rng.standard_normal((size,) * 3), sigma=rng.uniform(0.5, 2.5))
        vol = (vol - vol.min()) / max(float(np.ptp(vol)), 1e-6) * 2500.0 - 1000.0
        smooth.append((f"smooth_{i}", _mt(vol, sp, f"smooth_{i}")))
    out["noise_smooth"] = smooth
    levels = np.linspace(-1000, 1500, 10)
    out["constant"] = [(f"const_{v:g}", _mt(np.full((size,) * 3, v), sp, f"const_{v:g}")) for v in levels]
    base = generate("sos", n=n, size=size, seed=108)
    out["sos_blurred"] = [
        (f"blur_{i}", _mt(gaussian_filter(v, 3.0), sp, f"blur_{i}")) for i, v in enumerate(base.images)
    ]
    out["sos_mri_range"] = [
        (f"mri_range_{i}", _mt((v + 1000.0) / 3000.0 * 800.0, sp, f"mri_range_{i}")) for i, v in enumerate(base.images)
    ]
    brain = eg.brain_phantom(n, size, seed=109)
    out["brain_mri_phantom"] = [(f"brain_{i}", _mt(v, 220.0 / size, f"brain_{i}")) for i, v in enumerate(brain)]
    import nibabel

    root = Path(nibabel.__file__).parent
    files = sorted(
        set(glob.glob(str(root / "tests" / "data" / "*.nii*")))
        | set(glob.glob(str(root / "tests" / "data" / "*.mgz")))
        | set(glob.glob(str(root / "nicom" / "tests" / "data" / "*.dcm")))
        | {str(root / "tests" / "data" / "0.dcm")}
    )
    series = data / "nibabel_dicom_series"
    series.mkdir(parents=True, exist_ok=True)
    for f in ("0.dcm", "1.dcm"):
        shutil.copy(root / "tests" / "data" / f, series / f)
    out["nibabel_real"] = [(str(Path(f).relative_to(root.parent)), f) for f in files] + [
        ("nibabel 0.dcm + 1.dcm as a series directory", str(series))
    ]
    return out


def _baseline_logits(
    net: torch.nn.Module, x: torch.Tensor | None, roi: list[int], head: str | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(logits, penultimate features) of one plain forward, or (None, None) when the network cannot take ``x``."""
    if x is None or tuple(x.shape[1:]) != tuple(roi) or x.shape[0] != 1 or not torch.isfinite(x).all():
        return None, None
    dev = next(net.parameters()).device
    with FeatureRecorder(net, (), head) as rec, preserved_state(net), torch.no_grad():
        lg = net(x[None].to(dev)).cpu().double().numpy()[0]
    feats = rec.activations.get(PENULTIMATE)
    return lg, None if feats is None else feats.reshape(1, -1).cpu().double().numpy()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="screen_experiment")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n", type=int, default=30, help="volumes per synthetic OOD source")
    ap.add_argument("--n_fresh", type=int, default=300, help="fresh in-distribution SOS test volumes")
    ap.add_argument("--n_cal", type=int, default=185, help="unseen SOS volumes added to the calibration set")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    settings = demo_settings()
    weights = shipped_weights(settings, seed=0)
    if weights is None:
        raise SystemExit("the shipped demo weights do not match the demo settings; run scripts/make_demo_weights.py")
    data = out / "data"
    make_cohort("sos", n=settings.n["sos"], size=args.size, seed=0, out_dir=data / "sos", progress=False)
    # unseen subjects of the same source for the conformal calibration (the models never saw them)
    make_cohort("sos", n=args.n_cal, size=args.size, seed=2000, out_dir=data / "sos_cal", progress=False)
    dl = data / "sos" / "datalist.json"
    test = load_datalist(dl, "test", check="exists")
    cal_paths = [e["image"] for e in load_datalist(dl, "validation", check="exists")]
    for split in ("training", "validation", "test"):
        cal_paths += [e["image"] for e in load_datalist(data / "sos_cal" / "datalist.json", split, check="exists")]
    models, screens = {}, {}
    for key, name in (("ref", "sos_ref"), ("kplus1", "sos_kplus1")):
        spec = MODELS[name]
        root = bundles_dir() / spec["bundle"]
        screens[key] = fit_screen(
            root,
            data / "sos",
            out / f"screen_{key}",
            spec["overrides"],
            args.alpha,
            checkpoint=weights[name],
            calibration_dirs=[data / "sos_cal"],
            seed=args.seed,
            device="cpu",
        )
        models[key] = load_bundle(root, checkpoint=weights[name], device="cpu", overrides=spec["overrides"])
    engines = {key: screen_engine(models[key], screens[key], "cpu") for key in models}  # read + preprocess + observe

    def pre_of(item):  # the bundle's preprocessing of a path or an image as read, by the engine
        return engines["ref"].load(item)[1]

    roi = list(models["ref"].parser.get_parsed_content("roi_size"))
    # calibration scores of the single baselines: the same calibration images as the screen of their model
    cal = {"msp": [], "energy": [], "kplus1": []}
    for i in screens["ref"].calibration_index_:
        lg, _ = _baseline_logits(models["ref"].network, pre_of(cal_paths[i]), roi)
        cal["msp"].append(-float(msp_score(torch.as_tensor(lg[None]))[0]))
        cal["energy"].append(-float(energy_score(torch.as_tensor(lg[None]))[0]))
    for i in screens["kplus1"].calibration_index_:
        lg, _ = _baseline_logits(models["kplus1"].network, pre_of(cal_paths[i]), roi)
        cal["kplus1"].append(float(torch.softmax(torch.as_tensor(lg), 0)[screens["kplus1"].garbage_index]))
    cal["mahalanobis"] = list(screens["ref"].cal_scores_[:, DETECTORS.index("maha_penultimate")])
    rows = []
    sources = _sources(args.size, args.n, args.n_fresh, data, test)
    for source, items in sources.items():
        for name, item in items:
            row: dict = {"source": source, "image": name}
            try:
                x = pre_of(item)
            except PreprocessingError as err:  # the baselines cannot score what the bundle's preprocessing refuses
                x = None
                if err.raw_image is None:  # not readable at all
                    row.update(error=str(err), screen_ref=np.inf, screen_kplus1=np.inf, screen_ref_reject=True)
                    row.update(screen_kplus1_reject=True, reasons=str(err))
                    rows.append(row)
                    continue
            except FileNotFoundError as err:
                row.update(error=str(err), screen_ref=np.inf, screen_kplus1=np.inf, screen_ref_reject=True)
                row.update(screen_kplus1_reject=True, reasons=str(err))
                rows.append(row)
                continue
            for key in ("ref", "kplus1"):
                bm, scr = models[key], screens[key]
                res = scr.score_observations([screen_record(engines[key], scr, item)])[0]
                stat = res["statistic"] if np.isfinite(res["statistic"]) else np.inf
                row[f"screen_{key}"] = stat
                row[f"screen_{key}_reject"] = not res["in_distribution"]
                row[f"screen_{key}_p"] = res["p_value"]
                if key == "ref":
                    row["reasons"] = "; ".join(res["reasons"])
                lg, feats = _baseline_logits(bm.network, x, roi, scr.head)
                if lg is None:
                    continue
                if key == "ref":
                    row["msp"] = -float(msp_score(torch.as_tensor(lg[None]))[0])
                    row["energy"] = -float(energy_score(torch.as_tensor(lg[None]))[0])
                    row["mahalanobis"] = float(scr.detectors_["maha_penultimate"].score(feats)[0])
                else:
                    row["kplus1"] = float(torch.softmax(torch.as_tensor(lg), 0)[scr.garbage_index])
            rows.append(row)
    df = pd.DataFrame(rows)
    for m in ("msp", "energy", "kplus1", "mahalanobis"):
        if m not in df:
            df[m] = np.nan
        p = conformal_pvalues(np.asarray(cal[m], float), df[m].to_numpy(float))
        df[f"{m}_reject"] = np.where(np.isnan(p), np.nan, p <= args.alpha)
    write_csv(df, out / "screen_experiment_images.csv")
    summary = _summarise(df)
    write_csv(summary, out / "screen_experiment_summary.csv")
    text = _markdown(summary, df, screens, args, time.time() - t0)
    (out / "screen_experiment.md").write_text(text)
    sys.stdout.write(text)
    return df


def _summarise(df: pd.DataFrame) -> pd.DataFrame:
    ind = df[df.source.isin(["in_test", "in_fresh"])]
    rows = []
    for source in [s for s in df.source.unique() if s not in ("in_test", "in_fresh")] + ["in-distribution"]:
        sub = ind if source == "in-distribution" else df[df.source == source]
        for m in METHODS:
            rej_col = f"{m}_reject"
            s_in = ind[m].to_numpy(float)
            s_out = sub[m].to_numpy(float)
            ok_in, ok_out = np.isfinite(s_in) | np.isposinf(s_in), ~np.isnan(s_out)
            rej = sub[rej_col].dropna().astype(float)
            row = {"source": source, "method": m, "n": len(sub), "n_scored": int(ok_out.sum())}
            row["reject_rate"] = float(rej.mean()) if len(rej) else np.nan
            if source != "in-distribution" and ok_out.any():
                big = 1e300  # hard failures (+inf) rank above every finite score
                met = ood_metrics(
                    np.clip(s_in[ok_in], -big, big), np.clip(s_out[ok_out], -big, big), higher_is_in=False
                )
                row.update(auroc=met["auroc"], fpr95=met["fpr_at_tpr"])
            rows.append(row)
    return pd.DataFrame(rows)


def _markdown(summary: pd.DataFrame, df: pd.DataFrame, screens: dict, args: argparse.Namespace, secs: float) -> str:
    lines = [
        f"size {args.size}^3, n = {args.n} per synthetic OOD source, {args.n_fresh} fresh + "
        f"{int((df.source == 'in_test').sum())} test in-distribution volumes, alpha = {args.alpha}, seed {args.seed}; "
        f"screen calibration images: {screens['ref'].n_cal_} (fit {screens['ref'].n_fit_}); {secs:.0f} s",
        "",
        "AUROC / FPR at 95 % TPR / rejected at alpha (n scored if not all)",
        "",
        "| source | " + " | ".join(METHODS) + " |",
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for source in summary.source.unique():
        cells = []
        for m in METHODS:
            r = summary[(summary.source == source) & (summary.method == m)].iloc[0]
            if source == "in-distribution":
                cells.append(f"FRR {r.reject_rate:.3f}" if np.isfinite(r.reject_rate) else "n/a")
                continue
            if r.n_scored == 0:
                cells.append("n/a")
                continue
            txt = f"{r.auroc:.3f} / {r.fpr95:.2f} / {r.reject_rate:.2f}"
            if r.n_scored < r.n:
                txt += f" ({r.n_scored}/{r.n})"
            cells.append(txt)
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    mean = summary[summary.source != "in-distribution"].groupby("method", sort=False)["auroc"].mean()
    lines.append("| **mean AUROC** | " + " | ".join(f"{mean.get(m, np.nan):.3f}" for m in METHODS) + " |")
    lines += ["", "nibabel files (screen of sos_ref):", ""]
    for _, r in df[df.source == "nibabel_real"].iterrows():
        verdict = "rejected" if r.screen_ref_reject else "accepted"
        lines.append(f"- `{r.image}`: {verdict} — {r.reasons}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
