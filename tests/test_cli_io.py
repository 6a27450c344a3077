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
    with pytest.raises(ValueError, match="unknown CAM method"):
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
    assert res.stdout.startswith("usage: gamverify") and ("--out" if argv[0] != "--help" else "COMMAND") in res.stdout


SOS_TINY = {"network_name": "small_cnn", "networks#small_cnn#width": 4, "roi_size": [16, 16, 16], "pixdim": [2.5] * 3}


@pytest.fixture(scope="module")
def fine_image(tmp_path_factory):
    """24^3 HU volume at 1.0 x 1.25 x 0.9 mm with an offset: the bundle resamples it to 2.5 mm and crops to 16^3."""
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, (24, 24, 24))
    vol[6:16, 8:18, 5:14] += 1500
    affine = np.diag([1.0, 1.25, 0.9, 1.0])
    affine[:3, 3] = [4.0, -7.0, 2.5]
    path = tmp_path_factory.mktemp("fine") / "fine.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(path))
    return path


def test_cam_bundle_honours_checkpoint_and_writes_on_input_grid(fine_image, tmp_path):
    from pathlib import Path

    from monai.transforms import Invertd

    from monai_gamverify.bundle import load_bundle

    sos = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"
    torch.manual_seed(1)
    bm = load_bundle(sos, overrides=SOS_TINY, require_weights=False, device="cpu")
    torch.save(bm.network.state_dict(), tmp_path / "w.pt")
    summary = cli.cam(str(fine_image), out=str(tmp_path / "o"), bundle_root=str(sos), overrides=SOS_TINY,
                      checkpoint=str(tmp_path / "w.pt"), device="cpu")  # fmt: skip
    # the given weights were used: the outputs equal a direct forward pass of the saved network
    pre = bm.preprocessing()
    x = pre({"image": str(fine_image)})["image"]
    assert tuple(x.shape[1:]) == (16, 16, 16)
    with torch.no_grad():
        logits = bm.network(x.unsqueeze(0).as_tensor())[0]
    np.testing.assert_allclose(summary["outputs"], logits.numpy(), rtol=1e-5, atol=1e-6)
    # the map lies on the input's grid with the input's affine, and equals MONAI's Invertd of the preprocessed map
    written, src = nib.load(summary["map"]), nib.load(str(fine_image))
    assert written.shape == src.shape == (24, 24, 24)
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-5)
    from monai_gamverify.visualize.cam import GradCAM

    cam = GradCAM(bm.network, "res4")(x.unsqueeze(0))[0]
    from monai.data import MetaTensor

    mt = MetaTensor(cam.as_tensor(), meta=dict(x.meta), applied_operations=list(x.applied_operations))
    ref = Invertd("cam", transform=pre, orig_keys="image", nearest_interp=False)({"cam": mt, "image": x})["cam"]
    np.testing.assert_allclose(written.get_fdata(), ref[0].numpy(), atol=1e-5)


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """A bad input on the command line (here a bundle without weights): exit code 2 and one `ERROR:` line naming
    the problem, no traceback."""
    import sys

    from monai_gamverify import cli

    argv = ["gamverify", "cam", "--image", str(tmp_path / "gone.nii.gz"), "--bundle_root", "bundles/sos_staging"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("ERROR: ") and "no trained weights" in err
    assert "Traceback" not in err
