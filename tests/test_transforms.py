from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from monai_gamverify.networks.nets import convnext_attn_pico
from monai_gamverify.transforms.dictionary import CheckImaged, ComputeCAMd, image_name, make_cam
from monai_gamverify.visualize.cam import GradCAM
from monai_gamverify.visualize.hooks import model_state
from monai_gamverify.visualize.registry import unwrap_network

# (spatial_dims, spatial shape) in one list for 2D and 3D
CASES = [(2, (16, 16)), (3, (16, 16, 16))]


def _net(dims: int) -> nn.Module:
    torch.manual_seed(0)
    return convnext_attn_pico(spatial_dims=dims, in_channels=1, out_channels=3, widths=(4, 8, 8))


def _img(shape, name="/data/case_01.nii.gz") -> MetaTensor:
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    affine[:3, 3] = torch.tensor([-5.0, 3.0, 7.0])
    return MetaTensor(torch.rand(1, *shape), affine=affine, meta={"filename_or_obj": name})


@pytest.mark.parametrize("dims, shape", CASES)
def test_check_imaged_accepts_right_dimensionality(dims, shape):
    d = {"image": _img(shape)}
    assert CheckImaged("image", spatial_dims=dims, num_channels=1)(d)["image"] is d["image"]


@pytest.mark.parametrize("dims, shape", CASES)
def test_check_imaged_wrong_dimensionality_names_file(dims, shape):
    other = (16,) * (5 - dims)  # 3D where 2D is expected and vice versa
    with pytest.raises(ValueError, match=r"case_01\.nii\.gz.*spatial dimension"):
        CheckImaged("image", spatial_dims=dims)({"image": _img(other)})


@pytest.mark.parametrize("dims, shape", CASES)
def test_check_imaged_nan_channels_and_slab(dims, shape):
    img = _img(shape)
    img[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"case_01\.nii\.gz contains NaN"):
        CheckImaged("image", spatial_dims=dims)({"image": img})
    two = MetaTensor(torch.rand(2, *shape), meta={"filename_or_obj": "two.nii"})
    with pytest.raises(ValueError, match=r"two\.nii has 2 channel"):
        CheckImaged("image", spatial_dims=dims, num_channels=1)({"image": two})
    slab = MetaTensor(torch.rand(1, *shape[:-1], 1), meta={"filename_or_obj": "slab.nii"})
    with pytest.raises(ValueError, match=r"slab\.nii .*shorter than 2"):
        CheckImaged("image", spatial_dims=dims)({"image": slab})


def test_check_imaged_missing_key():
    with pytest.raises(KeyError):
        CheckImaged("image")({"other": 1})
    assert CheckImaged("image", allow_missing_keys=True)({"other": 1}) == {"other": 1}


@pytest.mark.parametrize("dims, shape", CASES)
def test_compute_camd_matches_gradcam_and_keeps_meta(dims, shape):
    net = _net(dims).train()
    before = model_state(net)
    params = [p.detach().clone() for p in net.parameters()]
    img = _img(shape)
    out = ComputeCAMd("image", network=net, layer="stages.2", output_key="cam")({"image": img, "id": 3})
    cam = out["cam"]
    assert out["id"] == 3 and out["image"] is img
    assert tuple(cam.shape) == (1, *shape)
    assert isinstance(cam, MetaTensor)
    assert torch.allclose(cam.affine, img.affine)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    expected = GradCAM(net, "stages.2")(img.as_tensor().unsqueeze(0))[0]
    assert torch.allclose(cam.as_tensor(), expected, atol=1e-6)
    # the network is exactly as before
    assert model_state(net) == before and net.training
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("dims, shape", CASES)
def test_compute_camd_class_from_pred_and_raw(dims, shape):
    net = _net(dims).eval()
    img = _img(shape)
    pred = torch.tensor([0.1, 0.2, 0.7])
    t = ComputeCAMd("image", network=net, layer="stages.2", class_idx_key="pred", normalize=False)
    cam = t({"image": img, "pred": pred})["cam"]
    expected = GradCAM(net, "stages.2")(img.as_tensor().unsqueeze(0), class_idx=2, normalize=False)[0]
    assert torch.allclose(cam.as_tensor(), expected, atol=1e-6)
    cam0 = t({"image": img, "pred": torch.tensor(0)})["cam"]
    expected0 = GradCAM(net, "stages.2")(img.as_tensor().unsqueeze(0), class_idx=0, normalize=False)[0]
    assert torch.allclose(cam0.as_tensor(), expected0, atol=1e-6)


def test_compute_camd_errors_and_methods():
    net = _net(3)
    with pytest.raises(ValueError, match="network and a target layer"):
        ComputeCAMd("image", network=net)
    with pytest.raises(ValueError, match="unknown layer"):
        ComputeCAMd("image", network=net, layer="stages.9")
    with pytest.raises(ValueError, match="one output key per key"):
        ComputeCAMd(["a", "b"], network=net, layer="stages.2", output_key="cam")
    with pytest.raises(ValueError, match="unknown CAM method"):
        make_cam(net, "stages.2", "lime")
    for method in ("gradcam", "GradCAM++", "grad-cam-pp", "scorecam"):
        cam = make_cam(net, "stages.2", method)
        assert cam(torch.rand(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_unwrap_and_image_name():
    net = _net(2)
    assert unwrap_network(nn.DataParallel(net)) is net
    assert image_name(_img((4, 4), name="/x/y.nii.gz")) == "/x/y.nii.gz"
    assert image_name(torch.zeros(1), default="d") == "d"
    assert image_name({"filename_or_obj": ["a.nii", "b.nii"]}) == "a.nii"
