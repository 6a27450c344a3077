"""The ``gamverify`` command (python-fire): ``gamverify demo|cam|cohort|synth|verify|energy|version``; ``--help``."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["main", "demo", "cam", "cohort", "synth", "verify", "energy", "version"]


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
    """Explain one image: write the map as NIfTI on the input's grid with its affine, a PNG overlay and a JSON.

    Give either a bundle (``--bundle_root``: its network, weights (or ``--checkpoint``), inference preprocessing and
    declared CAM layer) or a network by name (``--network resnet18 --network_args '{"spatial_dims": 3,
    "n_input_channels": 1, "num_classes": 5}' --checkpoint model.pt --layer layer4``). The work is done by
    ``monai_gamverify.apps.pipeline.ImagePipeline`` (the engine every command shares).

    Args:
        image: NIfTI (or any MONAI-readable) image, or a DICOM series directory.
        out: output directory.
        bundle_root: MONAI bundle directory.
        network: ``monai.networks.nets`` name or a dotted path to a network class.
        network_args: keyword arguments of the network (JSON string or dict).
        checkpoint: weights (``torch.load(weights_only=True)``); with a bundle it replaces ``models/model.pt``;
            without it a named network keeps random weights.
        layer: target layer (default: the bundle's declared layer).
        method: gradcam, gradcampp (gradcam++) or scorecam.
        class_idx: class (or output column) to explain; default: the predicted class.
        a_min: intensity window lower bound mapped to 0 (network-by-name only; e.g. -1000 for CBCT HU).
        a_max: intensity window upper bound mapped to 1.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        overrides: bundle config keys to override, as for ``monai.bundle run`` (e.g. ``'{"network_name":
            "small_cnn"}'`` for a bundle trained with ``--network_name small_cnn``).

    Returns:
        Summary dict (prediction, probabilities, energy, written files).
    """
    from monai_gamverify.apps.pipeline import ImagePipeline, image_stem
    from monai_gamverify.visualize.registry import cam_method

    method = cam_method(method)
    if bundle_root is not None:
        extra = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
        pipe = ImagePipeline.from_bundle(
            bundle_root, overrides=extra, checkpoint=checkpoint, target_layers=layer, method=method, device=device
        )
    elif network is not None:
        if not layer:
            raise ValueError("no target layer: pass --layer (names as in model.named_modules())")
        if checkpoint is None:
            print("warning: no --checkpoint given; the network keeps its random initial weights")
        pipe = ImagePipeline.from_network(
            network, layer, network_args=network_args, checkpoint=checkpoint, a_min=a_min, a_max=a_max,
            method=method, device=device,
        )  # fmt: skip
    else:
        raise ValueError("give --bundle_root or --network")
    result = pipe.run(image, out, name=f"{image_stem(image)}_{method}", class_idx=class_idx)
    summary = pipe.summary(result)
    probs = result.probabilities
    print(
        f"{image_stem(image)}: predicted {result.prediction_name}"
        + (f" (p={max(probs):.2f})" if probs else "")
        + f"; {method} map of {pipe.target_layers} -> {summary['map']}, overlay -> {summary['overlay']}"
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
    import logging

    from tqdm.auto import tqdm

    from monai_gamverify.apps.demo import run_demo

    class _Lines(logging.Handler):  # the demo logs its stage lines and summary; print them between the tqdm bars
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record))

    log = logging.getLogger("monai_gamverify.apps.demo")
    handler, level, propagate = _Lines(logging.INFO), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return run_demo(out, seed=seed, quick=quick, device=device, train=train)["report"]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def cohort_parser(prog: str = "gamverify cohort") -> argparse.ArgumentParser:
    """The one argument definition of a cohort run (``gamverify cohort`` and ``python -m monai_gamverify.apps.cohort``
    / ``torchrun -m monai_gamverify.apps.cohort``)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Explain/verify every image of a cohort; resumable (rerun the same command), skips and reports "
        "bad items, and splits the items between processes under torchrun. Exit codes: 0 all items succeeded, 1 some "
        "failed (errors.csv), 2 bad configuration, 3 out of device memory, 130 interrupted (rerun to resume).",
    )
    ap.add_argument("data", nargs="?", help="datalist JSON, image directory, glob pattern or file")
    ap.add_argument("--datalist", help="datalist JSON (decathlon style)")
    ap.add_argument("--images", help="image directory, glob pattern or file")
    ap.add_argument("--out", default="cohort_out", help="output directory (default: cohort_out)")
    ap.add_argument("--split", default="test", help="datalist list to run on (default: test)")
    ap.add_argument("--bundle_root", help="MONAI bundle directory")
    ap.add_argument("--overrides", help='bundle config overrides as JSON, e.g. \'{"network_name": "small_cnn"}\'')
    ap.add_argument("--network", help="network name (monai.networks.nets) or dotted class path, instead of a bundle")
    ap.add_argument("--network_args", help="network keyword arguments as JSON")
    ap.add_argument("--checkpoint", help="weights file (torch.load weights_only=True)")
    ap.add_argument("--layer", help="CAM target layer (default: the bundle's cam_layer)")
    ap.add_argument("--method", default="gradcam", help="gradcam, gradcampp (gradcam++) or scorecam")
    ap.add_argument("--a_min", type=float, help="intensity window lower bound (network mode)")
    ap.add_argument("--a_max", type=float, help="intensity window upper bound (network mode)")
    ap.add_argument("--spatial_dims", type=int, default=3, help="spatial axes expected (network mode, default 3)")
    ap.add_argument("--reference", help="reference map NIfTI (or its directory) for the similarity features")
    ap.add_argument("--verifier", help="fitted SuitabilityVerifier (.skops)")
    ap.add_argument("--threshold", type=float, default=0.5, help="P(suitable) threshold of the verdict")
    ap.add_argument("--no_invert", action="store_true", help="write maps on the preprocessed grid")
    ap.add_argument("--no_maps", action="store_true", help="do not write the NIfTI maps")
    ap.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    ap.add_argument("--overwrite", action="store_true", help="start again in a directory of another run")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    return ap


def cohort_main(argv: list[str] | None = None, prog: str = "gamverify cohort") -> int:
    """Run a cohort from command-line arguments (:func:`cohort_parser`); prints the outcome, returns the exit code.

    Returns:
        0 when every item succeeded, 1 when some failed (``errors.csv``), 2 on a bad configuration or input list,
        3 when the device ran out of memory, 130 when interrupted (finished items kept; rerun the same command).

    Example:
        $ torchrun --nproc_per_node=2 -m monai_gamverify.apps.cohort --images data/sos/images --out o \\
              --network monai_gamverify.networks.nets.SmallCNN --network_args '{"out_channels": 5}' --layer res4
    """
    import signal
    import sys

    import torch

    from monai_gamverify.apps.cohort import CohortInterrupted, CohortOutOfMemory, run_cohort
    from monai_gamverify.data.datalist import DataError

    ap = cohort_parser(prog)
    args = ap.parse_args(argv)
    sources = [v for v in (args.data, args.datalist, args.images) if v is not None]
    if len(sources) != 1:
        ap.error("give exactly one of DATA, --datalist or --images")
    if args.threads:
        torch.set_num_threads(args.threads)

    def _terminate(signum: int, frame: Any) -> None:  # torchrun and schedulers stop workers with SIGTERM
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_cohort(
            sources[0],
            args.out,
            bundle_root=args.bundle_root,
            overrides=args.overrides,
            network=args.network,
            network_args=args.network_args,
            checkpoint=args.checkpoint,
            layer=args.layer,
            method=args.method,
            a_min=args.a_min,
            a_max=args.a_max,
            spatial_dims=args.spatial_dims,
            reference=args.reference,
            verifier=args.verifier,
            threshold=args.threshold,
            split=args.split,
            invert=not args.no_invert,
            save_maps=not args.no_maps,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except CohortInterrupted as err:
        print(f"\n{err}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print("cohort run interrupted before any item; rerun the same command", file=sys.stderr, flush=True)
        return 130
    except CohortOutOfMemory as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return 3
    except (DataError, ValueError, FileNotFoundError, TypeError) as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result["rank"] == 0:
        failed = f", errors -> {result['files']['errors.csv']}" if result["n_failed"] else ""
        print(
            f"cohort: {result['n_succeeded']} succeeded, {result['n_failed']} failed (of {result['n_items']}); "
            f"results -> {result['files']['results.csv']}{failed}",
            flush=True,
        )
    return 0 if result["n_failed"] == 0 else 1


def cohort(*argv: str) -> int:
    """Explain/verify every image of a cohort (datalist JSON, folder or glob): prediction, CAM NIfTI, attribution
    energy, similarity features and verdict per image. Resumable (rerun the same command), bad items are skipped and
    listed in errors.csv, items are split between processes under torchrun; see docs/cohort.md and
    ``gamverify cohort --help`` for the flags. Exit codes: 0 all succeeded, 1 some items failed, 2 bad configuration,
    3 out of device memory, 130 interrupted.

    Example:
        gamverify cohort data/sos/datalist.json --out cohort_out --bundle_root bundles/sos_staging
    """
    return cohort_main(list(argv))


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
    if argv[:1] == ["cohort"]:  # argparse, not fire: the one parser shared with python -m monai_gamverify.apps.cohort
        sys.exit(cohort_main(argv[1:]))
    # commands taking **kwargs would swallow --help as a keyword: hand it to fire as a flag instead
    if "--" not in argv and any(a in ("-h", "--help") for a in argv):
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--", "--help"]
    fire.Fire(commands, command=argv, name="gamverify")


if __name__ == "__main__":
    main()
