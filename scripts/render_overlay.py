"""The screenshot of docs/integrations.md: the Secondary Capture overlay series as a viewer shows it, after a real
PACS round trip (Orthanc on loopback, the PACS route, the instances read back through Orthanc's REST API).

    OMP_NUM_THREADS=1 python scripts/render_overlay.py [--out docs/img/pacs_overlay.png]

The study is a synthetic CT phantom (48 slices of 128x128, 1.2 x 0.9 mm pixels, 2.5 mm slices: a body ellipse,
a bright asymmetric block and two rods); the bundle is sos_staging's configs with small untrained weights, so the map
shows where this network looks, not a finding. Frames are drawn with matplotlib (Agg, no display) at the
PixelSpacing aspect, beside the source slice they cover: the three frames the map covers most.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def phantom(n: int = 48, size: int = 128, seed: int = 0) -> np.ndarray:
    """(slice, row, column) stored values (HU + 1024)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    hu = np.full(z.shape, -1000.0)
    hu[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = 40.0  # body
    hu[((x - 0.3) / 0.12) ** 2 + ((y + 0.1) / 0.12) ** 2 < 1] = 700.0  # a rod (bone)
    hu[((x + 0.45) / 0.08) ** 2 + ((y - 0.2) / 0.08) ** 2 < 1] = 250.0  # a second rod
    block = (np.abs(x + 0.1) < 0.2) & (np.abs(y - 0.25) < 0.12) & (np.abs(z) < 0.5)
    hu[block] = 180.0
    hu += rng.normal(0, 15, hu.shape)
    return np.clip(hu + 1024, 0, 4000).astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "pacs_overlay.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _dicom_study import ct_series
    from _orthanc import OrthancServer
    from bench_deploy import seeded_bundle

    from monai_gamverify.apps.integrations.deploy import GamverifyRunner
    from monai_gamverify.apps.integrations.pacs import PacsRoute, parse_node, store_datasets

    with tempfile.TemporaryDirectory(prefix="render_overlay_") as tmp:
        work = Path(tmp)
        bundle, overrides = seeded_bundle(work)
        study = ct_series(volume=phantom(), spacing=(1.2, 0.9), step=2.5, oblique=False, description="phantom CT")
        with OrthancServer(work / "orthanc") as orthanc:
            node = parse_node(orthanc.node)
            store_datasets(node, study, ae_title="GVTEST")
            runner = GamverifyRunner(bundle, work / "out", overrides=overrides, device="cpu")
            summary = PacsRoute(runner, node).process(str(study[0].StudyInstanceUID))
            back = orthanc.instances(str(study[0].StudyInstanceUID))
        sc = sorted((d for d in back if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"), key=lambda d: d.InstanceNumber)
        src = {str(d.SOPInstanceUID): d for d in back if d.Modality == "CT"}
        colored = [int((d.pixel_array.astype(int).std(axis=-1) > 0).sum()) for d in sc]  # pixels under the map
        picks = [sc[i] for i in sorted(np.argsort(colored)[-3:])]  # the three frames the map covers most
        fig, axes = plt.subplots(2, len(picks), figsize=(3.3 * len(picks), 6.4))
        for j, d in enumerate(picks):
            ref = src[str(d.SourceImageSequence[0].ReferencedSOPInstanceUID)]
            row, col = (float(v) for v in d.PixelSpacing)
            hu = ref.pixel_array * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
            axes[0, j].imshow(hu, cmap="gray", vmin=-160, vmax=240, aspect=row / col)
            axes[0, j].set_title(f"CT instance {ref.InstanceNumber}", fontsize=9)
            axes[1, j].imshow(d.pixel_array, aspect=row / col)
            axes[1, j].set_title(f"SC overlay {d.InstanceNumber}/{len(sc)} (z {float(d.ImagePositionPatient[2]):.1f})",
                                 fontsize=9)  # fmt: skip
            for ax in axes[:, j]:
                ax.set_axis_off()
        verdict = summary.get("verdict")
        fig.suptitle(f"PACS round trip: Secondary Capture overlay series (series {d.SeriesNumber}, {len(sc)} "
                     f"instances) beside its source; verdict '{verdict}'", fontsize=10)  # fmt: skip
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}; {summary['stored']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
