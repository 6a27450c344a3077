"""The sos_staging bundle end to end on a tiny synthetic cohort (24^3 volumes resampled to 16^3, a 4-8-8 network)."""

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

from monai_gamverify.data.config import exit_on_error
from monai_gamverify.data.datalist import DataError, check_image, list_images, load_datalist, require_file
from monai_gamverify.data.synthetic import make_cohort

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sos_staging"
SCHEMA = REPO / "bundles" / "schema" / "meta_schema_20240725.json"
TINY = {
    "roi_size": [16, 16, 16],
    "pixdim": [2.5, 2.5, 2.5],
    "networks#convnext_attn_pico#widths": [4, 8, 8],
    "batch_size": 4,
}


def _cli_overrides(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]


def _env() -> dict:
    # faulthandler: a crash in a subprocess (e.g. in gloo teardown) shows its Python stack in the test output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _bundle_run(root: Path, configs: str, overrides: dict, runner: list[str] | None = None, timeout: int = 240):
    cmd = (runner or [sys.executable]) + ["-m", "monai.bundle", "run", "--config_file", configs]
    cmd += ["--bundle_root", str(root)] + _cli_overrides(overrides)
    return subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sos_cohort") / "sos"
    info = make_cohort("sos", n=20, size=24, seed=0, out_dir=out, progress=False)
    assert all(info["splits"][k] > 0 for k in ("training", "validation", "test"))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cohort) -> Path:
    """A copy of the bundle trained for one epoch with the tiny override (CLI, as users run it)."""
    root = tmp_path_factory.mktemp("bundle") / "sos_staging"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    res = _bundle_run(
        root, "configs/train.json", {**TINY, "dataset_dir": str(cohort), "num_epochs": 1, "val_interval": 1}
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "val_accuracy" in res.stdout + res.stderr and "val_f1" in res.stdout + res.stderr
    return root


def test_bundle_layout_and_metadata_offline():
    for rel in ("LICENSE", "docs/README.md", "models/.gitkeep", "configs/logging.conf"):
        assert (BUNDLE / rel).is_file(), rel
    for name in ("metadata", "train", "evaluate", "inference", "multi_gpu_train", "train_garbage", "inference_garbage"):
        json.loads((BUNDLE / "configs" / f"{name}.json").read_text())
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert [channel_def[str(i)] for i in range(5)] == train["class_names"]
    assert meta["gamverify"]["target_layer"] == train["cam_layers"][train["network_name"]]
    from monai_gamverify.networks.nets import convnext_attn_pico

    net = convnext_attn_pico(3, 1, 5)
    assert meta["gamverify"]["target_layer"] in dict(net.named_modules())  # keeps >= 6 voxels per axis at 32^3
    assert meta["gamverify"]["feature_layers"] == list(net.feature_layers)
    # an incomplete metadata fails against the shipped schema
    bad = dict(meta)
    del bad["network_data_format"]
    from monai.bundle import ConfigParser

    path = Path(SCHEMA).parent / ".bad_meta_test.json"
    try:
        ConfigParser.export_config_file(bad, str(path))
        with pytest.raises(ValueError, match="network_data_format"):
            verify_metadata(meta_file=str(path), filepath=str(SCHEMA))
    finally:
        path.unlink(missing_ok=True)


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(BUNDLE),
    )


def test_network_switch_by_name():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["network_name"] = "resnet18"
    parser["bundle_root"] = str(BUNDLE)
    from monai.networks.nets import ResNet

    assert isinstance(parser.get_parsed_content("network_def"), ResNet)
    assert parser.get_parsed_content("cam_layer") == "layer2"
    assert parser.get_parsed_content("feature_layers") == ["layer1", "layer2"]


@pytest.mark.slow
def test_train_outputs(trained):
    assert (trained / "models" / "model.pt").is_file()
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert "head.weight" in state  # a plain state dict
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "eval" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train_cam/0", "val_cam/0"} <= set(tags["images"])
    assert {"train_loss", "lr", "val_accuracy", "val_f1"} <= set(tags["scalars"])


@pytest.mark.slow
def test_evaluate_and_inference(trained, cohort):
    from monai.bundle import run

    common = {**TINY, "dataset_dir": str(cohort), "bundle_root": str(trained)}
    run(
        config_file=str(trained / "configs" / "evaluate.json"),
        meta_file=str(trained / "configs" / "metadata.json"),
        logging_file=str(trained / "configs" / "logging.conf"),
        **common,
    )
    test = load_datalist(cohort / "datalist.json", "test", check=False)
    table = pd.read_csv(trained / "eval" / "predictions_test.csv")
    assert len(table) == len(test)
    assert list(table["label"]) == [e["label"] for e in test]
    rows = (trained / "eval" / "metrics.csv").read_text().split()
    metrics = {k: float(v) for k, v in (r.replace("\t", ",").split(",") for r in rows)}
    assert metrics["test_accuracy"] == pytest.approx((table["label"] == table["prediction"]).mean())
    assert "test_f1" in metrics

    run(
        config_file=str(trained / "configs" / "inference.json"),
        meta_file=str(trained / "configs" / "metadata.json"),
        logging_file=str(trained / "configs" / "logging.conf"),
        **common,
        input_files=str(cohort / "images" / "sos_000*.nii.gz"),
    )
    table = pd.read_csv(trained / "eval" / "predictions.csv")
    images = sorted((cohort / "images").glob("sos_000*.nii.gz"))
    assert list(table["id"]) == [p.name.split(".")[0] for p in images]
    probs = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    assert probs.shape[1] == 5 and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert "prob_stage5_fused" in table.columns
    for p in images:
        cam = nib.load(str(trained / "eval" / "cams" / f"{p.name.split('.')[0]}_cam.nii.gz"))
        src = nib.load(str(p))
        assert cam.shape == src.shape  # back on the input's grid
        assert np.allclose(cam.affine, src.affine, atol=1e-4)
        assert 0.0 <= cam.get_fdata().min() and cam.get_fdata().max() <= 1.0 + 1e-6


@pytest.mark.slow
def test_load_bundle_and_gradcam(trained, cohort):
    from monai_gamverify import GradCAM
    from monai_gamverify.bundle import load_bundle

    bm = load_bundle(trained, device="cpu", overrides={k: v for k, v in TINY.items() if k != "batch_size"})
    assert bm.target_layer == "stages.1" and bm.class_names[0] == "stage1_open"
    x = bm.preprocessing()({"image": str(cohort / "images" / "sos_0000.nii.gz")})["image"]
    assert tuple(x.shape) == (1, 16, 16, 16)
    maps = GradCAM(bm.network, bm.target_layer)(x.unsqueeze(0))
    assert maps.shape == (1, 1, 16, 16, 16) and torch.isfinite(maps).all()


@pytest.mark.slow
def test_ckpt_export_torchscript(trained, tmp_path):
    from monai.bundle import ckpt_export

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=str(trained / "configs" / "metadata.json"),
        config_file=str(trained / "configs" / "inference.json"),
        bundle_root=str(trained),
        **{"networks#convnext_attn_pico#widths": [4, 8, 8]},
    )
    from monai.data import load_net_with_metadata

    scripted, meta, _ = load_net_with_metadata(str(ts))
    assert meta["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    from monai_gamverify.bundle import load_checkpoint
    from monai_gamverify.networks.nets import convnext_attn_pico

    eager = load_checkpoint(
        convnext_attn_pico(3, 1, 5, kernel_size=3, widths=(4, 8, 8)), trained / "models" / "model.pt"
    )
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), atol=1e-5)


@pytest.mark.slow
def test_multi_gpu_config_torchrun_gloo_cpu(trained, cohort, tmp_path):
    root = tmp_path / "mgpu"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    res = _bundle_run(
        root,
        "['configs/train.json','configs/multi_gpu_train.json']",
        {**TINY, "dataset_dir": str(cohort), "num_epochs": 1, "val_interval": 1},
        runner=runner,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (root / "models" / "model.pt").is_file()
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP unwrapped when saved


# ------------------------------------------------------------------ bad input
def _bad_run(tmp_path, dataset_dir) -> subprocess.CompletedProcess:
    root = tmp_path / "b"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    return _bundle_run(root, "configs/train.json", {**TINY, "dataset_dir": str(dataset_dir), "num_epochs": 1})


@pytest.mark.slow
def test_run_stops_on_missing_dataset_dir(tmp_path):
    res = _bad_run(tmp_path, tmp_path / "nowhere")
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("ERROR: dataset directory not found") and "nowhere" in err
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_run_stops_on_corrupted_file(tmp_path, cohort):
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    first = json.loads((data / "datalist.json").read_text())["training"][1]["image"]
    victim = data / first
    victim.write_bytes(victim.read_bytes()[:200])
    res = _bad_run(tmp_path, data)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("ERROR: cannot use image") and victim.name in err
    assert "Traceback" not in res.stderr


def test_datalist_errors_name_the_file(tmp_path, cohort):
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    dl = data / "datalist.json"
    with pytest.raises(DataError, match="dataset directory not found: .*missing"):
        load_datalist(dl, dataset_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="datalist not found: .*nope.json"):
        load_datalist(tmp_path / "nope.json")
    content = json.loads(dl.read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**content, "training": []}))
    with pytest.raises(DataError, match=r"empty.json has no entries under 'training'"):
        load_datalist(empty)
    assert load_datalist(empty, allow_empty=True) == []
    # a 2D image where a volume is expected
    flat = data / "images" / "sos_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24), np.int16), np.eye(4)), str(flat))
    with pytest.raises(DataError, match=r"sos_0001.nii.gz has 2 spatial dimension"):
        load_datalist(dl, "training" if "sos_0001" in dl.read_text() else "test")
    with pytest.raises(DataError, match=r"sos_0001.nii.gz has 2 spatial"):
        check_image(flat, spatial_dims=3)
    # a missing file
    shutil.copy(cohort / "images" / "sos_0001.nii.gz", flat)
    (data / "images" / "sos_0002.nii.gz").unlink()
    key = next(k for k in ("training", "validation", "test") if any("sos_0002" in e["image"] for e in content[k]))
    with pytest.raises(DataError, match=r"image file listed in .*not found: .*sos_0002.nii.gz"):
        load_datalist(dl, key)
    # labels out of range and missing
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": str(data / "images" / "sos_0000.nii.gz"), "label": 7}]}))
    with pytest.raises(DataError, match="label 7 is not a class index"):
        load_datalist(bad, num_classes=5)
    # through exit_on_error (what the configs call): one line, no traceback; the library itself raises
    with pytest.raises(SystemExit, match="ERROR: datalist not found"):
        exit_on_error(load_datalist, tmp_path / "nope.json")
    with pytest.raises(SystemExit, match="trained weights not found: .*model.pt"):
        exit_on_error(require_file, tmp_path / "model.pt", "trained weights")
    with pytest.raises(DataError, match="trained weights not found"):
        require_file(tmp_path / "model.pt", "trained weights")
    with pytest.raises(DataError, match="no file matches"):
        list_images(str(tmp_path / "*.nrrd"))
    assert [Path(e["image"]).name for e in list_images(data / "images", check="exists")][:1] == ["sos_0000.nii.gz"]


def test_training_writes_the_passport(trained):
    """train.json records what it trained with (the overrides included), the validation confidences and the screen;
    metadata.json describes the trained network; load_bundle applies the passport without the overrides repeated."""
    from monai_gamverify.bundle import load_bundle, read_passport

    passport = read_passport(trained)
    s = passport["settings"]
    assert s["roi_size"] == TINY["roi_size"] and s["pixdim"] == TINY["pixdim"] and s["num_classes"] == 5
    assert s["network_name"] == "convnext_attn_pico" and passport["cam_layer"] == "stages.1"
    conf = passport["val_conf"]
    assert len(conf["max_prob"]) == len(conf["correct"]) > 0 and all(0 < p <= 1 for p in conf["max_prob"])
    meta = json.loads((trained / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["4"] == "stage5_fused"
    bm = load_bundle(trained, device="cpu", overrides={"networks#convnext_attn_pico#widths": [4, 8, 8]})
    assert bm.parser.get_parsed_content("roi_size") == TINY["roi_size"]  # from the passport, not repeated
    assert bm.passport["val_conf"] == conf
