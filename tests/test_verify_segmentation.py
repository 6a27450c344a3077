"""Verification of segmentation bundles (issue 17): each bundle's map is the Seg-Grad-CAM of one label through its own
SlidingWindowInferer; the similarity features, the verifier and the one-class mode run unchanged on those maps."""

from __future__ import annotations

import json
import logging
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from _zoo_bundles import write_cls_bundle, write_seg_bundle

from monai_gamverify.bundle import load_bundle
from monai_gamverify.metrics.similarity import DEFAULT_METRICS
from monai_gamverify.verification.bundles import check_same_task, verify_bundles
from monai_gamverify.verification.workflow import SegmentationTarget, map_fn
from monai_gamverify.visualize.featuremaps import FeatureMap
from monai_gamverify.visualize.segcam import bundle_segmentation_cam

N_IMAGES, SIZE = 8, 24
BUNDLES = ("ref", "a1", "a2", "b1", "b2", "ref2")  # seeds 0..5: tiny UNets, random weights
CLS3D = {
    "_target_": "DenseNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "init_features": 4,
    "growth_rate": 4,
    "block_config": [2, 2],
    "bn_size": 2,
}


def _cohort(root):
    """Random CT-like volumes (HU in the bundles' window) with a brighter box at a random place; a datalist."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N_IMAGES):
        vol = rng.uniform(-80, 60, (SIZE, SIZE, SIZE)).astype(np.float32)
        a, b, c = rng.integers(2, SIZE - 12, 3)
        vol[a : a + 10, b : b + 10, c : c + 10] += 120
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / f"ct_{i}.nii.gz"))
        entries.append({"image": f"ct_{i}.nii.gz", "subject": f"s{i}"})
    (root / "datalist.json").write_text(json.dumps({"test": entries}))
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segverify")
    bundles = {name: write_seg_bundle(tmp / name, fmt="json", seed=seed) for seed, name in enumerate(BUNDLES)}
    return {"tmp": tmp, "data": _cohort(tmp / "ct"), **bundles}


def _image(zoo, i=0):
    bm = load_bundle(zoo["ref"], device="cpu")
    return bm, bm.preprocessing()({"image": str(zoo["data"] / f"ct_{i}.nii.gz")})["image"][None]


def test_map_fn_of_segmentation_target_is_seg_grad_cam(zoo, one_thread):
    bm, x = _image(zoo)
    target = SegmentationTarget(bm, "spleen")
    assert (target.index, target.name, target.default) == (1, "spleen", False)
    got = map_fn(target, bm.target_layer, "gradcam", None)(x)
    want, logits = bundle_segmentation_cam(bm, x, "spleen", layer=bm.target_layer, method="gradcam", normalize=True)
    torch.testing.assert_close(got, want)
    assert got.shape == (1, 1, SIZE, SIZE, SIZE) and float(got.max()) == pytest.approx(1.0)
    assert bool((logits.argmax(1) == 1).any())  # spleen is predicted somewhere: the map is not the empty-mask zero map
    # default label = channel 1 (softmax output, channel 0 = background); by index = by name; another label differs
    default = SegmentationTarget(bm)
    assert (default.index, default.default) == (1, True)
    torch.testing.assert_close(map_fn(default, bm.target_layer, "gradcam", None)(x), got)
    background = map_fn(SegmentationTarget(bm, 0), bm.target_layer, "gradcam", None)(x)
    assert not torch.allclose(background, got)
    # gradcam++ spelled as the registry allows; featuremap = the network's feature maps
    pp = map_fn(target, bm.target_layer, "gradcam++", None)(x)
    torch.testing.assert_close(pp, bundle_segmentation_cam(bm, x, 1, method="gradcampp")[0])
    fm = map_fn(target, "model.0", "featuremap", None)
    assert isinstance(fm, FeatureMap) and fm.model is bm.network
    with pytest.raises(ValueError, match="spleen"):
        SegmentationTarget(bm, "liver")


def _kwargs(zoo, **kw):
    base = {
        "reference": str(zoo["ref"]),
        "candidates": {n: str(zoo[n]) for n in ("a1", "a2", "b1", "b2")},
        "dataset_dir": str(zoo["data"]),
        "labels": {"a1": 1, "a2": 1, "b1": 0, "b2": 0},
        "n_splits": 2,
        "n_estimators": 10,
        "progress": False,
        "device": "cpu",
    }
    return {**base, **kw}


def test_verify_segmentation_bundles_end_to_end(zoo, one_thread, caplog):
    out = zoo["tmp"] / "report"
    with caplog.at_level(logging.INFO, logger="monai_gamverify.verification.bundles"):
        report = verify_bundles(out=str(out), **_kwargs(zoo))
    assert "label 'spleen' (channel 1) (default" in caplog.text
    table = pd.read_csv(out / "features.csv")
    assert len(table) == N_IMAGES * 4 and set(table["model"]) == {"a1", "a2", "b1", "b2"}
    assert table.groupby("model")["label"].first().to_dict() == {"a1": 1, "a2": 1, "b1": 0, "b2": 0}
    feats = [c for c in table.columns if any(c.endswith(m) for m in DEFAULT_METRICS)]
    assert len(feats) >= len(DEFAULT_METRICS) and table[feats].notna().all().all()
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert set(verdicts["model"]) == {"a1", "a2", "b1", "b2"} and verdicts["verdict"].notna().all()
    assert report["protocol"] == "leave-models-out" and set(report["per_model"]) == {"a1", "a2", "b1", "b2"}
    # the label is recorded: report, candidates, cv.json, summary
    assert report["task"] == "segmentation"
    assert report["candidates"]["b1"]["seg_label"] == "spleen" and report["candidates"]["b1"]["seg_label_index"] == 1
    cv = json.loads((out / "cv.json").read_text())
    assert cv["models"]["a1"]["seg_label"] == "spleen" and cv["reference_target"]["seg_label_index"] == 1
    assert "Seg-Grad-CAM of label spleen (channel 1)" in report["summary"]
    # the reference map is the mean of the reference bundle's Seg-Grad-CAMs, computed here directly
    bm = load_bundle(zoo["ref"], device="cpu")
    pre = bm.preprocessing()
    maps = [
        bundle_segmentation_cam(bm, pre({"image": str(zoo["data"] / f"ct_{i}.nii.gz")})["image"][None], 1)[0]
        for i in range(N_IMAGES)
    ]
    want = torch.stack([m.as_tensor()[0, 0] for m in maps]).double().mean(0).numpy()
    np.testing.assert_allclose(nib.load(str(out / "reference_map.nii.gz")).get_fdata(), want, atol=1e-5)


def test_verify_segmentation_one_class(zoo, one_thread):
    out = zoo["tmp"] / "report_oc"
    report = verify_bundles(
        out=str(out),
        **_kwargs(
            zoo,
            candidates={"a1": str(zoo["a1"]), "b1": str(zoo["b1"])},
            labels=None,
            one_class=True,
            references={"ref2": str(zoo["ref2"])},
            alpha=0.5,
            label="spleen",
            max_items=4,
        ),
    )
    cv = json.loads((out / "cv.json").read_text())
    assert cv["one_class"] and cv["params"]["references"] == ["reference", "ref2"]
    assert cv["models"]["ref2"]["seg_label"] == "spleen" and cv["models"]["b1"]["role"] == "candidate"
    assert len(pd.read_csv(out / "features.csv")) == 4 * 3 * 2  # per candidate: its set of 3 models x 4 samples
    for name in ("a1", "b1"):
        assert report["per_model"][name]["p_value"] in (pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)
    assert report["seg_labels"]["reference"] == "spleen (channel 1)"
    assert "one-class" in report["summary"] and "Seg-Grad-CAM of label spleen" in report["summary"]


def test_segmentation_label_and_task_errors(zoo, one_thread):
    with pytest.raises(ValueError, match=r"reference bundle .*unknown label 'liver'.*\['background', 'spleen'\]"):
        verify_bundles(**_kwargs(zoo, label="liver"))
    with pytest.raises(ValueError, match="out of range"):
        verify_bundles(**_kwargs(zoo, label=5))
    # a 3D classification candidate among segmentation bundles: refused at load time, naming which is which
    cls = write_cls_bundle(zoo["tmp"] / "cls3d", fmt="json", net=CLS3D, spatial_shape=[SIZE] * 3)
    assert load_bundle(cls, device="cpu").task == "classification"
    with pytest.raises(ValueError, match=r"cannot be verified in one run.*classification: candidate 'b2'"):
        verify_bundles(**_kwargs(zoo, candidates={"a1": str(zoo["a1"]), "a2": str(zoo["a2"]), "b1": str(zoo["b1"]),
                                                  "b2": str(cls)}))  # fmt: skip
    # a classification reference takes no label
    with pytest.raises(ValueError, match="classification bundle"):
        verify_bundles(**_kwargs(zoo, reference=str(cls), label="spleen"))
    assert check_same_task({"reference": "segmentation", "candidate 'x'": "segmentation"}) == "segmentation"
    with pytest.raises(ValueError, match="segmentation: reference; classification: candidate 'x'|classification: "):
        check_same_task({"reference": "segmentation", "candidate 'x'": "classification"})


def test_cli_passes_label(monkeypatch, capsys):
    """``gamverify verify --label spleen`` reaches verify_bundles (python-fire keeps the name a string)."""
    import monai_gamverify.verification.bundles as vb
    from monai_gamverify import cli

    seen = {}

    def fake(reference, candidates, dataset_dir, out="verify_out", **kw):
        seen.update(kw, reference=reference)
        return {"summary": "ok"}

    monkeypatch.setattr(vb, "verify_bundles", fake)
    for value, want in (("spleen", "spleen"), ("1", 1)):
        argv = ["gamverify", "verify", "--reference", "r", "--candidates", '{"a": "b"}', "--dataset_dir", "d",
                "--labels", '{"a": 1}']  # fmt: skip
        monkeypatch.setattr(sys, "argv", [*argv, "--label", value])
        cli.main()
        assert seen["label"] == want and type(seen["label"]) is type(want)
    assert "ok" in capsys.readouterr().out
