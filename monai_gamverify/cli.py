"""The ``gamverify`` command (python-fire): ``gamverify demo|cam|cohort|synth|verify|energy|version``; ``--help``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["main", "demo", "cam", "cohort", "synth", "verify", "energy", "version"]

_CAMS = {"gradcam": "GradCAM", "gradcampp": "GradCAMpp", "scorecam": "ScoreCAM"}


def _is_regression(metadata: dict) -> bool:
    """True when the bundle declares regression outputs (scores, not class logits: no softmax)."""
    try:
        return metadata["network_data_format"]["outputs"]["pred"]["format"] == "regression"
    except (KeyError, TypeError):
        return False


def cam(
    image: str,
    out: str = "cam_out",
    bundle_root: str | None = None,
    network: str | None = None,
    network_args: dict | str | None = None,
    checkpoint: str | None = None,
    layer: str | None = None,
    method: str = "gradcam",
    class_idx: int | None = None,
    a_min: float | None = None,
    a_max: float | None = None,
    device: str | None = None,
    overrides: dict | str | None = None,
) -> dict:
    """Explain one image: write the map as NIfTI (the input's affine), a PNG of three orthogonal slices and a JSON.

    Give either a bundle (``--bundle_root``: its network, weights, inference preprocessing and declared CAM layer)
    or a network by name (``--network resnet18 --network_args '{"spatial_dims": 3, "n_input_channels": 1,
    "num_classes": 5}' --checkpoint model.pt --layer layer4``).

    Args:
        image: NIfTI (or any MONAI-readable) image.
        out: output directory.
        bundle_root: MONAI bundle directory.
        network: ``monai.networks.nets`` name or a dotted path to a network class.
        network_args: keyword arguments of the network (JSON string or dict).
        checkpoint: weights (``torch.load(weights_only=True)``); without it a named network keeps random weights.
        layer: target layer (default: the bundle's declared layer).
        method: gradcam, gradcampp or scorecam.
        class_idx: class (or output column) to explain; default: the predicted class.
        a_min: intensity window lower bound mapped to 0 (network-by-name only; e.g. -1000 for CBCT HU).
        a_max: intensity window upper bound mapped to 1.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        overrides: bundle config keys to override, as for ``monai.bundle run`` (e.g. ``'{"network_name":
            "small_cnn"}'`` for a bundle trained with ``--network_name small_cnn``).

    Returns:
        Summary dict (prediction, probabilities, written files).
    """
    import torch

    import monai_gamverify as gv
    from monai_gamverify.bundle import load_bundle, load_checkpoint
    from monai_gamverify.io import load_image, save_nifti, write_json
    from monai_gamverify.visualize.plots import overlay_png

    if method.lower() not in _CAMS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_CAMS)}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names: list[str] = []
    if bundle_root is not None:
        extra = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
        bm = load_bundle(bundle_root, device=dev, overrides=extra)
        net, layer, names = bm.network, layer or bm.target_layer, bm.class_names
        pre = bm.preprocessing()
        if pre is not None:
            try:
                img = pre({"image": str(image)})["image"]
            except Exception as err:
                raise ValueError(f"cannot preprocess {image} with the bundle's transforms: {err}") from err
        else:
            img = load_image(image)
    elif network is not None:
        from monai_gamverify.bundle import network_from_name

        net = network_from_name(network, network_args)
        if checkpoint:
            load_checkpoint(net, checkpoint)
        else:
            print("warning: no --checkpoint given; the network keeps its random initial weights")
        net = net.to(dev).eval()
        img = load_image(image)
        if a_min is not None and a_max is not None:
            from monai.transforms import ScaleIntensityRange

            img = ScaleIntensityRange(a_min, a_max, 0.0, 1.0, clip=True)(img)
    else:
        raise ValueError("give --bundle_root or --network")
    if not layer:
        raise ValueError("no target layer: pass --layer (names as in model.named_modules())")
    x = img.unsqueeze(0).to(dev)
    metadata = bm.metadata if bundle_root is not None else {}
    slice_axis = bm.slice_axis(x.ndim - 2) if bundle_root is not None else None
    if slice_axis is None:
        explainer = getattr(gv, _CAMS[method.lower()])(net, layer)
        result = explainer.explain(x, class_idx=class_idx)
        logits, maps, explained = result.logits, result.maps, int(result.class_idx[0])
    else:  # a 2D network on a volume (e.g. cbct_quality): slice by slice, outputs averaged over the slices
        from monai_gamverify.energy.workflow import SliceAggregateInferer, SliceCAMd
        from monai_gamverify.visualize.cam import normalize_maps

        with torch.no_grad():
            logits = SliceAggregateInferer(spatial_dim=slice_axis)(x, net)
        explained = int(logits[0].argmax()) if class_idx is None else int(class_idx)
        if not 0 <= explained < logits.shape[1]:
            raise ValueError(f"class_idx {class_idx} out of range for {logits.shape[1]} outputs")
        slicer = SliceCAMd(
            "image", net, layer, column=explained, method=method.lower(), slice_axis=slice_axis, normalize=False
        )
        maps = slicer.maps(x[0]).unsqueeze(0)
        maps = normalize_maps(maps)  # over the whole volume, so slices keep their relative weight
    probs = logits.float().softmax(1)[0].tolist() if logits.shape[1] > 1 and not _is_regression(metadata) else None
    pred = int(logits[0].argmax())
    stem = Path(image).name.split(".")[0]
    outdir = Path(out)
    nii = save_nifti(maps[0], outdir / f"{stem}_{method}.nii.gz", reference=img)
    png = overlay_png(img[0], maps[0, 0], outdir / f"{stem}_{method}.png", title=f"{method} {layer}: {stem}")
    summary = {
        "image": str(image),
        "layer": layer,
        "method": method,
        "explained_class": explained,
        "outputs": [float(v) for v in logits[0].tolist()],
        "prediction": pred,
        "prediction_name": names[pred] if pred < len(names) else str(pred),
        "probabilities": probs,
        "map": str(nii),
        "overlay": str(png),
    }
    write_json(summary, outdir / f"{stem}_{method}.json")
    print(
        f"{stem}: predicted {summary['prediction_name']}"
        + (f" (p={max(probs):.2f})" if probs else "")
        + f"; {method} map of {layer} -> {nii}, overlay -> {png}"
    )
    return summary


def synth(kind: str = "sos", n: int = 50, size: int | None = None, seed: int = 0, out: str = "cohort", **kwargs: Any):
    """Write a synthetic cohort (NIfTI + masks + datalist + labels CSV); see ``monai_gamverify.data.synth``."""
    from monai_gamverify.data.synthetic import synth as _synth

    return _synth(kind=kind, n=n, size=size, seed=seed, out=out, **kwargs)


def verify(reference: str, candidates: Any, dataset_dir: str, out: str = "verify_out", **kwargs: Any) -> None:
    """Is each candidate bundle suitable for the data? Grad-CAM (or feature-map) similarity to a reference bundle,
    Random-Forest verifier, cross-validated report (CSV/JSON/PNG/TensorBoard) in ``out``; see
    ``monai_gamverify.verification.bundles.verify_bundles``.

    Example:
        gamverify verify --reference bundles/sos_a --candidates '{"sos_b": "bundles/sos_b", "chin": "bundles/chin"}'
            --labels '{"sos_b": 1, "chin": 0}' --dataset_dir data/sos --out verify_out
    """
    from monai_gamverify.verification.bundles import verify_bundles

    verify_bundles(reference, candidates, dataset_dir, out=out, **kwargs)  # prints its own summary


def energy(
    energy: str | None = None,
    scores: str | None = None,
    out: str = "energy_out",
    bundle_root: str | None = None,
    datalist: str | None = None,
    split: str = "test",
    overrides: dict | str | None = None,
    **kwargs: Any,
) -> dict:
    """Attribution-energy analysis: AE vs scores per category, leave-one-out Spearman, CI, Holm, atypical cases.

    Either precomputed AE (a CSV ``id, <category>...`` or a folder of raw NIfTI maps) and a scores CSV
    (``monai_gamverify.energy.energy_report``), or a bundle and a datalist: the AE of the bundle's model is computed
    here, the scores come from ``scores`` or from the datalist entries (``energy_workflow.bundle_energy``).

    Example:
        gamverify energy ae.csv consensus.csv --out energy_out
        gamverify energy --bundle_root bundles/cbct_quality --datalist data/quality/datalist.json --out energy_out
    """
    if bundle_root is not None:
        from monai_gamverify.energy.workflow import bundle_energy

        if datalist is None:
            raise ValueError("--bundle_root needs --datalist (the volumes to explain)")
        if energy is not None:
            raise ValueError("give either an AE table/map folder or --bundle_root with --datalist, not both")
        if isinstance(overrides, str):
            overrides = json.loads(overrides)
        result = bundle_energy(bundle_root, datalist, out, split=split, scores=scores, overrides=overrides, **kwargs)
    else:
        from monai_gamverify.energy.analysis import energy_report

        if energy is None or scores is None:
            raise ValueError("give an AE CSV (or map folder) and a scores CSV, or --bundle_root and --datalist")
        result = energy_report(energy, scores, out, **kwargs)
    return {k: v for k, v in result.items() if k != "table"}


def demo(
    out: str = "demo_out",
    seed: int = 0,
    quick: bool = False,
    device: str | None = None,
    train: bool | None = None,
) -> str:
    """Run the whole package on synthetic data and write one report directory; returns the report's path.

    Cohorts, five small bundle models (shipped weights, or ``--train True`` to train them here), Grad-CAM
    explanations, verification (Methods 1 and 2), attribution energy and the K+1 garbage class; a self-contained
    ``report.html`` with CSV/JSON tables, NIfTI maps, PNG figures and TensorBoard logs. See
    ``monai_gamverify.apps.demo.run_demo`` and docs/demo.md.

    Example:
        gamverify demo --out demo_out
    """
    from monai_gamverify.apps.demo import run_demo

    return run_demo(out, seed=seed, quick=quick, device=device, train=train)["report"]


def cohort(data: str, out: str = "cohort_out", **kwargs: Any) -> dict:
    """Explain/verify every image of a cohort (datalist JSON, folder or glob): prediction, Grad-CAM NIfTI, attribution
    energy, similarity features and verdict per image. Resumable (rerun the same command), bad items are skipped and
    listed in errors.csv, items are split between processes under torchrun; see ``apps.cohort.run_cohort``
    and docs/cohort.md.

    Example:
        gamverify cohort data/sos/datalist.json --out cohort_out --bundle_root bundles/sos_staging
    """
    import sys

    from monai_gamverify.apps.cohort import CohortInterrupted, run_cohort

    try:
        result = run_cohort(data, out, **kwargs)
    except CohortInterrupted:
        sys.exit(130)  # run_cohort printed what is saved and how to resume
    return {k: result[k] for k in ("n_items", "n_succeeded", "n_failed", "out_dir")}


def version() -> str:
    """Package, MONAI and torch versions."""
    import monai
    import torch

    import monai_gamverify

    return f"monai-gamverify {monai_gamverify.__version__} (monai {monai.__version__}, torch {torch.__version__})"


def main() -> None:
    """Entry point of the ``gamverify`` console script."""
    import fire

    commands = {
        "demo": demo,
        "cam": cam,
        "cohort": cohort,
        "synth": synth,
        "verify": verify,
        "energy": energy,
        "version": version,
    }
    import sys

    argv = sys.argv[1:]
    # commands taking **kwargs would swallow --help as a keyword: hand it to fire as a flag instead
    if "--" not in argv and any(a in ("-h", "--help") for a in argv):
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--", "--help"]
    fire.Fire(commands, command=argv, name="gamverify")


if __name__ == "__main__":
    main()
