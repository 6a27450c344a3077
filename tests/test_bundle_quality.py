"""The cbct_quality bundle end to end on a tiny synthetic cohort (32^3 volumes, 32^2 slices, a width-4 SmallCNN)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from monai_gamverify.data.synthetic import QUALITY_CATEGORIES, make_cohort

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cbct_quality"
SCHEMA = REPO / "bundles" / "schema" / "meta_schema_20240725.json"
TINY = {"image_size": 32, "networks#small_cnn#width": 4, "slices_per_volume": 4, "batch_size": 16}


def _cli_overrides(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]


def _env() -> dict:
    # faulthandler: a crash in a subprocess (e.g. in gloo teardown) shows its Python stack in the test output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(root: Path, config: str, **overrides):
    from monai.bundle import run

    run(
        config_file=str(root / "configs" / config),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **{**TINY, **overrides},
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality_cohort") / "quality"
    make_cohort("quality", n=14, size=32, seed=0, out_dir=out, progress=False)
    content = json.loads((out / "datalist.json").read_text())
    # the evaluate test needs >= 4 test volumes for the leave-one-out table: move some training items to "test"
    content["test"] = content["test"] + content["training"][:5]
    content["training"] = content["training"][5:]
    assert content["validation"] and len(content["test"]) >= 5
    (out / "datalist.json").write_text(json.dumps(content))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cohort) -> Path:
    """A copy of the bundle trained for one epoch with the tiny override (CLI, as users run it)."""
    root = tmp_path_factory.mktemp("bundle") / "cbct_quality"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "data"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json"]
    cmd += ["--bundle_root", str(root)]
    cmd += _cli_overrides({**TINY, "dataset_dir": str(cohort), "num_epochs": 1, "val_interval": 1})
    res = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "val_mae_overall" in res.stdout + res.stderr
    return root


def test_bundle_layout_and_metadata_offline():
    for rel in ("LICENSE", "docs/README.md", "models/.gitkeep", "configs/logging.conf"):
        assert (BUNDLE / rel).is_file(), rel
    for name in ("metadata", "train", "evaluate", "inference", "multi_gpu_train"):
        json.loads((BUNDLE / "configs" / f"{name}.json").read_text())
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channel_def[str(i)] for i in range(5)] == list(QUALITY_CATEGORIES)
    for config in ("train", "evaluate", "inference"):
        cfg = json.loads((BUNDLE / "configs" / f"{config}.json").read_text())
        assert cfg["categories"] == list(QUALITY_CATEGORIES)
        assert meta["gamverify"]["target_layer"] == cfg["cam_layers"][cfg["network_name"]]


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(BUNDLE),
    )


@pytest.mark.slow
def test_train_slices_and_tensorboard(trained, cohort):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(trained / "configs" / "train.json"))
    parser.update({"bundle_root": str(trained), "dataset_dir": str(cohort), **TINY, "check_data": "exists"})
    item = parser.get_parsed_content("train#dataset")[0]
    assert len(item) == 4 and tuple(item[0]["image"].shape) == (1, 32, 32)  # 4 axial 2D slices per volume
    assert item[0]["label"].shape == (5,)
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert state["head.weight"].shape == (5, 16)  # SmallCNN width 4: 4 -> 8 -> 16 channels
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "eval" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "train_cam/0" in tags["images"]
    assert {"train_loss", "lr", "val_mae", "val_mae_overall", "val_spearman_parotid"} <= set(tags["scalars"])


@pytest.mark.slow
def test_evaluate_writes_energy_table_and_plots(trained, cohort):
    _run(trained, "evaluate.json", dataset_dir=str(cohort), n_boot=50)
    out = trained / "eval" / "energy_test"
    test = json.loads((cohort / "datalist.json").read_text())["test"]
    vol = pd.read_csv(out / "volume_scores.csv")
    assert vol["id"].tolist() == [e["id"] for e in test]
    for c in QUALITY_CATEGORIES:
        assert np.allclose(vol[f"consensus_{c}"], [e[c] for e in test], atol=1e-5)
        # raw Grad-CAM is ReLU'd, so AE >= 0; after one tiny epoch a category's map may be all zero
        assert (vol[f"ae_{c}"] >= 0).all()
    assert (vol[[f"ae_{c}" for c in QUALITY_CATEGORIES]].to_numpy() > 0).any(axis=1).all()
    reg = pd.read_csv(out / "regression_metrics.csv").set_index("category")
    err = (vol["pred_overall"] - vol["consensus_overall"]).abs().mean()
    assert reg.loc["overall", "mae"] == pytest.approx(err, rel=1e-4)
    table = pd.read_csv(out / "energy_table.csv").set_index("category")
    # a category whose AE is constant (e.g. all-zero maps after one tiny epoch) has no rho: skipped with a warning
    usable = [c for c in QUALITY_CATEGORIES if vol[f"ae_{c}"].nunique() > 1]
    assert list(table.index) == usable and len(usable) >= 1
    for c in usable:
        rho = stats.spearmanr(vol[f"ae_{c}"], vol[f"consensus_{c}"]).statistic
        assert table.loc[c, "rho"] == pytest.approx(rho, abs=1e-6)
    for c in usable:
        assert (out / f"energy_scatter_{c}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "energy_atypical.csv").is_file() and (out / "energy_loo.csv").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "eval" / "tensorboard"))
    acc.Reload()
    assert {"test_ae_rho_overall", "test_ae_median_loo_rho_parotid", "test_mae_larynx"} <= set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_evaluate_energy_matches_library(trained, cohort):
    """The AE written by evaluate.json equals volume_energy_multi of the bundle's network on the same volume."""
    from monai_gamverify import GradCAM
    from monai_gamverify.bundle import load_bundle
    from monai_gamverify.energy.attribution import volume_energy_multi

    out = trained / "eval" / "energy_test" / "volume_scores.csv"
    if not out.is_file():
        _run(trained, "evaluate.json", dataset_dir=str(cohort), n_boot=50)
    vol = pd.read_csv(out)
    bm = load_bundle(trained, device="cpu", overrides=TINY)
    first = json.loads((cohort / "datalist.json").read_text())["test"][0]
    x = bm.preprocessing()({"image": str(cohort / first["image"])})["image"]
    cols = {c: i for i, c in enumerate(QUALITY_CATEGORIES)}
    ae = volume_energy_multi(GradCAM(bm.network, bm.target_layer), x, cols, progress=False)
    for c in QUALITY_CATEGORIES:
        assert vol.loc[0, f"ae_{c}"] == pytest.approx(ae[c], rel=1e-3)


@pytest.mark.slow
def test_gamverify_energy_from_bundle_and_datalist(trained, cohort, tmp_path):
    """`gamverify energy --bundle_root --datalist`: the same AE as evaluate.json, scores from the datalist entries,
    the same table as energy_report on those two CSVs; bad combinations of arguments are refused."""
    from monai_gamverify import cli
    from monai_gamverify.energy import energy_report

    out = trained / "eval" / "energy_test" / "volume_scores.csv"
    if not out.is_file():
        _run(trained, "evaluate.json", dataset_dir=str(cohort), n_boot=50)
    vol = pd.read_csv(out)
    res = cli.energy(
        out=str(tmp_path / "e"), bundle_root=str(trained), datalist=str(cohort / "datalist.json"),
        overrides=json.dumps(TINY), n_boot=50, progress=False, device="cpu",
    )  # fmt: skip
    assert res["n"] == len(vol)
    ae, sc = pd.read_csv(res["ae"]), pd.read_csv(res["scores"])
    assert ae["id"].tolist() == vol["id"].tolist()
    for c in QUALITY_CATEGORIES:
        assert np.allclose(ae[c], vol[f"ae_{c}"], rtol=1e-4)
        assert np.allclose(sc[c], vol[f"consensus_{c}"], atol=1e-5)
    ref = energy_report(res["ae"], res["scores"], tmp_path / "ref", n_boot=50, progress=False, plots=False)
    table = pd.read_csv(tmp_path / "e" / "energy_table.csv")
    assert np.allclose(table["rho"], pd.DataFrame(ref["table"])["rho"], equal_nan=True)
    with pytest.raises(ValueError, match="needs --datalist"):
        cli.energy(bundle_root=str(trained), out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="AE CSV"):
        cli.energy(out=str(tmp_path / "x"))
    bare = tmp_path / "bare.json"  # entries without scores and no scores CSV
    entries = [
        {"image": str(cohort / e["image"]), "id": e["id"]}
        for e in json.loads((cohort / "datalist.json").read_text())["test"]
    ]
    bare.write_text(json.dumps({"test": entries}))
    with pytest.raises(ValueError, match="no score for"):
        cli.energy(
            out=str(tmp_path / "y"), bundle_root=str(trained), datalist=str(bare), overrides=TINY, progress=False
        )


@pytest.mark.slow
def test_inference_scores_and_slice_cams(trained, cohort):
    images = sorted((cohort / "images").glob("*.nii.gz"))[:3]
    _run(trained, "inference.json", input_dir=str(cohort / "images" / "quality_000[0-2].nii.gz"))
    table = pd.read_csv(trained / "eval" / "inference" / "volume_scores.csv")
    assert list(table["id"]) == [p.name.split(".")[0] for p in images]
    assert {f"pred_{c}" for c in QUALITY_CATEGORIES} | {f"ae_{c}" for c in QUALITY_CATEGORIES} <= set(table.columns)
    for p in images:
        cam = nib.load(str(trained / "eval" / "inference" / "cams" / f"{p.name.split('.')[0]}_cam_overall.nii.gz"))
        src = nib.load(str(p))
        assert cam.shape == src.shape and np.allclose(cam.affine, src.affine, atol=1e-4)


@pytest.mark.slow
def test_gamverify_cam_explains_a_volume_slice_by_slice(trained, cohort, tmp_path):
    """`gamverify cam --bundle_root` on the 2D-slice bundle: slice-wise CAM stacked into a map aligned with the volume,
    outputs = the slice predictions averaged (as the bundle's inferer does), no softmax on regression scores."""
    from monai_gamverify import GradCAM, cli
    from monai_gamverify.bundle import load_bundle
    from monai_gamverify.energy.workflow import SliceAggregateInferer

    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    summary = cli.cam(
        str(image), out=str(tmp_path), bundle_root=str(trained), overrides=TINY, class_idx=4, device="cpu"
    )
    cam = nib.load(summary["map"])
    src = nib.load(str(image))
    assert cam.shape == (32, 32, 32) and np.allclose(cam.affine, src.affine, atol=1e-4)
    assert summary["explained_class"] == 4
    assert summary["probabilities"] is None and len(summary["outputs"]) == len(QUALITY_CATEGORIES)
    bm = load_bundle(trained, device="cpu", overrides=TINY)
    x = bm.preprocessing()({"image": str(image)})["image"]
    with torch.no_grad():
        expected = SliceAggregateInferer(spatial_dim=2)(x.unsqueeze(0), bm.network)[0]
    assert np.allclose(summary["outputs"], expected.numpy(), atol=1e-5)
    # independent reference: plain GradCAM of each axial slice, raw, stacked, min-max over the volume
    gc = GradCAM(bm.network, bm.target_layer)
    raw = torch.stack([gc(x[None, ..., k], class_idx=4, normalize=False)[0, 0] for k in range(x.shape[-1])], -1)
    ref = (raw - raw.min()) / (raw.max() - raw.min()) if raw.max() > raw.min() else torch.zeros_like(raw)
    # the preprocessing resamples to image_size = input size, so the map is on the input's own grid
    assert np.allclose(np.asarray(cam.dataobj), ref.numpy(), atol=1e-4)


@pytest.mark.slow
def test_ckpt_export_torchscript(trained, tmp_path):
    from monai.bundle import ckpt_export
    from monai.data import load_net_with_metadata

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=str(trained / "configs" / "metadata.json"),
        config_file=str(trained / "configs" / "inference.json"),
        bundle_root=str(trained),
        **{"networks#small_cnn#width": 4},
    )
    scripted, meta, _ = load_net_with_metadata(str(ts))
    from monai_gamverify.bundle import load_checkpoint
    from monai_gamverify.networks.nets import SmallCNN

    eager = load_checkpoint(SmallCNN(2, 1, 5, width=4), trained / "models" / "model.pt")
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), atol=1e-5)


@pytest.mark.parametrize("case", ["missing_dir", "empty", "corrupted", "wrong_dims"])
def test_bad_input_names_the_file(tmp_path, cohort, case):
    from monai.bundle import ConfigParser

    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    content = json.loads((data / "datalist.json").read_text())
    first = data / content["training"][0]["image"]
    if case == "missing_dir":
        data, match = tmp_path / "nowhere", r"ERROR: dataset directory not found: .*nowhere"
    elif case == "empty":
        (data / "datalist.json").write_text(json.dumps({**content, "training": []}))
        match = r"ERROR: datalist .*datalist.json has no entries under 'training'"
    elif case == "corrupted":
        first.write_bytes(first.read_bytes()[:100])
        match = rf"ERROR: cannot use image .*{first.name}"
    else:  # a single 2D slice where a volume is expected
        nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(first))
        match = rf"ERROR: image .*{first.name} has 2 spatial dimension"
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(data)})
    with pytest.raises(SystemExit, match=match):
        parser.get_parsed_content("train#data")


@pytest.mark.slow
def test_multi_gpu_config_torchrun_gloo_cpu(trained, cohort, tmp_path):
    root = tmp_path / "mgpu"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]
    cmd += ["--bundle_root", str(root)]
    cmd += _cli_overrides({**TINY, "dataset_dir": str(cohort), "num_epochs": 1, "val_interval": 1})
    res = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP unwrapped when saved


def test_screen_fit_and_run_on_the_slice_wise_bundle(tmp_path):
    """`gamverify screen fit` on the shipped cbct_quality bundle (a 2D regressor applied slice by slice, list labels):
    the engine observes whole volumes (features averaged over the slices), one class, and the screen runs."""
    from monai_gamverify.apps.screening import fit_screen, run_screen
    from monai_gamverify.bundle import load_bundle

    make_cohort("quality", n=24, size=32, seed=1, out_dir=tmp_path / "q", progress=False)
    tiny = {"image_size": 16, "networks#small_cnn#width": 4}
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.save(load_bundle(BUNDLE, overrides=tiny, require_weights=False).network.state_dict(), tmp_path / "w.pt")
    screen = fit_screen(BUNDLE, tmp_path / "q", tmp_path / "screen", tiny, alpha=0.2, checkpoint=tmp_path / "w.pt",
                        calibration_splits=["validation", "test"])  # fmt: skip
    assert screen.spatial_dims == 3 and screen.observation_["slice_axis"] == 2 and screen.n_cal_ >= 4
    assert {"maha_penultimate", "knn_early", "attention"} <= set(screen.detectors)
    items = json.loads((tmp_path / "q" / "datalist.json").read_text())["test"][:2]
    df = run_screen(tmp_path / "screen", [str(tmp_path / "q" / e["image"]) for e in items], tmp_path / "run")
    assert len(df) == 2 and not df["error"].astype(bool).any() and df["p_value"].between(0, 1).all()
