from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_gamverify import cli
from monai_gamverify.bundle import load_checkpoint, network_from_name
from monai_gamverify.io import atomic_path, load_image, save_nifti, write_json
from monai_gamverify.visualize.plots import overlay_png

NET_ARGS = {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 5, "widen_factor": 0.25}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("sos")
    cli.synth(kind="sos", n=3, size=24, seed=0, out=str(out), progress=False)
    return out


def test_cam_command_writes_aligned_map_png_json(cohort, tmp_path):
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    net = network_from_name("resnet10", NET_ARGS)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    summary = cli.cam(
        str(image),
        out=str(tmp_path / "out"),
        network="resnet10",
        network_args=json.dumps(NET_ARGS),
        checkpoint=str(tmp_path / "w.pt"),
        layer="layer2",
        a_min=-1000,
        a_max=1500,
        device="cpu",
    )
    written = nib.load(summary["map"])
    src = nib.load(str(image))
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-5)
    assert written.shape == src.shape
    data = written.get_fdata()
    assert 0.0 <= data.min() and data.max() <= 1.0
    assert (tmp_path / "out" / f"{image.name.split('.')[0]}_gradcam.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / f"{image.name.split('.')[0]}_gradcam.json").read_text())["layer"] == "layer2"
    assert len(summary["probabilities"]) == 5


def test_cam_command_bad_input(cohort, tmp_path):
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    with pytest.raises(ValueError, match="unknown method"):
        cli.cam(str(image), network="resnet10", network_args=NET_ARGS, layer="layer2", method="lime")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        cli.cam(str(tmp_path / "missing.nii.gz"), network="resnet10", network_args=NET_ARGS, layer="layer2")
    with pytest.raises(ValueError, match="bundle_root or --network"):
        cli.cam(str(image))
    with pytest.raises(ValueError, match="unknown layer name"):
        cli.cam(str(image), network="resnet10", network_args=NET_ARGS, layer="layer9", out=str(tmp_path))


def test_load_image_errors(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        load_image(bad)
    nan = tmp_path / "nan.nii.gz"
    arr = np.zeros((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    with pytest.raises(ValueError, match="NaN"):
        load_image(nan)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "table.json"
    write_json({"a": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_save_nifti_2d_and_bad_shape(tmp_path):
    out = save_nifti(torch.rand(1, 10, 12), tmp_path / "m.nii.gz")
    assert nib.load(str(out)).shape == (10, 12)
    with pytest.raises(ValueError, match="spatial"):
        save_nifti(np.zeros((2, 3, 4, 5, 6)), tmp_path / "bad.nii.gz")


def test_checkpoint_refuses_code(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = tmp_path / "evil.pt"
    torch.save({"model": net.state_dict(), "obj": np.random.default_rng(0)}, path)  # not a plain tensor container
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(net, path)


@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 16)])
def test_overlay_png(tmp_path, shape):
    img = torch.rand(shape)
    cam = torch.zeros(shape)
    cam[(slice(2, 5),) * len(shape)] = 1.0
    path = overlay_png(img, cam, tmp_path / "o.png", mask=cam > 0.5, title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="differs"):
        overlay_png(img, torch.zeros(3, 3), tmp_path / "x.png")


@pytest.mark.parametrize("argv", [["synth", "--help"], ["energy", "-h"], ["--help"]])
def test_help_prints_usage_not_a_traceback(argv):
    import subprocess
    import sys

    env = {"PAGER": "cat", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "monai_gamverify.cli", *argv], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert ("FLAGS" if argv[0] != "--help" else "COMMANDS") in res.stdout + res.stderr
