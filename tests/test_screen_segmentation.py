"""The in-distribution screen of a segmentation bundle (model-zoo form: UNet, SlidingWindowInferer): profile and
layout always, early layers through the bundle's inferer (averaged over its windows), no model pass when no detector
needs one; fit_screen / run_screen, the engine and the cohort give the same p-values."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from monai_gamverify import cli
from monai_gamverify.apps.cohort import run_cohort
from monai_gamverify.apps.pipeline import ImagePipeline
from monai_gamverify.apps.screening import fit_screen, run_screen, screen_engine, screen_record
from monai_gamverify.bundle import load_bundle
from monai_gamverify.screening import FeatureRecorder, Screen
from tests._zoo_bundles import SEG_NET, write_seg_bundle

SHAPE = (24, 22, 20)
AFFINE = np.diag([-0.8, 0.8, 1.2, 1.0])
EARLY = {"feature_layers": ["model.0"]}  # a bundle declaring an early layer (model-zoo bundles declare none)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def ct_volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """CT-like volume in HU: air around an ellipsoid body of soft tissue (about 40 % of the voxels, so that no
    percentile sits on the air/tissue edge) holding a brighter organ; position, size and levels vary a little."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    body = (((grid - centre) / (np.array(shape) * 0.45 * rng.uniform(0.95, 1.05, 3))) ** 2).sum(-1) <= 1
    organ = body & ((((grid - centre - rng.uniform(-3, 3, 3)) / 3.5) ** 2).sum(-1) <= 1)
    vol = rng.normal(-1000, 20, shape)
    vol[body] = rng.normal(40 + rng.uniform(-10, 10), 15, int(body.sum()))
    vol[organ] = rng.normal(120, 15, int(organ.sum()))
    return vol.astype(np.float32)


def _save(vol: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


def _dataset(folder: Path, seeds: range, splits: dict[str, range]) -> list[Path]:
    files = {s: _save(ct_volume(s), folder / "images" / f"ct_{s:03d}.nii.gz") for s in seeds}
    lists = {
        name: [{"image": f"images/{files[s].name}", "label": f"labels/{files[s].name}"} for s in part]
        for name, part in splits.items()
    }
    (folder / "datalist.json").write_text(json.dumps(lists))
    return [files[s] for s in seeds]


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A segmentation bundle, 20 fit + 20 calibration volumes (a datalist with training/validation and one more
    dataset), 10 new in-distribution volumes and three that are not: noise, constant, 4 mm voxels."""
    tmp = tmp_path_factory.mktemp("segscreen")
    root = write_seg_bundle(tmp / "bundle", fmt="json", seed=3)
    fit = _dataset(tmp / "ds", range(0, 30), {"training": range(0, 20), "validation": range(20, 30)})
    more = _dataset(tmp / "more", range(30, 40), {"training": range(30, 40)})
    new = [_save(ct_volume(s), tmp / "new" / f"ct_{s:03d}.nii.gz") for s in range(40, 50)]
    odd = {
        "noise": _save(np.random.default_rng(1).normal(0, 300, SHAPE).astype(np.float32), tmp / "odd" / "noise.nii"),
        "constant": _save(np.full(SHAPE, 40.0, np.float32), tmp / "odd" / "constant.nii"),
        "spacing": _save(ct_volume(99), tmp / "odd" / "spacing.nii", np.diag([-4.0, 4.0, 4.0, 1.0])),
    }
    return {"tmp": tmp, "root": root, "train": fit[:20], "cal": fit[20:] + more, "new": new, "odd": odd}


def _no_forward(module, args):
    raise AssertionError("the network must not run")


# ------------------------------------------------------------------------------------------------------ building
def test_from_bundle_detectors_and_no_model_pass(seg):
    bm = load_bundle(seg["root"])
    screen = Screen.from_bundle(bm)
    assert screen.task == "segmentation" and bm.target_layer is not None  # the bundle's CAM layer is not used
    assert (screen.head, screen.cam_layer, screen.garbage_index) == (None, None, None)
    assert screen.detectors == ["profile", "layout"] and not screen.needs_network
    assert screen.window == (-57.0, 164.0) and screen.modality == "CT" and screen.spatial_dims == 3
    early = Screen.from_bundle(load_bundle(seg["root"], overrides=EARLY))
    assert early.detectors == ["profile", "layout", "maha_early", "rmaha_early", "knn_early"] and early.needs_network
    # profile + layout only: fitted and scored without a single forward pass
    handle = bm.network.register_forward_pre_hook(_no_forward)
    try:
        engine = screen_engine(bm, screen)
        screen.fit([screen_record(engine, screen, f) for f in seg["train"]],
                   calibration=[screen_record(engine, screen, f) for f in seg["cal"]])  # fmt: skip
        obs = screen_record(engine, screen, seg["new"][0])
    finally:
        handle.remove()
    assert obs.early is None and obs.logits is None and obs.profile.layout is not None
    with pytest.raises(ValueError, match="segmentation screen has no classifier head"):
        Screen(task="segmentation", head="head")
    with pytest.raises(ValueError, match="task must be one of"):
        Screen(task="detection")
    with pytest.raises(ValueError, match="pass pool=True"):
        FeatureRecorder(bm.network, ["model.0"], reduce="mean")


def _pooled(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().double().flatten(2)
    return torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], 1)[0].numpy()


def test_early_features_are_the_mean_over_the_sliding_windows(seg):
    bm = load_bundle(seg["root"])
    net, layer = bm.network, bm.network.model[0]
    screen = Screen(task="segmentation", early_layers=["model.0"], window=(-57, 164))
    inferer = bm.inferer()
    assert isinstance(inferer, SlidingWindowInferer) and list(inferer.roi_size) == [16, 16, 16]
    x = torch.rand(1, 32, 16, 16)
    pipe = ImagePipeline.from_bundle(bm, screen=screen, invert=False)
    calls = []
    handle = net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        obs = pipe.observe_loaded(x, cam=False)
    finally:
        handle.remove()
    assert tuple(obs.logits.shape) == (2, 32, 16, 16) and calls == [2, 1]  # 3 windows, sw_batch_size 2
    # independent reference: overlap 0.5 puts the windows at 0, 8 and 16 along the first axis; each window's channel
    # means and stds, averaged with equal weight
    with torch.no_grad():
        ref = np.mean([_pooled(layer(x[None, :, s : s + 16])) for s in (0, 8, 16)], axis=0)
        whole = _pooled(layer(x[None]))
    np.testing.assert_allclose(obs.features["model.0"], ref, rtol=1e-5, atol=1e-7)
    assert not np.allclose(ref, whole, rtol=1e-3)  # the window average is not the whole-volume forward
    # the Seg-Grad-CAM passes do not change the recorded features (they come from the one no-grad pass)
    with_cam = pipe.observe_loaded(x)
    np.testing.assert_allclose(with_cam.features["model.0"], ref, rtol=1e-5, atol=1e-7)
    assert with_cam.raw_maps and with_cam.explained == [1]  # the default label: the first foreground channel


# ------------------------------------------------------------------------------------------------ fit and score
def test_fit_score_save_load(seg, tmp_path):
    bm = load_bundle(seg["root"], overrides=EARLY)
    screen = Screen.from_bundle(bm)
    engine = screen_engine(bm, screen)
    screen.fit([screen_record(engine, screen, f) for f in seg["train"]],
               calibration=[screen_record(engine, screen, f) for f in seg["cal"]])  # fmt: skip
    assert (screen.n_fit_, screen.n_cal_) == (20, 20)
    files = seg["new"] + list(seg["odd"].values())
    obs = [screen_record(engine, screen, f) for f in files]
    assert all(o.early is not None and o.early.shape == (8,) for o in obs[:10])  # 4 channels: means and stds
    rows = screen.score_observations(obs)
    accepted = [r["in_distribution"] for r in rows[:10]]
    assert sum(accepted) >= 8, [r["p_value"] for r in rows[:10]]
    noise, constant, spacing = rows[10:]
    assert not constant["in_distribution"] and constant["p_value"] == 0
    assert constant["reasons"] == ["constant volume (every voxel is 40)"]
    assert not noise["in_distribution"] and noise["p_value"] <= screen.alpha
    text = "; ".join(noise["reasons"])
    assert "29 % of voxels fall above the intensity window [-57, 164] (training: at most 0 %)" in text
    assert "early-layer features" in text
    assert not spacing["in_distribution"] and spacing["p_value"] <= screen.alpha
    assert spacing["reasons"][0] == "spacing 4 x 4 x 4 mm is outside the training range 0.8-1.2 mm"
    # save/load: the same settings and the same answers
    loaded = Screen.load(screen.save(tmp_path / "screen"))
    assert loaded.task == "segmentation" and loaded.detectors == screen.detectors
    for a, b in zip(rows, loaded.score_observations(obs)):
        assert a["p_value"] == b["p_value"] and a["reasons"] == b["reasons"]


def test_fit_screen_run_screen_cam_and_cohort_agree(seg, tmp_path):
    root, tmp = seg["root"], seg["tmp"]
    screen = fit_screen(root, tmp / "ds", tmp_path / "screen", EARLY, calibration_dirs=[tmp / "more"])
    assert screen.task == "segmentation" and screen.early_layers == ["model.0"]
    assert (screen.n_fit_, screen.n_cal_) == (20, 20)  # training list; validation list + the other dataset
    files = [str(f) for f in (*seg["new"][:2], seg["odd"]["noise"], seg["odd"]["constant"], seg["odd"]["spacing"])]
    run_screen(tmp_path / "screen", files, tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / "screen.csv").set_index("image")
    assert list(table["in_distribution"]) == [True, True, False, False, False]
    # the same screen in `gamverify cam` (one image) and in a cohort (batched in the writer thread); the engine
    # runs the network through the bundle's sliding window for the early features, as run_screen does
    kw = {"bundle_root": str(root), "overrides": json.dumps(EARLY), "screen": str(tmp_path / "screen")}
    one = cli.cam(files[2], out=str(tmp_path / "cam"), **kw)
    assert one["in_distribution"] is False and one["verdict"] == "out of distribution"
    assert one["p_value"] == pytest.approx(table.loc[files[2], "p_value"], rel=1e-6)
    res = run_cohort(files, tmp_path / "co", progress=False, feature_batch=2, **kw)
    assert res["n_succeeded"] == 5 and res["n_out_of_distribution"] == 3
    cohort = pd.read_csv(tmp_path / "co" / "results.csv").set_index("image")
    assert {"in_distribution", "p_value", "reasons", "verdict", "map_spleen"} <= set(cohort.columns)
    for f in files:
        assert bool(cohort.loc[f, "in_distribution"]) == bool(table.loc[f, "in_distribution"]), f
        assert cohort.loc[f, "p_value"] == pytest.approx(table.loc[f, "p_value"], rel=1e-6), f
        assert str(cohort.loc[f, "reasons"]) == str(table.loc[f, "reasons"]), f
        want = "unverified" if table.loc[f, "in_distribution"] else "out of distribution"
        assert cohort.loc[f, "verdict"] == want, f
    assert "constant volume" in cohort.loc[files[3], "reasons"]
    # a screen made for a classifier is refused, naming the mismatch
    with pytest.raises(ValueError, match="fitted for a classification model but it is used with a segmentation"):
        run_cohort(files, tmp_path / "co2", bundle_root=root, screen=Screen(), progress=False)


@pytest.mark.parametrize("kind", ["sigmoid", "single"])
def test_cam_default_label_follows_the_output_activation(tmp_path, kind):
    """`gamverify cam` on a segmentation bundle without --label explains the first foreground channel (as the cohort,
    MONAI Label and Deploy do): channel 0 of a sigmoid (multi-label) or single-channel output, never a hard-coded 1."""
    root = write_seg_bundle(tmp_path / "b", fmt="json", net={**SEG_NET, "out_channels": 1 if kind == "single" else 2})
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["postprocessing"]["transforms"] = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    if kind == "single":
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "tumour"}
        (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    image = _save(ct_volume(3, (16, 16, 16)), tmp_path / "ct.nii.gz")
    out = cli.cam(str(image), out=str(tmp_path / "cam"), bundle_root=str(root))
    assert out["label_index"] == 0 and out["label"] == ("tumour" if kind == "single" else "background")
    assert nib.load(out["map"]).shape == (16, 16, 16)
