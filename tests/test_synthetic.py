"""Tests for monai_gamverify.data.synthetic: determinism, balance, anatomy of masks, raters, files, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monai_gamverify.data.synthetic import (
    KINDS,
    QUALITY_CATEGORIES,
    QUALITY_REGIONS,
    generate,
    make_cohort,
    stratified_split,
    summary_line,
    synth,
)

SMALL = {"sos": 32, "chin": 24, "cvm": 24, "quality": 32, "ceph": 64, "ceph_chin": 32}
# (kind, expected image ndim) - 2D and 3D kinds in one list
CASES = [(k, 2 if k.startswith("ceph") else 3) for k in KINDS]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind,ndim", CASES)
def test_determinism_shapes_and_balance(kind, ndim):
    a = generate(kind, n=6, size=SMALL[kind], seed=3)
    b = generate(kind, n=6, size=SMALL[kind], seed=3)
    c = generate(kind, n=6, size=SMALL[kind], seed=4)
    assert a.images.shape == (6,) + (SMALL[kind],) * ndim and a.images.dtype == np.float32
    assert a.masks.shape == a.images.shape and a.masks.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)
    assert np.isfinite(a.images).all()
    assert all((m > 0).any() for m in a.masks), "every subject has a non-empty mask"
    if kind != "quality":
        counts = np.bincount(a.labels, minlength=len(a.meta["class_names"]))
        assert counts.max() - counts.min() <= 1
    # a subject depends on (seed, index), not on the cohort size
    d = generate(kind, n=3, size=SMALL[kind], seed=3)
    if kind == "quality":
        np.testing.assert_array_equal(d.images, a.images[:3])


def test_sos_masks_on_synchondrosis_and_stages():
    c = generate("sos", n=30, size=40, seed=0)
    stage = c.labels + 1
    assert c.meta["mask_labels"] == {"plate": 1, "subchondral_plates": 2}
    assert all(set(np.unique(m)) == {0, 1, 2} for m in c.masks)
    med = np.array([np.median(img[m == 1]) for img, m in zip(c.images, c.masks)])
    # stage 1: open cartilage plate (~100 HU, raised by partial volume of the bony borders), stage 5: bone
    assert np.all(med[stage == 1] < 400), med[stage == 1]
    assert np.all(med[stage == 5] > 600), med[stage == 5]
    # fusion is progressive: the median HU inside the mask rises with the stage
    means = [med[stage == s].mean() for s in range(1, 6)]
    assert all(np.diff(means) > 0), means
    # the subchondral bone plates (label 2) are bone at every stage (cortical while the plate is open, trabecular
    # once bridged), despite partial volume with the cartilage next to them
    sub = np.array([np.median(img[m == 2]) for img, m in zip(c.images, c.masks)])
    assert np.all(sub > 500), sub
    # the junction zone (mask > 0) is outlined at every stage, fused or not: its size does not depend on the stage
    frac = np.array([(m > 0).mean() for m in c.masks])
    assert frac[stage == 1].mean() / frac[stage == 5].mean() < 1.5
    # the mask lies between the two bones: its neighbourhood is dense bone, not air or soft tissue
    for img, m in zip(c.images[:5], c.masks[:5]):
        assert np.percentile(img[m > 0], 90) > 300
    # HU ranges of the phantom
    assert c.images.min() <= -900 and 1000 < c.images.max() < 2000
    assert (c.table["fused_fraction"][stage == 1] == 0).all() and (c.table["fused_fraction"][stage == 5] == 1).all()


def test_sos_rotate_changes_only_pose():
    a = generate("sos", n=4, size=32, seed=1)
    b = generate("sos", n=4, size=32, seed=1, rotate=30)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, b.images)
    # same anatomy: the mask keeps roughly its volume under rotation
    ratio = b.masks.reshape(4, -1).sum(1) / a.masks.reshape(4, -1).sum(1)
    assert np.all((ratio > 0.7) & (ratio < 1.3)), ratio


@pytest.mark.parametrize("kind,lo", [("chin", 500), ("cvm", 450)])
def test_bone_masks_lie_on_bone(kind, lo):
    c = generate(kind, n=6, size=32, seed=2)
    for img, m in zip(c.images, c.masks):
        assert np.median(img[m > 0]) > lo
        assert np.median(img[m == 0]) < 200


def test_cvm_levels_and_ceph_labels():
    c = generate("cvm", n=6, size=32, seed=0)
    assert all(set(np.unique(m)) == {0, 1, 2, 3} for m in c.masks)
    p = generate("ceph", n=10, size=64, seed=0)
    anb = p.table["anb_deg"].to_numpy()
    assert np.all(anb[p.labels == 1] < -4.5) and np.all(anb[p.labels == 0] >= -3.5)
    assert np.allclose(p.table["snb_deg"] - p.table["sna_deg"], -anb, atol=1e-2)
    # the mandible is brighter than the background of the radiograph
    for img, m in zip(p.images, p.masks):
        assert img[m > 0].mean() > img[m == 0].mean()


def test_quality_consensus_and_regions():
    c = generate("quality", n=8, size=32, seed=5)
    t = c.table
    w = np.asarray(c.meta["raters"]["weight"])
    assert len(w) == 5 and np.isclose(w.sum(), 1.0, atol=1e-5)
    for j, cat in enumerate(QUALITY_CATEGORIES):
        scores = t[[f"rater{r}_{cat}" for r in range(1, 6)]].to_numpy()
        assert scores.min() >= 1 and scores.max() <= 5 and np.issubdtype(scores.dtype, np.integer)
        np.testing.assert_allclose(t[f"consensus_{cat}"], scores @ w / w.sum(), atol=1e-6)
        np.testing.assert_allclose(c.labels[:, j], t[f"consensus_{cat}"], atol=1e-6)
    assert set(np.unique(c.masks)) == {0, *QUALITY_REGIONS.values()}
    # mandible mask is bone; parotid mask is soft tissue (before artifacts dominate)
    for img, m in zip(c.images, c.masks):
        assert np.median(img[m == QUALITY_REGIONS["mandible"]]) > 400
        assert abs(np.median(img[m == QUALITY_REGIONS["parotid"]])) < 250


def test_quality_true_score_tracks_artifacts():
    c = generate("quality", n=24, size=32, seed=0)
    t = c.table
    from scipy.stats import spearmanr

    # more noise -> worse submandibular quality; more metal -> worse mandible quality
    assert spearmanr(t["sev_noise"], t["true_submandibular"])[0] < -0.3
    assert spearmanr(t["sev_metal"] + t["sev_noise"], t["true_mandible"])[0] < -0.3
    assert t["true_overall"].between(1, 5).all()


def test_stratified_split():
    strata = np.repeat([0, 1, 2], 20)
    split = np.array(stratified_split(strata, seed=0))
    for s in range(3):
        vals, counts = np.unique(split[strata == s], return_counts=True)
        assert dict(zip(vals, counts)) == {"training": 14, "validation": 3, "test": 3}
    assert stratified_split(strata, seed=0) == stratified_split(strata, seed=0)
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(strata, fractions=(0.5, 0.5))


@pytest.mark.parametrize("kind", ["sos", "quality", "ceph_chin"])
def test_make_cohort_files_byte_identical(tmp_path, kind):
    n, size = 6, SMALL[kind]
    s1 = make_cohort(kind, n=n, size=size, seed=7, out_dir=tmp_path / "a", progress=False)
    make_cohort(kind, n=n, size=size, seed=7, out_dir=tmp_path / "b", progress=False)
    make_cohort(kind, n=n, size=size, seed=8, out_dir=tmp_path / "c", progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files_a) == 2 * n + 3
    for rel in files_a:
        assert _sha(tmp_path / "a" / rel) == _sha(tmp_path / "b" / rel), rel
    assert _sha(tmp_path / "a" / "images" / f"{kind}_0000.nii.gz") != _sha(
        tmp_path / "c" / "images" / f"{kind}_0000.nii.gz"
    )
    assert sum(s1["splits"].values()) == n
    dl = json.loads((tmp_path / "a" / "datalist.json").read_text())
    entries = dl["training"] + dl["validation"] + dl["test"]
    assert len(entries) == n and {"image", "mask", "label", "id"} <= set(entries[0])
    table = pd.read_csv(tmp_path / "a" / "labels.csv")
    assert len(table) == n
    if kind == "quality":
        assert len(entries[0]["label"]) == 5
        assert {f"rater{j}_overall" for j in range(1, 6)} <= set(table.columns)


def test_datalist_loads_and_affine_round_trip(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage

    spacing = (0.8, 0.9, 1.1)
    make_cohort("sos", n=5, size=24, seed=0, out_dir=tmp_path, spacing=spacing, progress=False)
    items = load_decathlon_datalist(str(tmp_path / "datalist.json"), data_list_key="training")
    assert items and Path(items[0]["image"]).is_file() and Path(items[0]["mask"]).is_file()
    img = LoadImage(image_only=True, ensure_channel_first=True)(items[0]["image"])
    mask = LoadImage(image_only=True, ensure_channel_first=True)(items[0]["mask"])
    aff = np.asarray(img.affine)
    np.testing.assert_allclose(np.diag(aff)[:3], spacing, atol=1e-5)
    np.testing.assert_allclose(aff[:3, 3], -(24 - 1) / 2 * np.asarray(spacing), atol=1e-4)  # centred ROI
    np.testing.assert_allclose(np.asarray(mask.affine), aff)
    assert tuple(img.shape) == (1, 24, 24, 24)
    # stored int16 HU equals the in-memory phantom
    c = generate("sos", n=5, size=24, seed=0, spacing=spacing)
    idx = int(items[0]["id"].split("_")[1])
    np.testing.assert_array_equal(img[0].numpy(), c.images[idx])
    assert int(items[0]["label"]) == int(c.labels[idx])


def test_ceph_2d_round_trip(tmp_path):
    import nibabel as nib

    make_cohort("ceph", n=2, size=64, seed=0, out_dir=tmp_path, progress=False)
    im = nib.load(str(tmp_path / "images" / "ceph_0000.nii.gz"))
    assert im.shape == (64, 64)
    np.testing.assert_allclose(im.header.get_zooms(), (240 / 64, 240 / 64), atol=1e-5)
    np.testing.assert_array_equal(im.get_fdata(dtype=np.float32), generate("ceph", n=2, size=64, seed=0).images[0])


def test_synth_summary_is_logged_not_printed(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="monai_gamverify.data.synthetic"):
        s = synth(kind="chin", n=4, size=24, seed=0, out=str(tmp_path / "chin"), progress=False)
    assert s["n"] == 4 and s["label_counts"] == {0: 2, 1: 2}
    assert capsys.readouterr().out == ""  # library code does not print; the CLI prints summary_line
    assert summary_line(s) in caplog.text and summary_line(s).startswith("wrote 4 chin subjects (24^3")


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"kind": "knee", "n": 2}, ValueError, "sos, chin, cvm"),
        ({"kind": "sos", "n": 0}, ValueError, "positive"),
        ({"kind": "sos", "n": -3}, ValueError, "positive"),
        ({"kind": "sos", "n": 2, "size": 12}, ValueError, "too small"),
        ({"kind": "ceph", "n": 2, "size": 32}, ValueError, "too small"),
        ({"kind": "sos", "n": 2, "size": 24, "spacing": -1.0}, ValueError, "spacing"),
        ({"kind": "sos", "n": 2, "size": 24.5}, TypeError, "integer"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        generate(**kwargs)


def test_unwritable_output(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OSError, match="not a directory"):
        make_cohort("sos", n=2, size=24, out_dir=f, progress=False)
    if os.name == "posix" and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OSError):
                make_cohort("sos", n=2, size=24, out_dir=ro / "sub", progress=False)
        finally:
            ro.chmod(0o700)
