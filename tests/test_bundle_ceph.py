"""The ceph_class3 bundle end to end on a tiny synthetic cohort (64^2 cephalograms resized to 32^2, a 4-8-8 network)."""

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

from monai_gamverify.data.synthetic import make_cohort

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ceph_class3"
SCHEMA = REPO / "bundles" / "schema" / "meta_schema_20240725.json"
TINY = {"image_size": 32, "networks#convnext_attn_pico#widths": [4, 8, 8], "batch_size": 8}


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


def _run(root: Path, config: str | list[str], **overrides):
    from monai.bundle import run

    run(
        config_file=str(root / "configs" / config) if isinstance(config, str) else config,
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **TINY,
        **overrides,
    )


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ceph_cohorts")
    out = {}
    for kind in ("ceph", "ceph_chin"):
        info = make_cohort(kind, n=12, size=64 if kind == "ceph" else 32, seed=0, out_dir=base / kind, progress=False)
        assert all(info["splits"][k] > 0 for k in ("training", "validation", "test"))
        out[kind] = base / kind
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cohorts) -> Path:
    """A copy of the bundle trained for one epoch with the tiny override (CLI, as users run it)."""
    root = tmp_path_factory.mktemp("bundle") / "ceph_class3"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "data"))
    res = _bundle_run(
        root, "configs/train.json", {**TINY, "dataset_dir": str(cohorts["ceph"]), "num_epochs": 1, "val_interval": 1}
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "val_accuracy" in res.stdout + res.stderr and "val_f1" in res.stdout + res.stderr
    return root


def test_bundle_layout_and_metadata_offline():
    for rel in ("LICENSE", "docs/README.md", "models/.gitkeep", "configs/logging.conf"):
        assert (BUNDLE / rel).is_file(), rel
    for name in ("metadata", "train", "evaluate", "inference", "multi_gpu_train", "chin"):
        json.loads((BUNDLE / "configs" / f"{name}.json").read_text())
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "camouflage", "1": "surgery"}
    for config in ("train", "evaluate", "inference"):
        cfg = json.loads((BUNDLE / "configs" / f"{config}.json").read_text())
        assert cfg["class_names"] == ["camouflage", "surgery"]
        assert meta["gamverify"]["target_layer"] == cfg["cam_layers"][cfg["network_name"]]
    from monai_gamverify.networks.nets import convnext_attn_pico

    net = convnext_attn_pico(2, 1, 2)
    assert meta["gamverify"]["target_layer"] == net.cam_target_layer
    assert meta["gamverify"]["feature_layers"] == list(net.feature_layers)


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
    from monai.networks.nets import ResNet

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["network_name"] = "resnet18"
    assert isinstance(parser.get_parsed_content("network_def"), ResNet)
    assert parser.get_parsed_content("cam_layer") == "layer4"


@pytest.mark.slow
def test_train_outputs(trained):
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert "head.weight" in state and state["head.weight"].shape == (2, 8)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "eval" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train_cam/0", "val_cam/0"} <= set(tags["images"])
    assert {"train_loss", "lr", "val_accuracy", "val_f1"} <= set(tags["scalars"])


@pytest.mark.slow
def test_evaluate_and_inference(trained, cohorts):
    from monai_gamverify.data.datalist import load_datalist

    data = cohorts["ceph"]
    _run(trained, "evaluate.json", dataset_dir=str(data))
    test = load_datalist(data / "datalist.json", "test", check=False)
    table = pd.read_csv(trained / "eval" / "predictions_test.csv")
    assert list(table["label"]) == [e["label"] for e in test]
    metrics = dict(pd.read_csv(trained / "eval" / "metrics.csv", header=None).values)
    assert metrics["accuracy"] == pytest.approx((table["label"] == table["prediction"]).mean())
    assert 0.0 <= metrics["f1"] <= 1.0

    _run(trained, "inference.json", input_dir=str(data / "images"))
    table = pd.read_csv(trained / "eval" / "inference" / "predictions.csv")
    images = sorted((data / "images").glob("*.nii.gz"))
    assert list(table["id"]) == [p.name.split(".")[0] for p in images]
    probs = table[["prob_camouflage", "prob_surgery"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    for p in images[:3]:
        cam = nib.load(str(trained / "eval" / "inference" / "cams" / f"{p.name.split('.')[0]}_cam.nii.gz"))
        src = nib.load(str(p))
        assert cam.shape[:2] == src.shape[:2]  # inverted from 32^2 back onto the 64^2 input grid
        assert np.allclose(cam.affine, src.affine, atol=1e-4)


@pytest.mark.slow
def test_chin_variant(trained, cohorts, tmp_path):
    root = tmp_path / "chin"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    configs = [str(root / "configs" / "train.json"), str(root / "configs" / "chin.json")]
    _run(root, configs, dataset_dir=str(cohorts["ceph_chin"]), num_epochs=1, val_interval=1)
    assert (root / "models" / "chin" / "model.pt").is_file()
    assert not (root / "models" / "model.pt").exists()


@pytest.mark.slow
def test_load_bundle_and_gradcam(trained, cohorts):
    from monai_gamverify import GradCAM
    from monai_gamverify.bundle import load_bundle

    bm = load_bundle(trained, device="cpu", overrides={k: v for k, v in TINY.items() if k != "batch_size"})
    assert bm.class_names == ["camouflage", "surgery"] and bm.target_layer == "stages.2"
    x = bm.preprocessing()({"image": str(cohorts["ceph"] / "images" / "ceph_0000.nii.gz")})["image"]
    assert tuple(x.shape) == (1, 32, 32)
    maps = GradCAM(bm.network, bm.target_layer)(x.unsqueeze(0))
    assert maps.shape == (1, 1, 32, 32) and torch.isfinite(maps).all()


@pytest.mark.slow
def test_ckpt_export_torchscript(trained, tmp_path):
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts)]
    cmd += ["--ckpt_file", str(trained / "models" / "model.pt")]
    cmd += ["--meta_file", str(trained / "configs" / "metadata.json")]
    cmd += ["--config_file", str(trained / "configs" / "inference.json"), "--bundle_root", str(trained)]
    cmd += _cli_overrides({"networks#convnext_attn_pico#widths": [4, 8, 8]})
    res = subprocess.run(cmd, cwd=trained, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    from monai.data import load_net_with_metadata

    scripted, meta, _ = load_net_with_metadata(str(ts))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "surgery"
    from monai_gamverify.bundle import load_checkpoint
    from monai_gamverify.networks.nets import convnext_attn_pico

    eager = load_checkpoint(convnext_attn_pico(2, 1, 2, widths=(4, 8, 8)), trained / "models" / "model.pt")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), atol=1e-5)


@pytest.mark.slow
def test_multi_gpu_config_torchrun_gloo_cpu(trained, cohorts, tmp_path):
    root = tmp_path / "mgpu"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541"]
    res = _bundle_run(
        root,
        "['configs/train.json','configs/multi_gpu_train.json']",
        {**TINY, "dataset_dir": str(cohorts["ceph"]), "num_epochs": 1, "val_interval": 1},
        runner=runner,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP unwrapped when saved


# ------------------------------------------------------------------ bad input: one line naming the file
def _parse_data(dataset_dir: Path, key: str = "train#data", **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(dataset_dir), **overrides})
    return parser.get_parsed_content(key)


@pytest.mark.slow
def test_bad_input_cli_missing_dataset_dir(tmp_path):
    root = tmp_path / "b"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    res = _bundle_run(root, "configs/train.json", {**TINY, "dataset_dir": str(tmp_path / "nowhere"), "num_epochs": 1})
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("ERROR: dataset directory not found") and "nowhere" in err
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("case", ["empty", "corrupted", "wrong_dims", "missing_weights"])
def test_bad_input_names_the_file(tmp_path, cohorts, case):
    data = tmp_path / "data"
    shutil.copytree(cohorts["ceph"], data)
    content = json.loads((data / "datalist.json").read_text())
    first = data / content["training"][0]["image"]
    if case == "empty":
        (data / "datalist.json").write_text(json.dumps({**content, "training": []}))
        match = r"ERROR: datalist .*datalist.json has no entries under 'training'"
    elif case == "corrupted":
        first.write_bytes(first.read_bytes()[:100])
        match = rf"ERROR: cannot use image .*{first.name}"
    elif case == "wrong_dims":
        nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), str(first))
        match = rf"ERROR: image .*{first.name} has 3 spatial dimension"
    else:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "evaluate.json"))
        parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(data)})
        with pytest.raises(SystemExit, match=r"ERROR: trained weights not found: .*model.pt"):
            parser.get_parsed_content("initialize")
        return
    with pytest.raises(SystemExit, match=match):
        _parse_data(data)
