"""Seg-Grad-CAM: target = sum of a label's logits over a region; sliding-window CAM stitched by MONAI's inferer,
checked against a hand-written Grad-CAM (whole volume, and window by window with the inferer's weighting)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from _model_state import assert_same_state, snapshot
from _zoo_bundles import write_seg_bundle
from monai.data.utils import compute_importance_map
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNet

from monai_gamverify.bundle import load_bundle
from monai_gamverify.visualize.segcam import (
    box_mask,
    bundle_activation,
    bundle_segmentation_cam,
    predicted_mask,
    segmentation_cam,
)

LAYER = "model.1"


@pytest.fixture
def net():
    torch.manual_seed(0)
    # BatchNorm (eval: a fixed affine per channel): windows see the same network as the whole volume
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch").eval()


def _volume(size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, size, size, size, generator=g)
    x[:, :, size // 5 : size * 2 // 3, size // 4 : size * 3 // 4, size // 3 : size * 2 // 3] += 1.0
    return x


def hand_gradcam(net, x, region, label, layer=LAYER):
    """Grad-CAM written out: hook the layer, d(sum(logits[label] * region))/d(activation), spatial mean, ReLU of the
    weighted sum, trilinear upsampling (align_corners=False). Returns (raw map, logits)."""
    store = {}
    module = dict(net.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        out = net(x)
    finally:
        h.remove()
    a = store["a"]
    g = torch.autograd.grad((out[:, label : label + 1] * region).sum(), a)[0]
    w = g.mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((w * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False).detach(), out.detach()


def test_one_window_equals_whole_volume(net, one_thread):
    x = _volume(16)
    snap = snapshot(net)
    ref_logits = net(x).detach()
    region = predicted_mask(ref_logits, 1)
    ref, _ = hand_gradcam(net, x, region, 1)
    assert float(ref.amax()) > 0
    whole, logits = segmentation_cam(net, x, LAYER, 1, normalize=False)
    torch.testing.assert_close(whole, ref, atol=1e-5, rtol=1e-5)
    for mode in ("constant", "gaussian"):
        inf = SlidingWindowInferer((16, 16, 16), sw_batch_size=1, overlap=0.25, mode=mode)
        sw, sw_logits = segmentation_cam(net, x, LAYER, 1, inferer=inf, normalize=False)
        torch.testing.assert_close(sw, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sw_logits, ref_logits, atol=1e-5, rtol=1e-5)
    # SimpleInferer: the whole volume
    simple, _ = segmentation_cam(net, x, LAYER, 1, inferer=SimpleInferer(), normalize=False)
    torch.testing.assert_close(simple, ref, atol=1e-5, rtol=1e-5)
    assert_same_state(net, snap)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_overlapping_windows_equal_hand_stitching(net, mode, one_thread):
    """24^3 volume, 16^3 windows, overlap 0.5: window starts (0, 8) per axis, 8 windows. Each window's Grad-CAM of
    its own target (the label's logits over the window's part of the whole-volume predicted mask), stitched with the
    inferer's importance map: sum(w * map) / sum(w)."""
    x = _volume(24)
    with torch.no_grad():
        mask_logits = SlidingWindowInferer((16,) * 3, sw_batch_size=4, overlap=0.5, mode=mode)(x, net)
    region = predicted_mask(mask_logits, 1)
    w = compute_importance_map((16, 16, 16), mode=mode, device="cpu").float()
    num = torch.zeros(1, 1, 24, 24, 24)
    den = torch.zeros(1, 1, 24, 24, 24)
    for i in (0, 8):
        for j in (0, 8):
            for k in (0, 8):
                sl = (slice(None), slice(None), slice(i, i + 16), slice(j, j + 16), slice(k, k + 16))
                m, _ = hand_gradcam(net, x[sl], region[sl], 1)
                num[sl] += w * m
                den[sl] += w
    ref = num / den
    inf = SlidingWindowInferer((16, 16, 16), sw_batch_size=3, overlap=0.5, mode=mode)
    sw, logits = segmentation_cam(net, x, LAYER, 1, inferer=inf, normalize=False)
    torch.testing.assert_close(sw, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, mask_logits, atol=1e-5, rtol=1e-5)
    # against the whole-volume CAM: close, not equal (each window has its own channel weights): measured 0.99
    # (gaussian) / 0.97 (constant) Pearson on 32^3, 0.9+ here
    whole, _ = segmentation_cam(net, x, LAYER, 1, mask=region, normalize=False)
    r = torch.corrcoef(torch.stack([whole.flatten(), sw.flatten()]))[0, 1]
    assert float(r) > 0.85


def test_windows_bound_autograd(net, one_thread):
    """The network never sees more than sw_batch_size windows of roi size at once (forward and backward)."""
    x = _volume(32)
    seen: list[tuple[int, ...]] = []
    h = net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        inf = SlidingWindowInferer((16, 16, 16), sw_batch_size=2, overlap=0.25)
        maps, logits = segmentation_cam(net, x, LAYER, 1, inferer=inf)
    finally:
        h.remove()
    assert seen and all(s[0] <= 2 and s[2:] == (16, 16, 16) for s in seen)
    assert maps.shape == (1, 1, 32, 32, 32) and logits.shape == (1, 2, 32, 32, 32)
    assert float(maps.amin()) == 0.0 and float(maps.amax()) == pytest.approx(1.0)


def test_regions_mask_box_and_labels(net, one_thread, caplog):
    x = _volume(16)
    box = [(2, 10), (4, 12), (0, 16)]
    bm = box_mask((16, 16, 16), box)
    assert int(bm.sum()) == 8 * 8 * 16
    ref, _ = hand_gradcam(net, x, bm, 0)
    by_box, _ = segmentation_cam(net, x, LAYER, 0, box=box, normalize=False)
    by_mask, _ = segmentation_cam(
        net, x, LAYER, "background", mask=bm[0, 0] > 0, class_names=["background", "x"], normalize=False
    )
    torch.testing.assert_close(by_box, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_mask, ref, atol=1e-5, rtol=1e-5)
    with caplog.at_level(logging.WARNING, logger="monai_gamverify.visualize.segcam"):
        zero, _ = segmentation_cam(net, x, LAYER, 1, mask=torch.zeros(16, 16, 16))
    assert float(zero.abs().max()) == 0.0 and "empty region" in caplog.text
    with pytest.raises(ValueError, match="mask or box, not both"):
        segmentation_cam(net, x, LAYER, 1, mask=bm, box=box)
    with pytest.raises(ValueError, match="mask must have shape"):
        segmentation_cam(net, x, LAYER, 1, mask=torch.ones(8, 8, 8))
    with pytest.raises(ValueError, match="outside"):
        box_mask((16, 16, 16), [(0, 20), (0, 4), (0, 4)])
    with pytest.raises(ValueError, match="unknown label 'liver'"):
        segmentation_cam(net, x, LAYER, "liver", class_names=["background", "spleen"])
    with pytest.raises(ValueError, match="out of range"):
        segmentation_cam(net, x, LAYER, 5)
    # sigmoid (multi-label) masks: logit > 0
    logits = torch.tensor([[[[-1.0, 2.0]], [[3.0, -4.0]]]])  # (1, 2, 1, 2)
    assert predicted_mask(logits, 0, "sigmoid").flatten().tolist() == [0.0, 1.0]
    assert predicted_mask(logits, 0, "softmax").flatten().tolist() == [0.0, 1.0]
    assert predicted_mask(logits, 1, "sigmoid").flatten().tolist() == [1.0, 0.0]


def test_segmentation_bundle_by_label_name(tmp_path, one_thread):
    bm = load_bundle(write_seg_bundle(tmp_path / "seg", fmt="json", seed=4), device="cpu")
    assert bundle_activation(bm) == "softmax"
    x = torch.rand(1, 1, 24, 24, 20)
    maps, logits = segmentation_cam(
        bm.network, x, bm.target_layer, "spleen", inferer=bm.inferer(), class_names=bm.class_names
    )
    assert maps.shape == (1, 1, 24, 24, 20) and logits.shape == (1, 2, 24, 24, 20)
    again, _ = segmentation_cam(bm.network, x, bm.target_layer, 1, inferer=bm.inferer())
    torch.testing.assert_close(maps, again)
    by_bundle, _ = bundle_segmentation_cam(bm, x, "spleen")
    torch.testing.assert_close(maps, by_bundle)


def test_bundle_activation_reads_sigmoid_postprocessing(tmp_path, one_thread):
    import json

    root = write_seg_bundle(tmp_path / "brats", fmt="json", weights=None)
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["postprocessing"]["transforms"] = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
    ]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    assert bundle_activation(load_bundle(root, device="cpu", require_weights=False)) == "sigmoid"


def test_cli_cam_segmentation_bundle_writes_map_on_input_grid(tmp_path, one_thread):
    """`gamverify cam --bundle_root SEG --label spleen`: the engine reads the image, explains the label through the
    bundle's SlidingWindowInferer and writes the map on the input's grid with its affine; the same map as calling
    bundle_segmentation_cam on the preprocessed image (the preprocessing here only reorients and windows)."""
    import nibabel as nib
    import numpy as np

    from monai_gamverify import cli

    root = write_seg_bundle(tmp_path / "seg", fmt="json", seed=4)
    affine = np.diag([-0.8, 0.8, 1.2, 1.0])  # LPS-like: Orientationd(RAS) flips the first axis
    vol = np.random.default_rng(0).normal(50, 40, (24, 22, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "ct.nii.gz"))
    out = cli.cam(str(tmp_path / "ct.nii.gz"), out=str(tmp_path / "out"), bundle_root=str(root), label="spleen")
    assert out["label"] == "spleen" and out["label_index"] == 1
    written = nib.load(out["map"])
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    bm = load_bundle(root, device="cpu")
    img = bm.preprocessing()({"image": str(tmp_path / "ct.nii.gz")})["image"]
    maps, _ = bundle_segmentation_cam(bm, img[None], "spleen")
    want = maps[0, 0].numpy()[::-1]  # undo the RAS flip of the first axis
    np.testing.assert_allclose(written.get_fdata(), want, atol=1e-5)
    one_slice = np.zeros((24, 22, 1), np.float32)
    nib.save(nib.Nifti1Image(one_slice, affine), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(Exception, match="one slice"):
        cli.cam(str(tmp_path / "slice.nii.gz"), out=str(tmp_path / "out2"), bundle_root=str(root), label=1)


def test_batch_samples_do_not_mix(net, one_thread):
    x = torch.cat([_volume(16, seed=2), _volume(16, seed=3).flip(2)])
    inf = SlidingWindowInferer((8, 8, 8), sw_batch_size=3, overlap=0.5, mode="gaussian")
    both, logits = segmentation_cam(net, x, LAYER, 1, inferer=inf)
    for i in range(2):
        one, one_logits = segmentation_cam(net, x[i : i + 1], LAYER, 1, inferer=inf)
        torch.testing.assert_close(both[i : i + 1], one, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[i : i + 1], one_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])
