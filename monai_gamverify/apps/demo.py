"""``gamverify demo``: the whole package on synthetic data in a few CPU minutes, with one self-contained report.

Stages (each prints a line; long loops show tqdm bars):

1. **cohorts** — synthetic SOS (the task), chin and cervical-vertebrae volumes (other anatomy), head-and-neck
   image-quality volumes with simulated raters (:mod:`monai_gamverify.data.synthetic`), pure-noise volumes, and the
   mixed K+1 datalist (:func:`monai_gamverify.kplus1.mix_garbage`).
2. **models** — five ``small_cnn`` bundles: the SOS reference ``sos_ref``, a second SOS model ``sos_b`` (other seed,
   wider), a chin model ``chin`` (unsuitable for SOS), the K+1 SOS model ``sos_kplus1`` and the 2D image-quality
   regressor ``quality``. By default the weights shipped in ``monai_gamverify/apps/demo_weights`` (written by
   ``scripts/make_demo_weights.py --seed 0`` through the same bundle configs) are used when they match the cohort
   settings; otherwise, or with ``train=True``, every model is trained here through its bundle's
   ``configs/train.json`` (``monai.bundle.ConfigWorkflow`` with overrides).
3. **explanations** — Grad-CAM of the reference and the chin model on a few SOS test volumes: NIfTI maps, PNG
   overlays on three orthogonal slices, pointing game against the ground-truth mask, text descriptions
   (:mod:`monai_gamverify.visualize.text`).
4. **verification** — :func:`monai_gamverify.verification.verify_bundles`, Method 1 (Grad-CAM) and Method 2 (early
   feature maps): Random-Forest verifier, cross-validated metrics, ROC, reference map, per-label features.
5. **attribution energy** — AE of the quality model on the held-out quality volumes
   (:func:`monai_gamverify.energy.analysis.cohort_energy`) and its leave-one-out Spearman analysis
   (:func:`monai_gamverify.energy.analysis.energy_report`).
6. **garbage class** — rejections of the K+1 model on held-out SOS, chin, CVM and noise volumes
   (:class:`monai_gamverify.kplus1.RejectGarbaged`), against the post-hoc baselines (MSP, energy score).
7. **report** — ``report.html`` (:mod:`.report`), ``summary.json``, TensorBoard summary scalars and a
   short printed summary.

Example:
    >>> summary = run_demo("demo_out")          # or: gamverify demo --out demo_out
    >>> summary["report"]
    'demo_out/report.html'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from monai_gamverify.io import save_nifti, write_csv, write_json
from monai_gamverify.visualize.plots import overlay_png, save_figure

__all__ = [
    "DemoSettings",
    "demo_settings",
    "MODELS",
    "WEIGHTS_DIR",
    "bundles_dir",
    "prepare_cohorts",
    "train_models",
    "shipped_weights",
    "weights_config",
    "run_demo",
    "format_summary",
]

#: where ``scripts/make_demo_weights.py`` writes the shipped weights and their ``manifest.json``
WEIGHTS_DIR = Path(__file__).resolve().parent / "demo_weights"
_STAGES = 7
_SOS_NAMES = ["stage1_open", "stage2", "stage3", "stage4", "stage5_fused"]

#: the demo's models: bundle, training cohort, bundle config overrides (training and loading), seed offset
MODELS: dict[str, dict[str, Any]] = {
    "sos_ref": {"bundle": "sos_staging", "data": "sos", "overrides": {"network_name": "small_cnn"}, "seed": 0},
    "sos_b": {
        "bundle": "sos_staging",
        "data": "sos",
        "overrides": {"network_name": "small_cnn", "networks#small_cnn#width": 12},
        "seed": 1,
    },
    "chin": {
        "bundle": "sos_staging",
        "data": "chin",
        "overrides": {"network_name": "small_cnn", "num_classes": 2, "class_names": ["camouflage", "surgery"]},
        "seed": 2,
    },
    "sos_kplus1": {
        "bundle": "sos_staging",
        "data": "garbage",
        "overrides": {"network_name": "small_cnn", "num_classes": 6, "class_names": [*_SOS_NAMES, "garbage"]},
        "seed": 3,
    },
    "quality": {
        "bundle": "cbct_quality",
        "data": "quality",
        # pinned (not the bundle's defaults, which may move on): the shipped weights were trained with these
        "overrides": {"network_name": "small_cnn", "image_size": 32, "slices_per_volume": 16, "learning_rate": 0.003},
        "seed": 4,
    },
}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        size: edge of the SOS / chin / CVM volumes (voxels).
        quality_size: edge of the image-quality volumes (at least 32).
        n: subjects per cohort (``sos``, ``chin``, ``cvm``, ``quality``, ``noise``).
        epochs: training epochs per model (only used when training).
        val_interval: validation interval of the training runs (epochs).
        garbage_ratio: garbage training items per real item of the K+1 model.
        n_examples: SOS test volumes explained in stage 3.
        n_splits: verifier cross-validation folds.
        n_estimators: verifier trees.
        n_boot: bootstrap resamples of the AE analysis.
    """

    size: int = 32
    quality_size: int = 32
    n: dict[str, int] = field(default_factory=lambda: {"sos": 100, "chin": 60, "cvm": 40, "quality": 120, "noise": 10})
    epochs: dict[str, int] = field(
        default_factory=lambda: {"sos_ref": 30, "sos_b": 30, "chin": 20, "sos_kplus1": 30, "quality": 20}
    )
    val_interval: int = 2
    garbage_ratio: float = 0.5
    n_examples: int = 3
    n_splits: int = 5
    n_estimators: int = 200
    n_boot: int = 1000


def demo_settings(quick: bool = False) -> DemoSettings:
    """The full demo settings, or tiny ones (``quick``: 24³ volumes, a handful of subjects, 1 epoch) for tests.

    Example:
        >>> demo_settings(quick=True).epochs["sos_ref"]
        1
    """
    if not quick:
        return DemoSettings()
    return DemoSettings(
        size=24,
        quality_size=32,
        n={"sos": 20, "chin": 10, "cvm": 18, "quality": 14, "noise": 3},
        epochs=dict.fromkeys(MODELS, 1),
        val_interval=1,
        n_examples=1,
        n_splits=2,
        n_estimators=20,
        n_boot=50,
    )


def bundles_dir() -> Path:
    """The repository's ``bundles/`` folder (the demo trains and loads the bundles there), or ``$GAMVERIFY_BUNDLES``.

    Returns:
        The folder holding ``sos_staging``, ``cbct_quality``, ...

    Example:
        >>> (bundles_dir() / "sos_staging").is_dir()
        True

    Raises:
        FileNotFoundError: the package is not run from a source checkout (``pip install -e .``).
    """
    root = Path(os.environ.get("GAMVERIFY_BUNDLES", Path(__file__).resolve().parents[2] / "bundles"))
    if not (root / "sos_staging" / "configs" / "train.json").is_file():
        raise FileNotFoundError(
            f"bundles not found at {root}: run the demo from a source checkout (pip install -e .) "
            "or set GAMVERIFY_BUNDLES to the repository's bundles/ folder"
        )
    return root


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stage(i: int, text: str) -> float:
    tqdm.write(f"[{i}/{_STAGES}] {text}")
    return time.perf_counter()


# ------------------------------------------------------------------------------------------------------ 1 cohorts
def _cohort_seeds(seed: int) -> dict[str, int]:
    return {"sos": seed, "chin": seed + 1, "cvm": seed + 2, "quality": seed + 3, "noise": seed + 4}


def _noise_cohort(out: Path, n: int, size: int, seed: int) -> dict:
    """Smooth random volumes in the CBCT HU range (no anatomy at all), with a ``test`` datalist."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng([int(seed), 7])
    spacing = 40.0 / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    items = []
    for i in range(n):
        vol = gaussian_filter(rng.standard_normal((size,) * 3), sigma=rng.uniform(0.5, 2.5))
        vol = (vol - vol.min()) / max(float(np.ptp(vol)), 1e-6) * 2500.0 - 1000.0
        name = f"noise_{i:04d}"
        save_nifti(vol.astype(np.float32), out / "images" / f"{name}.nii.gz", reference=affine, dtype=np.int16)
        items.append({"image": f"images/{name}.nii.gz", "id": name})
    write_json({"test": items}, out / "datalist.json")
    return {"kind": "noise", "n": n, "size": size, "out_dir": str(out), "splits": {"test": n}}


def _garbage_datalist(data: Path, ratio: float, seed: int) -> dict:
    """K+1 datalist: SOS items (labels 0-4) plus chin and CVM items as garbage (label 5), per split."""
    from monai_gamverify.data.datalist import load_datalist
    from monai_gamverify.kplus1 import mix_garbage

    out = data / "garbage"
    out.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list] = {}
    for split in ("training", "validation", "test"):

        def items(kind: str, split: str = split) -> list[dict]:
            dl = data / kind / "datalist.json"
            return load_datalist(dl, split, check="exists", spatial_dims=None, allow_empty=kind != "sos")

        sources = {k: v for k in ("chin", "cvm") if (v := items(k))}  # tiny cohorts may leave a split empty
        real = items("sos")
        if sources:
            mixed = mix_garbage(real, sources, num_classes=5, ratio=ratio if split == "training" else None, seed=seed)
        else:
            mixed = [dict(e, source="real") for e in real]
        # the same keys in every item (batches are collated), relative paths (the demo folder can be moved)
        lists[split] = [
            {
                "image": os.path.relpath(e["image"], out),
                "label": int(e["label"]),
                "id": str(e.get("id", Path(e["image"]).name.split(".")[0])),
                "source": str(e["source"]),
            }
            for e in mixed
        ]
    write_json(lists, out / "datalist.json")
    labels = [int(e["label"]) for e in lists["training"]]
    return {"kind": "garbage", "out_dir": str(out), "splits": {k: len(v) for k, v in lists.items()}, "labels": labels}


def prepare_cohorts(data_dir: str | os.PathLike, settings: DemoSettings, seed: int = 0, progress: bool = True) -> dict:
    """Write the demo cohorts under ``data_dir``: ``sos``, ``chin``, ``cvm``, ``quality``, ``noise``, ``garbage``.

    Args:
        data_dir: output folder.
        settings: sizes (:func:`demo_settings`).
        seed: base seed (cohort ``k`` uses ``seed + k``).
        progress: progress bars.

    Returns:
        kind -> summary dict of :func:`monai_gamverify.data.synthetic.make_cohort`.

    Example:
        >>> prepare_cohorts("demo_out/data", demo_settings(quick=True))["sos"]["splits"]
    """
    from monai_gamverify.data.synthetic import make_cohort

    data = Path(data_dir)
    seeds = _cohort_seeds(seed)
    out: dict[str, Any] = {}
    for kind in ("sos", "chin", "cvm", "quality"):
        size = settings.quality_size if kind == "quality" else settings.size
        # quality: a larger test split for the AE analysis; cvm: 6 classes, so every split gets some of each
        fractions = {"quality": (0.6, 0.1, 0.3), "cvm": (0.5, 0.25, 0.25)}.get(kind, (0.7, 0.15, 0.15))
        if progress:
            tqdm.write(f"    {kind}: {settings.n[kind]} volumes of {size}³ (seed {seeds[kind]})")
        out[kind] = make_cohort(
            kind,
            n=settings.n[kind],
            size=size,
            seed=seeds[kind],
            out_dir=data / kind,
            fractions=fractions,
            progress=progress,
        )
    out["noise"] = _noise_cohort(data / "noise", settings.n["noise"], settings.size, seeds["noise"])
    out["garbage"] = _garbage_datalist(data, settings.garbage_ratio, seed)
    return out


# ------------------------------------------------------------------------------------------------------- 2 models
def weights_config(settings: DemoSettings, seed: int = 0) -> dict:
    """What shipped weights must have been trained with to be used by a run: cohorts, epochs, models, seed.

    Args:
        settings: the run's sizes.
        seed: the run's base seed.

    Returns:
        A JSON-able dict, stored as ``config`` in ``demo_weights/manifest.json``.

    Example:
        >>> weights_config(demo_settings(), 0)["epochs"]["sos_ref"]
        30
    """
    return {
        "seed": int(seed),
        "size": settings.size,
        "quality_size": settings.quality_size,
        "n": dict(settings.n),
        "epochs": dict(settings.epochs),
        "garbage_ratio": settings.garbage_ratio,
        "models": json.loads(json.dumps(MODELS)),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_weights(settings: DemoSettings, seed: int = 0, weights_dir: str | os.PathLike | None = None) -> dict | None:
    """The shipped checkpoints (name -> path) when their manifest matches these settings and seed, else ``None``.

    Every file's SHA-256 is checked against the manifest (a changed or truncated file is not used).

    Example:
        >>> shipped_weights(demo_settings(), seed=0)
        {'sos_ref': PosixPath('.../demo_weights/sos_ref.pt'), ...}
    """
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text())
    if meta.get("config") != weights_config(settings, seed):
        return None
    paths = {}
    for name in MODELS:
        entry = meta.get("models", {}).get(name, {})
        path = root / f"{name}.pt"
        if not path.is_file() or entry.get("sha256") != _sha256(path):
            return None
        paths[name] = path
    return paths


@contextlib.contextmanager
def _bundle_logs(path: Path) -> Iterator[Any]:
    """Send the console logs of a bundle run (StatsHandler, evaluators) to ``path``; yields a function that moves
    the stream handlers created so far (call it after the workflow is initialised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, mode="w")
    fh.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    moved: list[tuple[logging.Logger, list[logging.Handler]]] = []

    def move() -> None:
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if not isinstance(lg, logging.Logger) or name.startswith("torch") or fh in lg.handlers:
                continue
            streams = [h for h in lg.handlers if type(h) is logging.StreamHandler]
            if streams:
                for h in streams:
                    lg.removeHandler(h)
                lg.addHandler(fh)
                moved.append((lg, streams))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter of transforms; the run's own log keeps errors
            yield move
    finally:
        for lg, streams in moved:
            lg.removeHandler(fh)
            for h in streams:
                lg.addHandler(h)
        fh.close()


def _train_one(
    name: str,
    data: Path,
    models_dir: Path,
    tb_dir: Path,
    log_dir: Path,
    epochs: int,
    val_interval: int,
    seed: int,
    device: torch.device,
    progress: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    spec = MODELS[name]
    root = bundles_dir() / spec["bundle"]
    ckpt_dir = models_dir / name
    overrides = {
        "bundle_root": str(root),
        "dataset_dir": str(data / spec["data"]),
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(ckpt_dir / "eval"),
        "log_dir": str(tb_dir / f"train_{name}"),
        "num_epochs": int(epochs),
        "val_interval": int(val_interval),
        "seed": int(seed) + int(spec["seed"]),
        "device": f"$torch.device('{device}')",
        **spec["overrides"],
        **dict(extra or {}),
    }
    t0 = time.perf_counter()
    wf_logger = logging.getLogger("monai.bundle.workflows")  # says "Logging file is set to False" otherwise
    level = wf_logger.level
    with _bundle_logs(log_dir / f"train_{name}.log") as move_logs:
        wf_logger.setLevel(logging.ERROR)
        wf = ConfigWorkflow(
            config_file=str(root / "configs" / "train.json"),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            **overrides,
        )
        wf_logger.setLevel(level)
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        move_logs()
        bar = tqdm(total=int(epochs), desc=f"train {name}", unit="epoch", disable=not progress, leave=False)

        def tick(engine: Any) -> None:
            bar.update(1)
            if evaluator.state.best_metric is not None and evaluator.state.best_metric != -1:
                bar.set_postfix(best=f"{evaluator.state.best_metric:.3f}")

        trainer.add_event_handler(Events.EPOCH_COMPLETED, tick)
        try:
            wf.run()
        finally:
            bar.close()
            wf.finalize()
    ckpt = ckpt_dir / "model.pt"
    if not ckpt.is_file():
        raise RuntimeError(f"training {name} wrote no checkpoint {ckpt}; see {log_dir / f'train_{name}.log'}")
    key = getattr(evaluator.state, "key_metric_name", None) or next(iter(evaluator.state.metrics), "metric")
    return {
        "checkpoint": ckpt,
        "seconds": round(time.perf_counter() - t0, 1),
        "epochs": int(epochs),
        "best_metric_name": key,
        "best_metric": float(evaluator.state.best_metric),
        "best_epoch": int(evaluator.state.best_metric_epoch),
    }


def train_models(
    data_dir: str | os.PathLike,
    models_dir: str | os.PathLike,
    settings: DemoSettings,
    seed: int = 0,
    device: str | torch.device | None = None,
    tb_dir: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Train the five demo models through their bundles' ``configs/train.json`` (:data:`MODELS`).

    Args:
        data_dir: folder written by :func:`prepare_cohorts`.
        models_dir: checkpoints go to ``models_dir/<name>/model.pt`` (best validation metric).
        settings: epochs and validation interval.
        seed: base seed (model ``k`` uses ``seed + MODELS[k]["seed"]``).
        device: training device (default: CUDA when available).
        tb_dir: TensorBoard folder (``train_<name>`` per model; default ``models_dir/tensorboard``).
        log_dir: bundle console logs (``train_<name>.log``; default ``models_dir``).
        progress: progress bars.

    Returns:
        name -> ``{"checkpoint", "seconds", "epochs", "best_metric_name", "best_metric", "best_epoch"}``.

    Example:
        >>> train_models("demo_out/data", "demo_out/models", demo_settings(quick=True))["sos_ref"]["checkpoint"]
    """
    from monai_gamverify.data.datalist import load_datalist
    from monai_gamverify.kplus1 import class_weights

    data, models = Path(data_dir), Path(models_dir)
    tb = Path(tb_dir) if tb_dir is not None else models / "tensorboard"
    logs = Path(log_dir) if log_dir is not None else models
    dev = _device(device)
    labels = [int(e["label"]) for e in load_datalist(data / "garbage" / "datalist.json", "training", check="none")]
    weights = class_weights(labels, 6).tolist()
    extra = {
        "sos_kplus1": {
            "datalist": str(data / "garbage" / "datalist.json"),
            "loss#weight": f"$torch.tensor({[round(w, 6) for w in weights]}, device=@device)",
        }
    }
    out = {}
    for name in MODELS:
        out[name] = _train_one(
            name,
            data,
            models,
            tb,
            logs,
            settings.epochs[name],
            settings.val_interval,
            seed,
            dev,
            progress,
            extra.get(name),
        )
        if progress:
            r = out[name]
            tqdm.write(
                f"    {name}: {r['epochs']} epochs in {r['seconds']:.0f} s, best {r['best_metric_name']} "
                f"{r['best_metric']:.3f} (epoch {r['best_epoch']})"
            )
    return out


def _load(name: str, checkpoint: str | os.PathLike, device: torch.device) -> Any:
    from monai_gamverify.bundle import load_bundle

    spec = MODELS[name]
    root = bundles_dir() / spec["bundle"]
    return load_bundle(root, checkpoint=checkpoint, device=device, overrides=spec["overrides"])


# ------------------------------------------------------------------------------------------------- 3 explanations
def _mask_transform(bm: Any) -> Any:
    """The bundle's geometric preprocessing for a label mask (nearest neighbour, no intensity scaling)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd, Spacingd

    return Compose(
        [
            LoadImaged("mask", image_only=True),
            EnsureChannelFirstd("mask"),
            Orientationd("mask", axcodes="RAS"),
            Spacingd("mask", pixdim=bm.parser.get_parsed_content("pixdim"), mode="nearest"),
            ResizeWithPadOrCropd("mask", spatial_size=bm.parser.get_parsed_content("roi_size")),
        ]
    )


def _explain_examples(
    models: Mapping[str, Any], items: list[dict], out: Path, device: torch.device, progress: bool
) -> pd.DataFrame:
    from monai_gamverify.metrics.evaluation import pointing_game, relevance_mass
    from monai_gamverify.visualize.cam import GradCAM
    from monai_gamverify.visualize.text import describe_map

    ref = models["sos_ref"]
    pre, mask_pre = ref.preprocessing(), _mask_transform(ref)
    rows = []
    for item in tqdm(items, desc="explain", disable=not progress, leave=False):
        img = pre({"image": item["image"]})["image"]
        mask = mask_pre({"mask": item["mask"]})["mask"] if item.get("mask") else None
        for name in ("sos_ref", "chin"):
            bm = models[name]
            res = GradCAM(bm.network, bm.target_layer).explain(img.unsqueeze(0).to(device))
            cam = res.maps[0].detach().cpu()
            pred = int(res.logits[0].argmax())
            prob = float(res.logits[0].float().softmax(0)[pred])
            # metadata.json names the 5 SOS stages; a model trained with other classes declares them in MODELS
            names = MODELS[name]["overrides"].get("class_names", bm.class_names)
            cls = names[pred] if pred < len(names) else str(pred)
            stem = f"{item['id']}_{name}"
            nii = save_nifti(cam, out / f"{stem}_gradcam.nii.gz", reference=img)
            truth = _SOS_NAMES[int(item["label"])]
            png = overlay_png(
                img[0],
                cam[0],
                out / f"{stem}_gradcam.png",
                mask=None if mask is None else mask[0],
                title=f"{name}: {item['id']} (true {truth}) -> {cls} p={prob:.2f}",
            )
            row = {
                "id": item["id"],
                "model": name,
                "true_stage": truth,
                "prediction": cls,
                "probability": prob,
                "text": describe_map(cam, affine=img.affine),
                "map": str(nii),
                "overlay": str(png),
            }
            if mask is not None:
                m = (mask > 0).float().unsqueeze(0)
                row["peak_in_synchondrosis"] = bool(pointing_game(cam.unsqueeze(0), m, spacing=1.0)[0] == 1)
                row["relevance_mass"] = float(relevance_mass(cam.unsqueeze(0), m)[0])
            rows.append(row)
    table = pd.DataFrame(rows)
    write_csv(table, out / "explanations.csv")
    return table


# ------------------------------------------------------------------------------------------------- 4 verification
def _feature_distributions_png(features: pd.DataFrame, path: Path, title: str) -> Path:
    """Box plots of every similarity feature by label (1 = suitable, 0 = not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_gamverify.verification.verifier import feature_columns

    cols = feature_columns(features)
    ncol = min(4, len(cols))
    nrow = int(np.ceil(len(cols) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.6 * nrow), squeeze=False)
    labels = sorted(features["label"].unique())
    for ax, col in zip(axes.flat, cols):
        groups = [features.loc[features["label"] == lab, col].to_numpy(float) for lab in labels]
        ax.boxplot(groups, tick_labels=[f"label {lab}" for lab in labels], widths=0.6)
        for k, g in enumerate(groups):
            jitter = np.random.default_rng(k).uniform(-0.12, 0.12, g.size)
            ax.scatter(np.full(g.size, k + 1) + jitter, g, s=8, alpha=0.6, c=f"C{k}")
        ax.set_title(col, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _verify(
    data: Path,
    ckpts: Mapping[str, Path],
    out: Path,
    settings: DemoSettings,
    seed: int,
    device: torch.device,
    progress: bool,
) -> dict:
    from monai_gamverify.verification.bundles import verify_bundles

    root = bundles_dir() / "sos_staging"
    labels = {"sos_b": 1, "sos_kplus1": 1, "chin": 0}
    candidates = {n: {"bundle": str(root), "checkpoint": str(ckpts[n])} for n in labels}
    results = {}
    for method in ("gradcam", "featuremap"):
        report = verify_bundles(
            reference=str(root),
            candidates=candidates,
            dataset_dir=str(data / "sos"),
            out=str(out / method),
            labels=labels,
            split="test",
            method=method,
            overrides={**MODELS["sos_ref"]["overrides"], "checkpoint": str(ckpts["sos_ref"])},
            candidate_overrides={n: MODELS[n]["overrides"] for n in labels},
            n_splits=settings.n_splits,
            seed=seed,
            progress=progress,
            device=str(device),
            n_estimators=settings.n_estimators,
        )
        features = pd.read_csv(out / method / "features.csv")
        dist = _feature_distributions_png(
            features, out / method / "feature_distributions.png", f"similarity features by label ({method})"
        )
        results[method] = {
            "cv_mean": dict(report["cv_mean"]),
            "per_model": report["per_model"],
            "reference_layer": report["reference"]["layer"],
            "n_items": report["n_items"],
            "dir": out / method,
            "feature_distributions": dist,
        }
    return results


# ---------------------------------------------------------------------------------------------- 5 attribution energy
def _energy(
    data: Path, ckpt: Path, out: Path, settings: DemoSettings, seed: int, device: torch.device, progress: bool
) -> dict:
    from monai_gamverify.data.datalist import load_datalist
    from monai_gamverify.energy.analysis import cohort_energy, energy_report
    from monai_gamverify.energy.workflow import regression_metrics
    from monai_gamverify.visualize.cam import GradCAM

    bm = _load("quality", ckpt, device)
    categories = list(bm.parser.get_parsed_content("categories"))
    pre = bm.preprocessing()
    dl = data / "quality" / "datalist.json"
    items = [e for split in ("validation", "test") for e in load_datalist(dl, split, check="exists", spatial_dims=None)]
    volumes = {e["id"]: pre({"image": e["image"]})["image"] for e in items}
    cam = GradCAM(bm.network, bm.target_layer)
    ae = cohort_energy(cam, volumes, {c: i for i, c in enumerate(categories)}, slice_axis=2, device=device)
    consensus = pd.DataFrame([{"id": e["id"], **{c: float(e[c]) for c in categories}} for e in items])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(ae, out / "ae.csv")
    write_csv(consensus, out / "consensus.csv")
    preds = []
    with torch.no_grad():
        for vol in volumes.values():  # the bundle's evaluation: every axial slice, mean over slices
            slices = vol.as_tensor().movedim(-1, 0).to(device)  # (D, 1, H, W)
            preds.append(bm.network(slices).mean(0).cpu().numpy())
    reg = regression_metrics(np.stack(preds), consensus[categories].to_numpy(), categories)
    write_csv(reg, out / "regression_metrics.csv")
    rep = energy_report(
        out / "ae.csv", out / "consensus.csv", out, n_boot=settings.n_boot, seed=seed, progress=progress
    )
    table = pd.read_csv(out / "energy_table.csv")
    return {"table": table, "regression": reg, "paths": rep["paths"], "n": len(items), "categories": categories}


# -------------------------------------------------------------------------------------------------- 6 garbage class
def _garbage(data: Path, models: Mapping[str, Any], out: Path, device: torch.device, progress: bool) -> dict:
    from monai_gamverify.data.datalist import load_datalist
    from monai_gamverify.kplus1 import RejectGarbaged, energy_score, kplus1_score, msp_score, ood_metrics

    pre = models["sos_ref"].preprocessing()
    sources = {"sos (in-distribution)": "sos", "chin": "chin", "cvm": "cvm", "noise": "noise"}
    reject = RejectGarbaged(keys="pred")
    rows, per_item = [], []
    with torch.no_grad():
        for source, kind in sources.items():
            dl = data / kind / "datalist.json"
            items = load_datalist(dl, "test", check="exists", spatial_dims=None, require_label=False, allow_empty=True)
            for e in tqdm(items, desc=f"K+1 {kind}", disable=not progress, leave=False):
                x = pre({"image": e["image"]})["image"].unsqueeze(0).to(device)
                logits6 = models["sos_kplus1"].network(x)[0].float().cpu()
                logits5 = models["sos_ref"].network(x)[0].float().cpu()
                r = reject({"pred": logits6})
                row = {
                    "id": e.get("id", Path(e["image"]).name.split(".")[0]),
                    "source": source,
                    "rejected": bool(r["rejected"]),
                    "garbage_prob": float(r["garbage_prob"]),
                    "best_real_class": int(r["best_real_class"]),
                    "kplus1_score": float(kplus1_score(logits6[None])[0]),
                    "msp_ref": float(msp_score(logits5[None])[0]),
                    "energy_ref": float(energy_score(logits5[None])[0]),
                }
                if kind == "sos":
                    row["stage_correct"] = int(r["best_real_class"]) == int(e["label"])
                per_item.append(row)
    items_df = pd.DataFrame(per_item)
    for source, part in items_df.groupby("source", sort=False):
        rows.append(
            {
                "source": source,
                "n": len(part),
                "rejected": int(part["rejected"].sum()),
                "rejection_rate": float(part["rejected"].mean()),
                "mean_garbage_prob": float(part["garbage_prob"].mean()),
            }
        )
    table = pd.DataFrame(rows)
    is_in = items_df["source"].str.startswith("sos")
    ood = []
    baselines = {"K+1 (1 - p garbage)": "kplus1_score", "MSP (ref.)": "msp_ref", "energy (ref.)": "energy_ref"}
    for method, col in baselines.items():
        m = ood_metrics(items_df.loc[is_in, col], items_df.loc[~is_in, col])
        ood.append({"method": method, "auroc": m["auroc"], "fpr_at_95tpr": m["fpr_at_tpr"]})
    ood_df = pd.DataFrame(ood)
    write_csv(items_df, out / "garbage_items.csv")
    write_csv(table, out / "rejections.csv")
    write_csv(ood_df, out / "ood_baselines.csv")
    acc = float(items_df.loc[is_in, "stage_correct"].mean()) if is_in.any() else float("nan")
    return {"table": table, "ood": ood_df, "items": items_df, "stage_accuracy": acc}


# ------------------------------------------------------------------------------------------------- 7 report
def _verdicts(summary: dict) -> list[tuple[str, str, bool]]:
    out = []
    for name, info in summary["verification"]["gradcam"]["per_model"].items():
        p = info["mean_p_suitable"]
        suitable = p >= 0.5
        truth = "trained on SOS" if info["label"] == 1 else "trained on other data"
        out.append(
            (
                f"model {name} ({truth})",
                f"{'suitable' if suitable else 'NOT suitable'} for the SOS data: mean P(suitable) {p:.2f}",
                suitable == bool(info["label"]),
            )
        )
    for row in summary["garbage"]["rejections"]:
        ind = row["source"].startswith("sos")
        good = row["rejection_rate"] <= 0.2 if ind else row["rejection_rate"] >= 0.5
        out.append(
            (
                f"{row['source']} volumes",
                f"{row['rejected']}/{row['n']} rejected by the K+1 model ({100 * row['rejection_rate']:.0f} %)",
                good,
            )
        )
    sig = [r["category"] for r in summary["energy"]["table"] if r.get("significant_holm")]
    out.append(
        (
            "attribution energy",
            f"tracks the consensus score (Holm p <= 0.05) for {len(sig)} of {len(summary['energy']['table'])} "
            f"categories{': ' + ', '.join(sig) if sig else ''}",
            bool(sig),
        )
    )
    return out


def _write_report(out: Path, summary: dict, results: dict) -> Path:
    from monai_gamverify.apps.report import Report

    rep = Report(
        "monai-gamverify demo: is this model suitable for this data?",
        subtitle=f"synthetic cohorts, seed {summary['seed']}, {summary['mode']} run, weights: {summary['weights']}; "
        "research demonstration, not for clinical use",
    )
    for v in _verdicts(summary):
        rep.verdict(*v)
    rep.key_figures(summary["key_figures"])

    sec = rep.section(
        "Data",
        "Synthetic phantoms with ground truth (monai_gamverify.data): SOS volumes (the task: fusion stage 1-5), "
        "chin and cervical-vertebrae volumes (other anatomy), pure noise, and head-and-neck image-quality volumes "
        "scored by five simulated raters.",
    )
    sec.add_table(pd.DataFrame(summary["cohorts"]), "cohorts")

    sec = rep.section(
        "Models",
        "Five small_cnn bundles. Weights: "
        + (
            "shipped with the package (scripts/make_demo_weights.py --seed 0, same bundle configs and cohorts)."
            if summary["weights"] == "shipped"
            else "trained in this run through each bundle's configs/train.json."
        ),
    )
    sec.add_table(pd.DataFrame(summary["models"]), "models")

    sec = rep.section(
        "Explanations (Grad-CAM)",
        "Grad-CAM of the reference SOS model and of the chin model on SOS test volumes, on three orthogonal slices "
        "through the map's peak; the white contour is the true synchondrosis. The text under each figure is "
        "monai_gamverify.visualize.text.describe_map.",
    )
    for row in results["explanations"].to_dict(orient="records"):
        extra = ""
        if "peak_in_synchondrosis" in row:
            extra = (
                f" Peak in the synchondrosis: {'yes' if row['peak_in_synchondrosis'] else 'no'}; "
                f"relevance mass {row['relevance_mass']:.2f}."
            )
        sec.add_figure(row["overlay"], f"{row['model']} on {row['id']}: {row['text']}{extra}")

    methods = {"gradcam": "Method 1: Grad-CAM attention maps", "featuremap": "Method 2: early feature maps"}
    for method, what in methods.items():
        v = results["verification"][method]
        d = Path(v["dir"])
        sec = rep.section(
            f"Verification, {what}",
            f"Every candidate's map of every SOS test volume is compared with the reference model's mean map "
            f"(layer {v['reference_layer']}) by seven similarity features; a Random Forest learns 'trained on similar "
            f"data' (label 1) vs not (label 0), cross-validated over {summary['settings']['n_splits']} folds grouped "
            f"by subject.",
        )
        sec.add_figure(d / "roc.png", "ROC of the out-of-fold P(suitable)")
        sec.add_figure(d / "reference_map.png", "reference map (mean normalised map of the reference model)")
        sec.add_figure(v["feature_distributions"], "per-label feature distributions")
        per_model = pd.DataFrame([{"model": k, **vals} for k, vals in v["per_model"].items()])
        sec.add_table(per_model, "mean out-of-fold P(suitable) per candidate")
        sec.add_table(pd.DataFrame([v["cv_mean"]]), "cross-validation (mean over folds)")
        sec.add_table(pd.read_csv(d / "summary.csv"), "per-label feature statistics")

    e = results["energy"]
    sec = rep.section(
        "Attribution energy",
        f"AE (sum of the raw Grad-CAM over all axial slices) of the 2D quality model on {e['n']} held-out "
        "volumes, against the raters' consensus score, per category: Spearman rho, leave-one-out rho/p, bootstrap "
        "interval and Holm adjustment (monai_gamverify.energy.analysis).",
    )
    for c in e["categories"]:
        p = Path(e["paths"].get(f"scatter_{c}", ""))
        if p.is_file():
            sec.add_figure(p, f"AE vs consensus: {c}", width=480)
    sec.add_table(e["table"], "AE vs consensus (energy_table.csv)")
    sec.add_table(e["regression"], "quality model predictions vs consensus (regression_metrics.csv)")

    g = results["garbage"]
    sec = rep.section(
        "Garbage class (K+1)",
        "The K+1 SOS model has a sixth class trained on chin and CVM volumes; it should reject what is not an SOS "
        "volume (noise was never seen in training) and keep the SOS test volumes. Post-hoc baselines on the "
        f"5-class reference model for comparison. Stage accuracy of the K+1 model on SOS test volumes: "
        f"{g['stage_accuracy']:.2f}.",
    )
    sec.add_table(g["table"], "rejection table")
    sec.add_table(g["ood"], "OOD detection: in = SOS test, out = chin + CVM + noise")

    sec = rep.section("Files", "Everything in the report is also on disk:")
    sec.add_list([f"{k}: {v}" for k, v in summary["files"].items()])
    sec.add_text(format_summary(summary), pre=True)
    return rep.write(out / "report.html")


def _tensorboard_summary(tb: Path, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb / "summary"))
    try:
        for method, v in summary["verification"].items():
            for k, val in v["cv_mean"].items():
                writer.add_scalar(f"verify_{method}/{k}", val, 0)
            for name, info in v["per_model"].items():
                writer.add_scalar(f"verify_{method}/mean_p_suitable_{name}", info["mean_p_suitable"], 0)
        for row in summary["energy"]["table"]:
            writer.add_scalar(f"energy/rho_{row['category']}", row["rho"], 0)
            writer.add_scalar(f"energy/median_loo_rho_{row['category']}", row["median_loo_rho"], 0)
        for row in summary["garbage"]["rejections"]:
            writer.add_scalar(f"garbage/rejection_rate_{row['source'].split()[0]}", row["rejection_rate"], 0)
        for k, t in summary["timings_s"].items():
            writer.add_scalar(f"timing_s/{k}", t, 0)
    finally:
        writer.close()


def format_summary(summary: Mapping[str, Any]) -> str:
    """The few lines printed at the end of a demo run: verdicts, key figures, where the report is.

    Example:
        >>> print(format_summary(run_demo("demo_out")))
    """
    lines = ["verdicts:"]
    for subject, text, good in _verdicts(dict(summary)):
        lines.append(f"  [{'ok' if good else '!!'}] {subject}: {text}")
    lines.append("key figures:")
    for k, v in summary["key_figures"].items():
        lines.append(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    lines.append(f"total {summary['timings_s']['total']:.0f} s; report: {summary['report']}")
    return "\n".join(lines)


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records"))


def run_demo(
    out: str | os.PathLike = "demo_out",
    seed: int = 0,
    quick: bool = False,
    device: str | None = None,
    train: bool | None = None,
    progress: bool = True,
) -> dict:
    """Run the whole demo and write one report directory (see the module docstring for the stages).

    Written to ``out``: ``report.html`` (self-contained), ``summary.json``, ``data/`` (cohorts), ``models/``
    (checkpoints used), ``cams/`` (NIfTI maps, PNG overlays, ``explanations.csv``), ``verify/gradcam`` and
    ``verify/featuremap`` (verifier report: CSV/JSON/PNG, ``verifier.skops``), ``energy/`` (AE tables and scatter
    plots), ``garbage/`` (rejection and OOD tables), ``tensorboard/`` (training runs when trained, and ``summary``),
    ``logs/`` (bundle training logs).

    Args:
        out: report directory (created; an existing demo directory is overwritten).
        seed: base seed of cohorts, training and verifier. The shipped weights exist for seed 0 only.
        quick: tiny cohorts and 1 training epoch (for tests; the results are not meaningful).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        train: ``True`` trains every model here; ``False`` requires the shipped weights; ``None`` (default) uses
            them when they match the settings and seed, else trains.
        progress: progress bars and stage lines.

    Returns:
        The summary dict (also ``summary.json``): ``report``, ``out``, ``verdicts``, ``key_figures``,
        ``verification``, ``energy``, ``garbage``, ``models``, ``cohorts``, ``timings_s``, ``files``, ...

    Raises:
        FileNotFoundError: ``train=False`` without matching shipped weights, or no bundles folder.

    Example:
        >>> s = run_demo("demo_out", quick=True)
        >>> s["key_figures"]["verifier ROC AUC (Method 1)"]
    """
    with warnings.catch_warnings():
        # MONAI announces a future default of Orientationd once per bundle parse; nothing to act on here
        warnings.filterwarnings("ignore", message=r".*Orientationd.*")
        return _run_demo(out, seed, quick, device, train, progress)


def _run_demo(
    out: str | os.PathLike, seed: int, quick: bool, device: str | None, train: bool | None, progress: bool
) -> dict:
    t_start = time.perf_counter()
    settings = demo_settings(quick)
    dev = _device(device)
    root = Path(out)
    timings: dict[str, float] = {}

    shipped = shipped_weights(settings, seed) if train is not True else None
    if train is False and shipped is None:
        raise FileNotFoundError(
            f"no shipped weights in {WEIGHTS_DIR} match these settings (seed {seed}, quick={quick}); run "
            "scripts/make_demo_weights.py or pass train=True"
        )

    root.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "models", "cams", "verify", "energy", "garbage", "tensorboard", "logs"):
        shutil.rmtree(root / sub, ignore_errors=True)  # a rerun must not mix old and new results
    t = _stage(1, f"synthetic cohorts -> {root / 'data'}")
    cohorts = prepare_cohorts(root / "data", settings, seed=seed, progress=progress)
    timings["cohorts"] = time.perf_counter() - t
    models_dir = root / "models"
    if shipped is not None:
        t = _stage(2, f"models: shipped weights from {WEIGHTS_DIR}")
        meta = json.loads((WEIGHTS_DIR / "manifest.json").read_text())["models"]
        ckpts, model_rows = {}, []
        for name, path in shipped.items():
            dst = models_dir / f"{name}.pt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst)
            ckpts[name] = dst
            kept = ("best_metric_name", "best_metric", "best_epoch", "epochs", "seconds")
            model_rows.append({"model": name, **MODELS[name], **{k: meta[name][k] for k in kept}})
        weights = "shipped"
    else:
        t = _stage(2, f"models: training {len(MODELS)} bundles (small_cnn) -> {models_dir}")
        trained = train_models(
            root / "data", models_dir, settings, seed, dev, root / "tensorboard", root / "logs", progress
        )
        ckpts = {k: v["checkpoint"] for k, v in trained.items()}
        model_rows = [
            {"model": k, **MODELS[k], **{kk: vv for kk, vv in v.items() if kk != "checkpoint"}}
            for k, v in trained.items()
        ]
        weights = "trained"
    for row in model_rows:
        row["overrides"] = json.dumps(row["overrides"])
        row["seed"] = int(seed) + int(MODELS[row["model"]]["seed"])  # the training seed, not the offset
    timings["models"] = time.perf_counter() - t
    loaded = {name: _load(name, ckpts[name], dev) for name in ("sos_ref", "chin", "sos_kplus1")}

    t = _stage(3, "Grad-CAM explanations of SOS test volumes (reference and chin model)")
    from monai_gamverify.data.datalist import load_datalist

    test_items = load_datalist(root / "data" / "sos" / "datalist.json", "test", check="exists", spatial_dims=None)
    explanations = _explain_examples(loaded, test_items[: settings.n_examples], root / "cams", dev, progress)
    timings["explanations"] = time.perf_counter() - t

    t = _stage(4, "verification: Method 1 (Grad-CAM) and Method 2 (feature maps), Random-Forest verifier")
    verification = _verify(root / "data", ckpts, root / "verify", settings, seed, dev, progress)
    timings["verification"] = time.perf_counter() - t

    t = _stage(5, "attribution energy of the quality model, leave-one-out Spearman")
    energy = _energy(root / "data", ckpts["quality"], root / "energy", settings, seed, dev, progress)
    timings["energy"] = time.perf_counter() - t

    t = _stage(6, "K+1 garbage class: rejections on SOS, chin, CVM and noise volumes")
    garbage = _garbage(root / "data", loaded, root / "garbage", dev, progress)
    timings["garbage"] = time.perf_counter() - t

    t = _stage(7, "report")
    m1, m2 = verification["gradcam"]["cv_mean"], verification["featuremap"]["cv_mean"]
    gt = garbage["table"].set_index("source")
    ood_rate = float(gt.loc[[s for s in gt.index if not s.startswith("sos")], "rejected"].sum()) / max(
        int(gt.loc[[s for s in gt.index if not s.startswith("sos")], "n"].sum()), 1
    )
    overall = energy["table"].set_index("category")
    key = {
        "verifier ROC AUC (Method 1)": float(m1.get("roc_auc", float("nan"))),
        "verifier accuracy (Method 1)": float(m1.get("accuracy", float("nan"))),
        "verifier ROC AUC (Method 2)": float(m2.get("roc_auc", float("nan"))),
        "K+1 rejection rate, OOD volumes": ood_rate,
        "K+1 rejection rate, SOS test volumes": float(gt.iloc[0]["rejection_rate"]),
        "K+1 stage accuracy, SOS test": garbage["stage_accuracy"],
        "AE Spearman rho, overall": float(overall["rho"].get("overall", float("nan"))),
    }
    summary: dict[str, Any] = {
        "out": str(root),
        "report": str(root / "report.html"),
        "seed": int(seed),
        "mode": "quick" if quick else "full",
        "device": str(dev),
        "weights": weights,
        "settings": asdict(settings),
        "cohorts": [
            {
                "cohort": k,
                "n": v.get("n", sum(v["splits"].values())),
                "size": v.get("size", ""),
                **{split: v["splits"].get(split, 0) for split in ("training", "validation", "test")},
            }
            for k, v in cohorts.items()
        ],
        "models": model_rows,
        "key_figures": key,
        "explanations": _records(explanations.drop(columns=["map", "overlay"])),
        "verification": {
            m: {k: (str(x) if isinstance(x, Path) else x) for k, x in v.items()} for m, v in verification.items()
        },
        "energy": {"table": _records(energy["table"]), "regression": _records(energy["regression"]), "n": energy["n"]},
        "garbage": {
            "rejections": _records(garbage["table"]),
            "ood": _records(garbage["ood"]),
            "stage_accuracy": garbage["stage_accuracy"],
        },
        "files": {
            "report": str(root / "report.html"),
            "summary": str(root / "summary.json"),
            "cohorts": str(root / "data"),
            "checkpoints": str(models_dir),
            "CAM maps (NIfTI) and overlays (PNG)": str(root / "cams"),
            "verification Method 1": str(root / "verify" / "gradcam"),
            "verification Method 2": str(root / "verify" / "featuremap"),
            "attribution energy": str(root / "energy"),
            "garbage class": str(root / "garbage"),
            "TensorBoard": str(root / "tensorboard"),
        },
        "timings_s": timings,
    }
    summary["verdicts"] = [{"subject": s, "verdict": v, "as_expected": g} for s, v, g in _verdicts(summary)]
    timings["report"] = 0.0
    timings["total"] = time.perf_counter() - t_start
    results = {"explanations": explanations, "verification": verification, "energy": energy, "garbage": garbage}
    _write_report(root, summary, results)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    _tensorboard_summary(root / "tensorboard", summary)
    write_json(summary, root / "summary.json")
    if progress:
        tqdm.write(format_summary(summary))
    return summary
