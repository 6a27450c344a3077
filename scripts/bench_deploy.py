"""PACS round trip of the Deploy route for a CT series: C-GET from a real Orthanc, the model (prediction, CAM, verdict),
the DICOM answer (Comprehensive SR + Secondary Capture overlay, one instance per slice) built and C-STOREd back.

    OMP_NUM_THREADS=1 python scripts/bench_deploy.py [--slices 128 --size 512] [--repeats 2] [--bundle sos_staging]

Starts Orthanc (Debian package ``orthanc``) on free loopback ports in a temporary folder (the helper of
``tests/test_pacs.py``), pushes a synthetic CT series (int16, 0.7 x 0.7 x 1.5 mm, oblique), warms the route up on a
small study (imports, first allocations), then times ``PacsRoute.process`` ``--repeats`` times and prints per run:
``read`` (C-GET + decoding into a volume), ``model`` (the pipeline: preprocessing, forward/backward, CAM inverse onto
the 512x512x128 grid, the NIfTI map and JSON), ``write`` (building the SR and the overlay series + C-STORE; both also
given apart), ``total``, the share of ``write``, and ``uptime``'s load average beside them. The bundle is
``bundles/sos_staging``'s configs with small untrained weights (``small_cnn``, width 8, 32^3 at 2.5 mm): the timing is
about the route, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


#: a small network on the sos_staging bundle: what the PACS round trip runs (its weights are seeded, not trained)
SMALL_BUNDLE = {"network_name": "small_cnn", "networks#small_cnn#width": 8, "roi_size": [32] * 3, "pixdim": [2.5] * 3}


def seeded_bundle(work: Path, seed: int = 0) -> tuple[Path, dict]:
    """A copy of the sos_staging bundle under ``work`` with seeded random weights, and its config overrides."""
    import torch

    from monai_gamverify.bundle import load_bundle

    bundle = work / "sos_staging"
    shutil.copytree(REPO / "bundles" / "sos_staging" / "configs", bundle / "configs")
    torch.manual_seed(seed)
    net = load_bundle(bundle, overrides=SMALL_BUNDLE, require_weights=False, device="cpu").network
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle, dict(SMALL_BUNDLE)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the runs here")
    args = parser.parse_args(argv)

    import torch
    from _dicom_study import ct_series
    from _orthanc import OrthancServer

    from monai_gamverify.apps.integrations.deploy import GamverifyRunner
    from monai_gamverify.apps.integrations.pacs import PacsRoute, parse_node, store_datasets

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        work = Path(tmp)
        bundle, overrides = seeded_bundle(work)
        runner = GamverifyRunner(bundle, work / "out", overrides=overrides, device="cpu")
        with OrthancServer(work / "orthanc") as orthanc:
            node = parse_node(orthanc.node)
            route = PacsRoute(runner, node)
            warm = ct_series(n=8, rows=64, cols=64, seed=1)
            store_datasets(node, warm, ae_title="GVTEST")
            route.process(str(warm[0].StudyInstanceUID))
            print(
                f"series: {args.slices} slices of {args.size}x{args.size} (int16), Orthanc {orthanc.node}", flush=True
            )
            runs = []
            for r in range(args.repeats):
                study = ct_series(n=args.slices, rows=args.size, cols=args.size, spacing=(0.7, 0.7), step=1.5,
                                  seed=10 + r)  # fmt: skip
                store_datasets(node, study, ae_title="GVTEST")
                uid = str(study[0].StudyInstanceUID)
                del study
                load_before = _load()
                t0 = time.perf_counter()
                summary = route.process(uid)
                wall = time.perf_counter() - t0
                if summary["status"] != "judged":
                    print(json.dumps(summary), file=sys.stderr)
                    return 1
                t = summary["times"]
                share = t["write"] / t["total"]
                runs.append(
                    {**t, "wall": wall, "write_share": share, "load_before": load_before, "load_after": _load()}
                )
                print(
                    f"run {r + 1}: total {t['total']:.2f} s | read {t['read']:.2f} | model {t['model']:.2f} | "
                    f"write {t['write']:.2f} (build {t['dicom_build']:.2f} + C-STORE {t['store']:.2f}) | "
                    f"write share {100 * share:.1f} % | stored {summary['stored']} | "
                    f"load average {load_before} -> {_load()}",
                    flush=True,
                )
        med = {k: statistics.median(r[k] for r in runs) for k in ("total", "read", "model", "write", "write_share")}
        print(f"median of {len(runs)}: total {med['total']:.2f} s, read {med['read']:.2f}, model {med['model']:.2f}, "
              f"write {med['write']:.2f} ({100 * med['write_share']:.1f} % of the total)")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
