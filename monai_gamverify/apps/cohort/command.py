"""The command line of a cohort run: one argument definition (:func:`cohort_parser`) and one entry point
(:func:`main`) shared by ``gamverify cohort`` and ``python -m monai_gamverify.apps.cohort`` /
``torchrun -m monai_gamverify.apps.cohort``. The only module of the cohort app that prints: it reports the outcome on
stdout/stderr and returns the exit code (the library, :func:`~monai_gamverify.apps.cohort.run_cohort`, logs and
raises).

Exit codes: 0 every item succeeded; 1 some items failed (``errors.csv``); 2 bad configuration or input list; 3 out of
device memory (finished items kept); 130 interrupted (finished items kept: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import torch

from monai_gamverify.apps.cohort.runner import CohortInterrupted, CohortOutOfMemory, run_cohort
from monai_gamverify.apps.commandline import CommandParser, add_deprecated_alias
from monai_gamverify.data.datalist import DataError

__all__ = ["cohort_parser", "main", "EXIT_CODES"]

#: exit code -> meaning
EXIT_CODES = {
    0: "every item succeeded",
    1: "some items failed (errors.csv)",
    2: "bad configuration or input list",
    3: "out of device memory (finished items kept)",
    130: "interrupted (finished items kept; rerun the same command to resume)",
}


def cohort_parser(prog: str = "gamverify cohort") -> argparse.ArgumentParser:
    """The one argument definition of a cohort run (``gamverify cohort`` and ``python -m monai_gamverify.apps.cohort``
    / ``torchrun -m monai_gamverify.apps.cohort``); a mistyped flag is one ``ERROR:`` line and exit code 2."""
    ap = CommandParser(
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
    ap.add_argument("--method", default=None, help="gradcam, gradcampp (gradcam++) or scorecam (default: the bundle's)")
    ap.add_argument("--a_min", type=float, help="intensity window lower bound (network mode)")
    ap.add_argument("--a_max", type=float, help="intensity window upper bound (network mode)")
    ap.add_argument("--spatial_dims", type=int, default=3, help="spatial axes expected (network mode, default 3)")
    ap.add_argument("--reference", help="reference map NIfTI (or its directory) for the similarity features")
    ap.add_argument("--verifier", help="fitted SuitabilityVerifier (.skops)")
    ap.add_argument("--screen", help="saved in-distribution screen (gamverify screen fit): rows get p_value, reasons")
    ap.add_argument("--seg_labels", nargs="+", help="segmentation bundles: labels to explain (names or channels; "
                    "default: every label but the background)")  # fmt: skip
    add_deprecated_alias(ap, "--labels", "--seg_labels", nargs="+")  # its name until 0.1: one word per meaning now
    ap.add_argument("--threshold", type=float, default=0.5, help="P(suitable) threshold of the verdict")
    ap.add_argument("--no_invert", action="store_true", help="write maps on the preprocessed grid")
    ap.add_argument("--no_maps", action="store_true", help="do not write the NIfTI maps")
    ap.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    ap.add_argument("--overwrite", action="store_true", help="start again in a directory of another run")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    return ap


def main(argv: list[str] | None = None, prog: str = "gamverify cohort") -> int:
    """Run a cohort from command-line arguments (:func:`cohort_parser`); prints the outcome, returns the exit code.

    Returns:
        0 when every item succeeded, 1 when some failed (``errors.csv``), 2 on a bad configuration or input list,
        3 when the device ran out of memory, 130 when interrupted (finished items kept; rerun the same command).

    Example:
        $ torchrun --nproc_per_node=2 -m monai_gamverify.apps.cohort --images data/sos/images --out o \\
              --network monai_gamverify.networks.nets.SmallCNN --network_args '{"out_channels": 5}' --layer res4
    """
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
            screen=args.screen,
            labels=args.seg_labels,
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
