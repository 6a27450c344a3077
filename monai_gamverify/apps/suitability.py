"""``gamverify verify`` without labels: is each candidate bundle suitable for the user's data, judged next to one
trusted reference bundle (and any further references) on a few unlabeled target images.

Every bundle reads and preprocesses the images through the engine (:class:`~monai_gamverify.apps.pipeline.
ImagePipeline`: one reader policy, the bundle's own preprocessing, its passport's training settings), is observed
once (:func:`~monai_gamverify.verification.evidence.observe_model`: probabilities, Grad-CAM of the predicted class,
early feature map, all maps brought onto the reference's grid and then one common coarse grid), and judged by
:func:`~monai_gamverify.verification.suitability.judge_candidate`. Writes ``verdicts.csv`` (one row per candidate:
``model, verdict, p_value, reasons`` and each evidence with its p-value), ``verdicts.json``, the mean maps as PNG and
``report.html`` (reference and candidate mean maps side by side, the evidence table, the verdict).

Example:
    >>> verify_suitability("bundles/ref", {"colleague": "bundles/ft"}, "data/site_a", out="verify_out")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from monai_gamverify.apps.pipeline import ImagePipeline
from monai_gamverify.apps.report import Report
from monai_gamverify.bundle import BundleModel, load_bundle
from monai_gamverify.data.datalist import list_images, read_datalist_split
from monai_gamverify.io import affine_of, write_csv, write_json
from monai_gamverify.verification.evidence import EVIDENCE, ModelObservation, atc_accuracy, observe_model
from monai_gamverify.verification.suitability import (
    SuitabilityPrior,
    SuitabilityVerdict,
    judge_candidate,
    pair_evidence,
)
from monai_gamverify.visualize.plots import new_figure, save_figure

__all__ = [
    "verify_suitability",
    "fit_verifier",
    "task_info",
    "target_images",
    "default_prior_path",
    "observe_bundle",
    "format_summary",
]

logger = logging.getLogger(__name__)
#: the prior shipped with the package: null rows of suitable pairs of the SOS zoo (scripts/experiment_verify.py)
_PRIOR = Path(__file__).resolve().parents[1] / "verification" / "priors" / "sos_zoo.json"


def default_prior_path() -> Path:
    """The shipped prior (suitable pairs of the package's SOS zoo, 20 images each)."""
    return _PRIOR


def task_info(bm: BundleModel) -> dict[str, Any]:
    """What a bundle declares about its task: number and names of classes (its config, which follows the passport,
    else ``metadata.json``), modality, input channels, input shape, voxel size and intensity window."""
    meta = bm.metadata or {}
    parser = bm.parser
    fmt = meta.get("network_data_format") or {}
    inp = next(iter((fmt.get("inputs") or {}).values()), {}) or {}
    out = next(iter((fmt.get("outputs") or {}).values()), {}) or {}

    def cfg(key: str) -> Any:
        try:
            return parser.get_parsed_content(key) if parser is not None and key in parser else None
        except Exception:  # a config key that needs the training data (e.g. a datalist) to resolve: not declared
            return None

    names = cfg("class_names") or bm.class_names or None
    k = cfg("num_classes") or out.get("num_channels") or (len(names) if names else None)
    window = cfg("hu_window")
    if window is None and cfg("a_min") is not None:
        window = [cfg("a_min"), cfg("a_max")]
    return {
        "num_classes": None if k is None else int(k),
        "class_names": list(names) if names else None,
        "modality": inp.get("modality"),
        "num_channels": inp.get("num_channels"),
        "spatial_shape": cfg("roi_size") or inp.get("spatial_shape"),
        "pixdim": cfg("pixdim"),
        "intensity_window": window,
    }


def target_images(dataset_dir: str | os.PathLike, n_images: int = 20, seed: int = 0) -> list[str]:
    """Up to ``n_images`` image paths of the user's data: a folder's images (and DICOM series), or the entries of
    its ``datalist.json`` (every split; labels are never read), a seeded random subset when there are more.

    Raises:
        ValueError: no image found (the message names the folder).
    """
    root = Path(dataset_dir)
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}")
    datalist = root / "datalist.json" if root.is_dir() else root
    paths: list[str] = []
    if datalist.suffix == ".json" and datalist.is_file():
        for split in ("test", "validation", "training"):
            for e in read_datalist_split(datalist, split, allow_empty=True):
                p = e["image"] if isinstance(e, Mapping) else e
                paths.append(str(p if os.path.isabs(str(p)) else datalist.parent / str(p)))
    else:
        paths = [e["image"] for e in list_images(root, spatial_dims=None, num_channels=None, check="none")]
    if not paths:
        raise ValueError(f"no image found in {root}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if len(paths) > n_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), n_images, replace=False))
        paths = [paths[i] for i in keep]
    return paths


def _aligner(ref_images: Sequence[Any], images: Sequence[Any]):
    """A map resampler onto the reference's preprocessed grid, or None when both grids are the same."""
    same = all(
        tuple(a.shape[1:]) == tuple(b.shape[1:]) and np.allclose(affine_of(a), affine_of(b), atol=1e-4)
        for a, b in zip(ref_images, images)
    )
    if same:
        return None
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    resample = SpatialResample(mode="bilinear", padding_mode="zeros")

    def align(maps: torch.Tensor, start: int) -> torch.Tensor:
        out = []
        for i, m in enumerate(maps, start):
            src = MetaTensor(m.float(), affine=torch.as_tensor(affine_of(images[i])))
            dst_affine = torch.as_tensor(affine_of(ref_images[i]))
            out.append(torch.as_tensor(resample(src, dst_affine=dst_affine, spatial_size=ref_images[i].shape[1:])))
        return torch.stack(out)

    return align


def observe_bundle(
    pipe: ImagePipeline, images: Sequence[Any], ref_images: Sequence[Any] | None = None
) -> ModelObservation:
    """Observe a bundle's model on its preprocessed images (maps resampled onto ``ref_images``' grid if needed)."""
    bm = pipe.bundle
    x = torch.stack([torch.as_tensor(i) for i in images]).float()
    align = _aligner(ref_images, images) if ref_images is not None else None
    feature = bm.feature_layers[0] if bm.feature_layers else None
    return observe_model(
        bm.network, x, pipe.target_layers[0] if isinstance(pipe.target_layers, list) else pipe.target_layers,
        feature_layer=feature, val_conf=bm.passport.get("val_conf"),
        info=task_info(bm), align=align,
    )  # fmt: skip


def _load(role: str, name: str, root: Any, device: Any, overrides: Mapping | None) -> ImagePipeline:
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{role} {name!r}: bundle folder not found: {path}")
    overrides = dict(overrides or {})
    checkpoint = overrides.pop("checkpoint", None)  # a weights file other than models/model.pt
    try:
        bm = load_bundle(path, checkpoint=checkpoint, device=device, overrides=overrides)
        if bm.task == "segmentation":
            raise ValueError(
                "the label-free verdict covers classification bundles; verify segmentation bundles with the "
                "supervised study (--labels with --label)"
            )
        return ImagePipeline.from_bundle(bm, device=device)
    except (ValueError, OSError, RuntimeError) as err:  # name the bundle: a user has many and one does not load
        raise ValueError(f"{role} {name!r} ({path}): {type(err).__name__}: {err}") from err


def _screen_pvalue(pipe: ImagePipeline, paths: Sequence[str], out: Path) -> float | None:
    screen = pipe.bundle.passport.get("screen")
    if not screen:
        return None
    from monai_gamverify.screening import run_screen

    df = run_screen(pipe.bundle.root / "models" / screen, paths, out, bundle=pipe.bundle)
    return float(df.attrs["dataset"]["p_value"])


def _mean_map_png(obs: Mapping[str, ModelObservation], names: Sequence[str], path: Path) -> Path:
    fig = new_figure(figsize=(2.2 * len(names), 2.4))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names):
        m = obs[name].cam.mean(0)[0].numpy()
        sl = m[m.shape[0] // 2] if m.ndim == 3 else m
        ax.imshow(sl.T, cmap="jet", origin="lower", vmin=0)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def verify_suitability(
    reference: str,
    candidates: Mapping[str, str],
    dataset_dir: str,
    out: str = "verify_out",
    references: Mapping[str, str] | None = None,
    n_images: int = 20,
    verifier: str | None = None,
    alpha: float = 0.05,
    device: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Mapping] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Label-free model-level verdicts: see the module docstring and ``docs/verification.md``.

    Args:
        reference: the trusted reference bundle's folder.
        candidates: name -> bundle folder of each candidate.
        dataset_dir: the user's images (a folder, or a folder with ``datalist.json``; labels are not read).
        out: output folder.
        references: further trusted references (name -> folder); they join the null rows.
        n_images: target images used (a seeded random subset of more).
        verifier: a saved verifier (prior) file; default: the prior shipped with the package.
        alpha: level of the tests.
        device: ``cpu`` / ``cuda`` (default: CUDA when available).
        seed: seed of the image subset and of the permutation test.
        overrides: name -> config overrides for a bundle without a passport (``{"cand": {"network_name": ...}}``;
            ``"reference"`` names the reference; the key ``checkpoint`` selects another weights file).
        progress: progress bars.

    Returns:
        ``{"verdicts": DataFrame, "summary": str, "files": {...}}``.
    """
    if not candidates:
        raise ValueError("no candidate bundles: pass candidates={name: bundle_dir, ...}")
    references = dict(references or {})
    clash = sorted(set(references) & set(candidates))
    if clash:
        raise ValueError(f"names used both as reference and candidate: {clash}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    paths = target_images(dataset_dir, n_images, seed)
    prior_path = Path(verifier) if verifier else default_prior_path()
    prior = SuitabilityPrior.load(prior_path)
    ref_pipe = _load("reference", "reference", reference, device, overrides.get("reference"))
    ref_images = [ref_pipe.load(p)[1] for p in paths]
    obs: dict[str, ModelObservation] = {"reference": observe_bundle(ref_pipe, ref_images)}
    ref_obs = {}
    for name, root in references.items():
        pipe = _load("reference", name, root, device, overrides.get(name))
        ref_obs[name] = obs[name] = observe_bundle(pipe, [pipe.load(p)[1] for p in paths], ref_images)
    rows, verdicts = [], {}
    for name, root in tqdm(candidates.items(), desc="candidates", disable=not progress):
        try:
            pipe = _load("candidate", name, root, device, overrides.get(name))
            obs[name] = observe_bundle(pipe, [pipe.load(p)[1] for p in paths], ref_images)
            screen_p = _screen_pvalue(pipe, paths, out_dir / "screens" / name)
            v = judge_candidate(obs[name], obs["reference"], ref_obs, prior, alpha=alpha, screen_p=screen_p, seed=seed)
        except Exception as err:  # one candidate that cannot be judged must not stop the others
            logger.error("candidate %s: %s", name, err)
            v = SuitabilityVerdict("undecided", float("nan"), [f"could not be judged: {type(err).__name__}: {err}"])
        verdicts[name] = v
        rows.append({"model": name, "bundle": str(root), **v.to_row()})
    df = pd.DataFrame(rows)
    files = {"verdicts_csv": str(write_csv(df, out_dir / "verdicts.csv"))}
    doc = {
        "protocol": "label-free: conformal test against suitable pairs (references + prior), leave nothing in",
        "alpha": alpha,
        "n_images": len(paths),
        "images": paths,
        "reference": str(reference),
        # a weak reference makes every candidate look worse: its own label-free accuracy estimate, for the reader
        "reference_atc": atc_accuracy(obs["reference"]),
        "references": {k: str(v) for k, v in references.items()},
        "prior": {"file": str(prior_path), "rows": len(prior), "source": prior.source},
        "verdicts": {k: v.to_row() for k, v in verdicts.items()},
    }
    files["verdicts_json"] = str(write_json(doc, out_dir / "verdicts.json"))
    files["report"] = str(_report(out_dir, obs, verdicts, doc))
    summary = format_summary(verdicts, len(paths), alpha)
    if np.isfinite(doc["reference_atc"]):
        summary += f"\nreference's own accuracy estimate on these images (ATC): {doc['reference_atc']:.2f}"
    if prior.n_images and abs(prior.n_images - len(paths)) > 0.5 * prior.n_images:
        logger.warning(
            "the prior's pairs were observed on %d images, this run on %d: its null rows are %s than this run's "
            "evidence; fit a verifier with the same number of images (fit_verifier) for exact p-values",
            prior.n_images, len(paths), "tighter" if prior.n_images > len(paths) else "looser",
        )  # fmt: skip
    return {"verdicts": df, "summary": summary, "files": files}


def fit_verifier(
    suitable: Mapping[str, str],
    dataset_dir: str,
    path: str | os.PathLike,
    n_images: int = 20,
    device: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Mapping] | None = None,
    progress: bool = True,
) -> SuitabilityPrior:
    """Fit a verifier (prior) from bundles known to be suitable: the evidence of every ordered pair of them on the
    same images, saved as JSON for ``gamverify verify --verifier FILE`` on candidates it never saw.

    Args:
        suitable: name -> folder of >= 2 suitable bundles (a zoo of the task: other seeds, architectures).
        dataset_dir: images of the task (labels are not read).
        path: the verifier file to write.
        n_images: images per pair (use the count the verifier will be applied with).
        device: torch device.
        seed: seed of the image subset.
        overrides: name -> config overrides of bundles without a passport.
        progress: progress bar.

    Returns:
        The prior (also written to ``path``).
    """
    if len(suitable) < 2:
        raise ValueError(f"a verifier needs at least 2 suitable bundles (pairs of them), got {len(suitable)}")
    overrides = dict(overrides or {})
    paths = target_images(dataset_dir, n_images, seed)
    obs: dict[str, ModelObservation] = {}
    first = None
    for name, root in tqdm(suitable.items(), desc="suitable bundles", disable=not progress):
        pipe = _load("suitable model", name, root, device, overrides.get(name))
        images = [pipe.load(p)[1] for p in paths]
        first = first or images
        obs[name] = observe_bundle(pipe, images, first)
    pairs = [pair_evidence(obs[a], obs[b]) for a in obs for b in obs if a != b]
    names = list(obs)
    prior = SuitabilityPrior.from_pairs(
        pairs, source=f"{len(names)} suitable bundles: {', '.join(names)}", n_images=len(paths)
    )
    prior.meta = {
        "models": {k: str(v) for k, v in suitable.items()},
        "class_names": obs[names[0]].info.get("class_names"),
    }
    prior.save(path)
    return prior


def format_summary(verdicts: Mapping[str, SuitabilityVerdict], n_images: int, alpha: float) -> str:
    """One line per candidate: ``[ok]``/``[!!]``/``[??]`` verdict, p-value and the deciding reasons."""
    lines = [f"label-free verdicts on {n_images} target image(s), alpha = {alpha}:"]
    for name, v in verdicts.items():
        mark = {"suitable": "[ok]", "not suitable": "[!!]"}.get(v.verdict, "[??]")
        p = "n/a" if not np.isfinite(v.p_value) else f"{v.p_value:.3g}"
        lines.append(f"  {mark} {name}: {v.verdict} (p = {p}): {'; '.join(v.reasons)}")
    return "\n".join(lines)


def _report(out_dir: Path, obs: Mapping[str, ModelObservation], verdicts: Mapping, doc: Mapping) -> Path:
    rep = Report("Model suitability (label-free)", subtitle=f"{doc['n_images']} target images, alpha = {doc['alpha']}")
    counts = pd.Series([v.verdict for v in verdicts.values()]).value_counts().to_dict()
    rep.key_figures({k: counts.get(k, 0) for k in ("suitable", "not suitable", "undecided")})
    intro = (
        "H0: the candidate behaves on these images like a suitable model next to the trusted reference. Null rows: "
        f"{doc['prior']['rows']} suitable pairs of the prior ({doc['prior']['source']}) and the given references."
    )
    sec = rep.section("Verdicts", intro)
    for name, v in verdicts.items():
        rep.verdict(name, f"{v.verdict} (p = {v.p_value:.3g}): {'; '.join(v.reasons)}", v.verdict == "suitable")
    for name, v in verdicts.items():
        s = rep.section(f"Candidate {name}: {v.verdict}", "; ".join(v.reasons))
        if name in obs:
            png = _mean_map_png(obs, ["reference", name], out_dir / "maps" / f"{name}_mean_maps.png")
            s.add_figure(png, "mean Grad-CAM maps over the target images (middle slice of the common grid)")
        table = pd.DataFrame(
            [{"evidence": e, "value": v.evidence.get(e, np.nan), "p": v.p_values.get(e, np.nan)} for e in EVIDENCE]
        )
        s.add_table(table, "evidence (higher = more like the reference) and conformal p-values")
    sec.add_text(f"images: {len(doc['images'])}; prior file: {doc['prior']['file']}")
    return rep.write(out_dir / "report.html")
