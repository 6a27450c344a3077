"""Resumable, fault-tolerant, multi-process cohort runs: point a model at a folder or datalist of images and get,
per image, the prediction, the CAM (NIfTI aligned with the input), the attribution energy and, with a reference map
and a fitted verifier, the similarity features and a suitability verdict. Every item goes through the single-image
engine (:mod:`monai_gamverify.apps.pipeline`).

Modules: :mod:`.items` (what to run on), :mod:`.distributed` (``torchrun`` processes), :mod:`.outdir` (``run.json``,
per-item results and their validation on resume, the final tables), :mod:`.runner` (:func:`run_cohort`),
:mod:`.command` (the command line).

Every item's result is written atomically (``out/items/<id>.json``, ``out/maps/<id>_cam.nii.gz``); a restarted run
skips items whose result and map are valid, so a run killed at any point is finished by running the same command
again. A bad item is recorded in ``out/errors.csv`` and the run goes on; a device out-of-memory error stops the run.
Under ``torchrun`` the items are split between the processes like ``DistributedSampler`` (without padding) and rank 0
writes ``out/results.csv`` and ``out/summary.json``, identical to a single-process run.

Command line (one parser, :func:`.command.cohort_parser`; the same flags and exit codes either way)::

    gamverify cohort data/sos/datalist.json --out o --bundle_root bundles/sos_staging
    python -m monai_gamverify.apps.cohort --bundle_root bundles/sos_staging --datalist data/sos/datalist.json --out o
    torchrun --nproc_per_node=2 -m monai_gamverify.apps.cohort --bundle_root ... --datalist ... --out o

Exit codes: 0 every item succeeded; 1 some items failed (listed in ``errors.csv``); 2 bad configuration or input
list; 3 out of device memory; 130 interrupted (finished items kept: rerun the same command to resume).
"""

from __future__ import annotations

from monai_gamverify.apps.cohort.distributed import shard
from monai_gamverify.apps.cohort.items import cohort_items
from monai_gamverify.apps.cohort.outdir import RUN_FORMAT, results_table
from monai_gamverify.apps.cohort.runner import CohortInterrupted, CohortOutOfMemory, run_cohort

__all__ = [
    "run_cohort",
    "cohort_items",
    "shard",
    "results_table",
    "CohortInterrupted",
    "CohortOutOfMemory",
    "RUN_FORMAT",
]
