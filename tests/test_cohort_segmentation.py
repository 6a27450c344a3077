"""A cohort of a segmentation bundle (model-zoo form, SlidingWindowInferer): one Seg-Grad-CAM map per label on the
input grid, per-label columns, resumable like a classification cohort."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from monai_gamverify import cli
from monai_gamverify.apps.cohort import run_cohort
from monai_gamverify.apps.cohort.command import main as cohort_main
from monai_gamverify.screening import Screen
from tests._zoo_bundles import write_seg_bundle


@pytest.fixture()
def seg_cohort(tmp_path):
    root = write_seg_bundle(tmp_path / "seg", fmt="yaml", seed=4)
    rng = np.random.default_rng(0)
    affine = np.diag([-0.8, 0.8, 1.2, 1.0])
    files = []
    for i in range(3):
        vol = rng.normal(50, 40, (24, 22, 20)).astype(np.float32)
        files.append(tmp_path / "images" / f"ct_{i}.nii.gz")
        files[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(vol, affine), str(files[-1]))
    return root, files, affine


def test_segmentation_cohort_maps_per_label_equal_cam_and_resume(seg_cohort, tmp_path, one_thread):
    root, files, affine = seg_cohort
    out = tmp_path / "co"
    res = run_cohort(tmp_path / "images", out, bundle_root=root, progress=False)
    assert res["n_succeeded"] == 3 and res["n_failed"] == 0
    table = pd.read_csv(out / "results.csv")
    assert {"voxels_spleen", "energy_spleen", "map_spleen"} <= set(table.columns)
    assert "prediction" not in table.columns and "map" not in table.columns
    assert set(res["labels"]) == {"spleen"}
    # the map of each item is the map `gamverify cam --label spleen` writes (same engine, same inverse)
    for f, rel in zip(sorted(files), table.sort_values("image")["map_spleen"]):
        single = cli.cam(str(f), out=str(tmp_path / "cam"), bundle_root=str(root), label="spleen")
        got, want = nib.load(out / rel), nib.load(single["map"])
        assert got.shape == (24, 22, 20)
        np.testing.assert_allclose(got.affine, affine, atol=1e-5)
        np.testing.assert_allclose(got.get_fdata(), want.get_fdata(), atol=1e-5)
    # resume: nothing recomputed; a damaged map is recomputed
    again = run_cohort(tmp_path / "images", out, bundle_root=root, progress=False)
    assert again["computed"] == 0 and again["skipped"] == 3
    (out / table["map_spleen"][0]).write_bytes(b"broken")
    third = run_cohort(tmp_path / "images", out, bundle_root=root, progress=False)
    assert third["computed"] == 1 and third["n_succeeded"] == 3


def test_segmentation_cohort_labels_and_errors(seg_cohort, tmp_path, one_thread, capsys):
    root, _, _ = seg_cohort
    # both channels by name and index through the command line; the background gets its own map
    code = cohort_main([str(tmp_path / "images"), "--bundle_root", str(root), "--out", str(tmp_path / "co"),
                        "--seg_labels", "background", "1", "--no_progress"])  # fmt: skip
    assert code == 0
    table = pd.read_csv(tmp_path / "co" / "results.csv")
    assert {"map_background", "map_spleen", "voxels_background"} <= set(table.columns)
    assert (table["voxels_background"] + table["voxels_spleen"] == 24 * 22 * 20).all()  # softmax argmax: a partition
    summary = json.loads((tmp_path / "co" / "summary.json").read_text())
    assert set(summary["labels"]) == {"background", "spleen"}
    code = cohort_main([str(tmp_path / "images"), "--bundle_root", str(root), "--out", str(tmp_path / "co2"),
                        "--seg_labels", "liver"])  # fmt: skip
    assert code == 2 and "unknown label 'liver'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="screen was fitted for a classification model"):  # segmentation: its own
        run_cohort(tmp_path / "images", tmp_path / "co3", bundle_root=root, screen=Screen(), progress=False)


def test_default_labels_follow_the_output_activation(tmp_path):
    """Default labels: every channel but the background of a softmax output, every channel of a sigmoid one."""
    from types import SimpleNamespace

    from monai_gamverify.apps.cohort.runner import segmentation_labels
    from monai_gamverify.bundle import load_bundle

    root = write_seg_bundle(tmp_path / "seg", fmt="json", weights=None)
    softmax = load_bundle(root, device="cpu", require_weights=False)
    assert segmentation_labels(SimpleNamespace(bundle=softmax), None) == [(1, "spleen")]
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["postprocessing"]["transforms"] = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    sigmoid = load_bundle(root, device="cpu", require_weights=False)
    assert segmentation_labels(SimpleNamespace(bundle=sigmoid), None) == [(0, "background"), (1, "spleen")]
    assert segmentation_labels(SimpleNamespace(bundle=sigmoid), ["spleen"]) == [(1, "spleen")]
