"""Early-layer feature maps (Method 2): equality with a manual hook computation, early stop, untouched model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet10
from torch import nn

from monai_gamverify.metrics.similarity import similarity_metrics
from monai_gamverify.verification.featuremap_table import feature_map_table
from monai_gamverify.visualize.featuremaps import FeatureMap, feature_map


def small_net(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(1, 4, 3, padding=1),  # 0
        bn(4),  # 1
        nn.ReLU(),  # 2
        conv(4, 6, 3, stride=2, padding=1),  # 3
        nn.ReLU(),  # 4
        pool(1),  # 5
        nn.Flatten(),  # 6
        nn.Linear(6, 3),  # 7
    )


CASES = [
    # (name, network factory, layer, input shape)
    ("2d-seq", lambda: small_net(2), "4", (3, 1, 20, 16)),
    ("3d-seq", lambda: small_net(3), "4", (2, 1, 12, 16, 10)),
    ("2d-resnet10", lambda: resnet10(spatial_dims=2, n_input_channels=1, num_classes=2), "layer1", (2, 1, 32, 32)),
    ("3d-resnet10", lambda: resnet10(spatial_dims=3, n_input_channels=1, num_classes=2), "layer2", (2, 1, 16, 16, 16)),
]


def manual_feature_map(model: nn.Module, x: torch.Tensor, layer: str) -> np.ndarray:
    """Independent reference: full forward with a plain hook, numpy min-max normalisation."""
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.update(out=o.clone()))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was_training)
    handle.remove()
    fmap = torch.relu(store["out"]).sum(1, keepdim=True)
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    fmap = F.interpolate(fmap, size=x.shape[2:], mode=mode, align_corners=False).numpy().astype(np.float64)
    out = np.zeros_like(fmap)
    for i, m in enumerate(fmap):
        lo, hi = m.min(), m.max()
        out[i] = (m - lo) / (hi - lo) if hi > lo else 0.0
    return out


@pytest.mark.parametrize("name,factory,layer,shape", CASES, ids=[c[0] for c in CASES])
def test_equals_manual_hook(name, factory, layer, shape):
    torch.manual_seed(0)
    model = factory()
    x = torch.rand(shape)
    got = feature_map(model, x, layer)
    assert got.shape == (shape[0], 1, *shape[2:]) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), manual_feature_map(model, x, layer), atol=1e-5)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


@pytest.mark.parametrize("dims", [2, 3])
def test_stops_early_and_leaves_model_untouched(dims):
    torch.manual_seed(0)
    model = small_net(dims).train()
    model[7].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    calls = {"later": 0, "first": 0}
    model[5].register_forward_hook(lambda m, i, o: calls.__setitem__("later", calls["later"] + 1))
    model[0].register_forward_hook(lambda m, i, o: calls.__setitem__("first", calls["first"] + 1))
    x = torch.rand(2, 1, *([12] * dims))
    maps = feature_map(model, x, ["2", "4"])
    assert set(maps) == {"2", "4"}
    assert calls == {"later": 0, "first": 1}  # one forward, stopped before the pooling layer
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # eval mode: BatchNorm running stats unchanged
        torch.testing.assert_close(v, before[k])
    assert len(model[0]._forward_hooks) == 1 and len(model[5]._forward_hooks) == 1  # only ours remain
    assert not any(m._forward_hooks for i, m in enumerate(model) if i not in (0, 5))


def test_several_layers_match_single_calls():
    torch.manual_seed(1)
    model = small_net(2)
    x = torch.rand(2, 1, 16, 16)
    both = feature_map(model, x, ["2", "4"])
    for layer in ("2", "4"):
        torch.testing.assert_close(both[layer], feature_map(model, x, layer))


def test_no_upsample_and_unnormalised():
    torch.manual_seed(2)
    model = small_net(2)
    x = torch.rand(1, 1, 16, 16)
    raw = feature_map(model, x, "4", normalize=False, upsample=False)
    assert raw.shape == (1, 1, 8, 8)
    store = {}
    h = model[4].register_forward_hook(lambda m, i, o: store.update(o=o))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    torch.testing.assert_close(raw, store["o"].sum(1, keepdim=True))


def test_feature_map_callable_and_table_equal_direct_metrics():
    torch.manual_seed(3)
    ref_net, cand_a, cand_b = small_net(3), small_net(3), small_net(3)
    data = [{"image": torch.rand(2, 1, 12, 12, 12), "subject": ["s0", "s0"]}, {"image": torch.rand(3, 1, 12, 12, 12)}]
    table = feature_map_table((ref_net, "2"), {"a": (cand_a, "2", 1), "b": (cand_b, "4", 0)}, data, progress=False)
    all_x = torch.cat([d["image"] for d in data])
    ref = feature_map(ref_net, all_x, "2").double().mean(0, keepdim=True).float()
    for name, (net, layer) in {"a": (cand_a, "2"), "b": (cand_b, "4")}.items():
        direct = similarity_metrics(FeatureMap(net, layer)(all_x), ref)
        rows = table[table["model"] == name]
        assert rows["sample_id"].tolist() == [0, 1, 2, 3, 4]
        assert rows["subject_id"].tolist() == ["s0", "s0", 2, 3, 4]
        for metric, values in direct.items():
            np.testing.assert_allclose(rows[metric].to_numpy(), values.numpy(), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    model = small_net(2)
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown layer"):
        feature_map(model, x, "layer9")
    with pytest.raises(TypeError, match="torch.Tensor"):
        feature_map(model, x.numpy(), "2")
    with pytest.raises(TypeError, match="nn.Module"):
        feature_map(lambda t: t, x, "2")
    with pytest.raises(ValueError, match="shape"):
        feature_map(model, torch.rand(1, 16, 16), "2")
    with pytest.raises(ValueError, match="NaN"):
        feature_map(model, torch.full((1, 1, 16, 16), float("nan")), "2")
    with pytest.raises(ValueError, match="convolutional layer"):
        feature_map(model, x, "7")  # Linear output has no spatial axes
