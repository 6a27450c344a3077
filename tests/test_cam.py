from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _model_state import assert_same_state, snapshot
from monai.networks.nets import DenseNet121, resnet10
from torch import nn

from monai_gamverify import GradCAM, GradCAMpp, ScoreCAM
from monai_gamverify.visualize.cam import normalize_maps

captum = pytest.importorskip("captum.attr")

# (spatial_dims, input shape, layer): 2D and 3D in one list
CASES = [
    (2, (3, 1, 32, 32), "layer2"),
    (3, (3, 1, 16, 16, 16), "layer1"),
]
METHODS = [GradCAM, GradCAMpp, ScoreCAM]


def tiny_resnet(dims: int, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return resnet10(spatial_dims=dims, n_input_channels=1, num_classes=num_classes, widen_factor=0.25)


def make_cam(cls, net, layer):
    return cls(net, layer, batch_size=12) if cls is ScoreCAM else cls(net, layer)


@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_gradcam_equals_captum(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    ours = GradCAM(net, layer)(x, normalize=False)
    net.eval()
    target = net(x).argmax(1)
    lgc = captum.LayerGradCam(net, dict(net.named_modules())[layer])
    mode = "bilinear" if dims == 2 else "trilinear"
    ref = captum.LayerAttribution.interpolate(lgc.attribute(x, target=target, relu_attributions=True), shape[2:], mode)
    assert ours.shape == (shape[0], 1, *shape[2:]) and ours.dtype == torch.float32
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-7 * float(ref.abs().max()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_batch_with_different_classes_equals_single_calls(method, dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    classes = [0, 3, 1]
    batched = make_cam(method, net, layer)(x, class_idx=classes, normalize=False)
    for i, c in enumerate(classes):
        single = make_cam(method, net, layer)(x[i : i + 1], class_idx=c, normalize=False)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-6)
    # tensor class_idx behaves like a list
    torch.testing.assert_close(
        make_cam(method, net, layer)(x, class_idx=torch.tensor(classes), normalize=False), batched, rtol=0, atol=0
    )


def reference_activations_and_gradients(net, x, layer, classes):
    """Textbook route: full autograd graph, hooks kept by hand."""
    net = copy.deepcopy(net).eval()
    store = {}
    module = dict(net.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    out = net(x)
    h.remove()
    score = out.gather(1, torch.as_tensor(classes).view(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, store["a"])
    return store["a"].detach().double().numpy(), g.double().numpy(), out.detach()


@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_gradcampp_closed_form(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    classes = [2, 0, 1]
    a, g, _ = reference_activations_and_gradients(net, x, layer, classes)
    axes = tuple(range(2, a.ndim))
    # Chattopadhay et al. (2018), eq. 19 with the exponential score: alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)
    num = g**2
    den = 2 * g**2 + a.sum(axis=axes, keepdims=True) * g**3
    alpha = np.where(den != 0, num / np.where(den != 0, den, 1), 0)
    w = (alpha * np.maximum(g, 0)).sum(axis=axes)
    cam = np.maximum((w.reshape(*w.shape, *([1] * len(axes))) * a).sum(axis=1, keepdims=True), 0)
    mode = "bilinear" if dims == 2 else "trilinear"
    ref = F.interpolate(torch.from_numpy(cam).float(), size=shape[2:], mode=mode, align_corners=False)
    ours = GradCAMpp(net, layer)(x, class_idx=classes, normalize=False)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_scorecam_chunking_and_definition(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)[:2]
    m1 = ScoreCAM(net, layer, batch_size=1)(x, normalize=False)
    m16 = ScoreCAM(net, layer, batch_size=16)(x, normalize=False)
    torch.testing.assert_close(m1, m16, rtol=1e-4, atol=1e-6)
    # independent loop: each channel masks the input, weight = softmax gain over a zero input
    ev = copy.deepcopy(net).eval()
    store = {}
    h = dict(ev.named_modules())[layer].register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        logits = ev(x)
        h.remove()
        acts = store["a"]
        cls = logits.argmax(1)
        base = ev(torch.zeros_like(x[:1])).softmax(1)
        mode = "bilinear" if dims == 2 else "trilinear"
        for i in range(x.shape[0]):
            weights = []
            for k in range(acts.shape[1]):
                up = F.interpolate(acts[i : i + 1, k : k + 1], size=shape[2:], mode=mode, align_corners=False)
                lo, hi = up.min(), up.max()
                mask = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
                weights.append(float(ev(x[i : i + 1] * mask).softmax(1)[0, cls[i]] - base[0, cls[i]]))
            w = torch.tensor(weights).view(1, -1, *([1] * dims))
            ref = F.interpolate(F.relu((w * acts[i : i + 1]).sum(1, keepdim=True)), size=shape[2:], mode=mode)
            torch.testing.assert_close(m1[i : i + 1], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_model_state_untouched(method, dims, shape, layer):
    net = tiny_resnet(dims)
    net.train()
    net.layer1.requires_grad_(False)  # a partly frozen model stays partly frozen
    before = snapshot(net)
    with make_cam(method, net, layer) as cam:
        maps = cam(torch.randn(shape))
    assert maps.shape == (shape[0], 1, *shape[2:])
    assert_same_state(net, before)
    assert net.training


@pytest.mark.parametrize("method,dims", [(GradCAM, 2), (GradCAM, 3), (GradCAMpp, 3), (ScoreCAM, 2)])
def test_inplace_relu_densenet(method, dims):
    torch.manual_seed(3)
    net = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=3, init_features=8, growth_rate=4)
    assert any(getattr(m, "inplace", False) for m in net.modules())
    before = snapshot(net)
    x = torch.randn(1 if method is ScoreCAM else 2, 1, *([32] * dims))
    layer = "features.denseblock3"
    cam = method(net, layer, batch_size=64) if method is ScoreCAM else method(net, layer)
    maps = cam(x, normalize=True)
    assert torch.isfinite(maps).all() and maps.max() == 1.0
    assert_same_state(net, before)
    if method is GradCAM:  # the in-place ReLU after the layer must not corrupt the recorded activation
        ev = copy.deepcopy(net).eval()
        lgc = captum.LayerGradCam(ev, dict(ev.named_modules())[layer])
        ref = lgc.attribute(x, target=ev(x).argmax(1), relu_attributions=True)
        ours = cam(x, normalize=False, upsample=False)
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_multi_layer_dict_matches_single_layers(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    both = GradCAM(net, ["layer1", layer])(x, class_idx=1)
    assert set(both) == {"layer1", layer}
    for name in both:
        torch.testing.assert_close(both[name], GradCAM(net, name)(x, class_idx=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims,shape,layer", CASES)
def test_normalize_and_feature_resolution(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    cam = GradCAM(net, layer)
    raw = cam(x, normalize=False)
    norm = cam(x)
    assert raw.min() >= 0
    torch.testing.assert_close(norm, normalize_maps(raw))
    for m in norm:
        assert m.max() in (0.0, 1.0) and m.min() == 0.0
    feat = cam(x, upsample=False)
    assert feat.ndim == x.ndim
    assert all(f < s for f, s in zip(feat.shape[2:], x.shape[2:]))
    assert torch.equal(normalize_maps(torch.full((2, 1, 4, 4), 3.0)), torch.zeros(2, 1, 4, 4))


@pytest.mark.parametrize("method", METHODS)
def test_regression_and_multi_output(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model = nn.Sequential(net, head)
    x = torch.randn(2, 1, 16, 16)
    cam = method(model, "0.2", softmax=False) if method is ScoreCAM else method(model, "0.2")
    cols = [4, 1]
    multi = cam(x, class_idx=cols, normalize=False)
    for i, c in enumerate(cols):
        torch.testing.assert_close(multi[i : i + 1], cam(x[i : i + 1], class_idx=c, normalize=False))
    single_out = nn.Sequential(net, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))
    reg = method(single_out, "0.2") if method is not ScoreCAM else ScoreCAM(single_out, "0.2")
    assert reg(x).shape == (2, 1, 16, 16)


def test_score_fn_segmentation_target():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    seg = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    mask[:, 4:10, 4:10, 4:10] = True

    def score_fn(out):  # mean foreground logit inside the mask
        return out[:, 1][mask.expand(out.shape[0], -1, -1, -1)].view(out.shape[0], -1).mean(1)

    layer = "model.1.submodule"
    maps = GradCAM(seg, layer)(x, score_fn=score_fn, normalize=False)
    assert maps.shape == (2, 1, 16, 16, 16) and maps.max() > 0
    with pytest.raises(ValueError, match="score_fn"):
        GradCAM(seg, layer)(x)


def test_metatensor_keeps_affine_and_writes_nifti(tmp_path):
    import nibabel as nib
    from monai.data import MetaTensor

    from monai_gamverify.io import save_nifti

    net = tiny_resnet(3)
    affine = torch.diag(torch.tensor([0.4, 0.5, 0.6, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, -5.0, 3.0], dtype=torch.float64)
    x = MetaTensor(torch.randn(1, 1, 16, 16, 16), affine=affine)
    maps = GradCAM(net, "layer1")(x)
    assert isinstance(maps, MetaTensor)
    np.testing.assert_allclose(np.asarray(maps.affine), affine.numpy())
    path = save_nifti(maps[0], tmp_path / "map.nii.gz", reference=maps)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, affine.numpy())
    np.testing.assert_allclose(img.get_fdata(), maps[0, 0].numpy(), atol=1e-6)


def test_caller_no_grad_context_and_grad_state():
    net = tiny_resnet(2)
    x = torch.randn(2, 1, 32, 32)
    ref = GradCAM(net, "layer2")(x)
    with torch.no_grad():
        inside = GradCAM(net, "layer2")(x)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(ref, inside)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    "make_input,layer,kwargs,match",
    [
        (lambda: torch.randn(1, 32, 32), "layer2", {}, "dimensions"),
        (lambda: torch.randn(1, 1, 16, 16, 16), "layer2", {}, "spatial dimensions"),
        (lambda: torch.randn(1, 3, 32, 32), "layer2", {}, "channels"),
        (lambda: torch.full((1, 1, 32, 32), float("nan")), "layer2", {}, "NaN"),
        (lambda: torch.randn(0, 1, 32, 32), "layer2", {}, "empty batch"),
        (lambda: torch.randn(2, 1, 32, 32), "fc", {}, "no spatial axes"),
        (lambda: torch.randn(2, 1, 32, 32), "layer2", {"class_idx": 4}, "out of range"),
        (lambda: torch.randn(2, 1, 32, 32), "layer2", {"class_idx": [0, 1, 2]}, "one entry per sample"),
        (lambda: torch.randn(2, 1, 32, 32), "layer2", {"class_idx": [-1, 0]}, "out of range"),
    ],
)
def test_bad_input(make_input, layer, kwargs, match):
    net = tiny_resnet(2)
    before = snapshot(net)
    with pytest.raises(ValueError, match=match):
        GradCAM(net, layer)(make_input(), **kwargs)
    assert_same_state(net, before)


def test_bad_layer_names_and_types():
    net = tiny_resnet(2)
    with pytest.raises(ValueError, match="did you mean 'layer2'"):
        GradCAM(net, "layr2")
    with pytest.raises(TypeError):
        GradCAM("not a model", "layer2")
    with pytest.raises(TypeError):
        GradCAM(net, "layer2")(np.zeros((1, 1, 32, 32)))
    with pytest.raises(ValueError, match="batch_size"):
        ScoreCAM(net, "layer2", batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_device_agnostic(method):
    net = tiny_resnet(3).cuda()
    x = torch.randn(2, 1, 16, 16, 16, device="cuda")
    maps = make_cam(method, net, "layer1")(x)
    assert maps.device == x.device
    cpu = make_cam(method, tiny_resnet(3), "layer1")(x.cpu())
    torch.testing.assert_close(maps.cpu(), cpu, rtol=1e-3, atol=1e-3)
