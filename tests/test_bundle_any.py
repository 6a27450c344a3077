"""Any MONAI bundle: YAML/JSON configs, a bundle's own scripts/, model.pt / {"model": ...} / model.ts weights,
automatic CAM layer, check_bundle."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _zoo_bundles import CLS_NET, SEG_NET, reference_state, write_cls_bundle, write_seg_bundle
from monai.networks.nets import UNet
from torch import nn

from monai_gamverify import GradCAM
from monai_gamverify.bundle import (
    check_bundle,
    find_cam_layer,
    find_config,
    label_index,
    load_bundle,
    trace_layers,
)


def _has_yaml() -> bool:
    try:
        import yaml  # noqa: F401
    except ImportError:
        return False
    return True


needs_yaml = pytest.mark.skipif(not _has_yaml(), reason="PyYAML not installed")
FMTS = ["json", pytest.param("yaml", marks=needs_yaml)]


def _same_state(net: nn.Module, ref: dict) -> bool:
    got = net.state_dict()
    return set(got) == set(ref) and all(torch.equal(got[k].cpu(), ref[k]) for k in ref)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("weights", ["pt", "pt_model", "ts"])
def test_classification_bundle_any_form(tmp_path, fmt, weights, one_thread, caplog):
    root = write_cls_bundle(tmp_path / "cls", fmt=fmt, weights=weights, seed=3)
    assert find_config(root).name == f"inference.{fmt}"
    with caplog.at_level(logging.WARNING, logger="monai_gamverify.bundle"):
        bm = load_bundle(root, device="cpu")
    # weights: the saved tensors, whatever the container (plain, {"model": ...}, TorchScript)
    assert _same_state(bm.network, reference_state(CLS_NET, 3))
    assert bm.checkpoint.name == ("model.ts" if weights == "ts" else "model.pt")
    assert not isinstance(bm.network, torch.jit.ScriptModule)  # hooks need the Python network
    # the layer: last feature map with spatial extent before global pooling (MONAI DenseNet: class_layers.relu)
    assert bm.target_layer == "class_layers.relu" and bm.layer_source == "auto"
    assert "class_layers.relu" in caplog.text  # the choice is logged
    assert bm.task == "classification"
    assert bm.class_names == ["normal", "pneumonia", "other"]
    assert bm.total_stride() == (8, 8)  # conv0 2 x pool0 2 x transition 2
    maps = GradCAM(bm.network, bm.target_layer)(torch.rand(2, 1, 32, 32))
    assert maps.shape == (2, 1, 32, 32) and float(maps.amax()) == pytest.approx(1.0)
    assert bm.preprocessing() is not None and type(bm.inferer()).__name__ == "SimpleInferer"
    assert check_bundle(root).ok


def test_layer_rule_against_an_independent_trace(one_thread):
    """The chosen layer is the last once-run module with >1 voxel per axis; all modules run after it are global
    (pooling/flatten/linear): checked with a plain forward-hook trace written here."""
    from monai.networks.nets import DenseNet, resnet10

    for net, shape in [
        (DenseNet(**{k: v for k, v in CLS_NET.items() if k != "_target_"}), (1, 32, 32)),
        (resnet10(spatial_dims=2, n_input_channels=1, num_classes=2), (1, 32, 32)),
    ]:
        net.eval()
        name, info = find_cam_layer(net, shape)
        order: list[tuple[str, tuple]] = []
        hs = [
            m.register_forward_hook(lambda m, i, o, n=n, rec=order: rec.append((n, tuple(o.shape))))
            for n, m in net.named_modules()
            if n
        ]
        with torch.no_grad():
            net(torch.rand(1, *shape))
        for h in hs:
            h.remove()
        idx = max(i for i, (n, _) in enumerate(order) if n == name)
        assert all(s > 1 for s in order[idx][1][2:])
        after = [s for _, s in order[idx + 1 :]]
        assert after and all(len(s) < 4 or all(d == 1 for d in s[2:]) for s in after), (name, after)
        assert info["task"] == "classification"


def test_segmentation_layer_rule(one_thread):
    net = UNet(**{k: v for k, v in SEG_NET.items() if k != "_target_"}).eval()
    name, info = find_cam_layer(net, (1, 16, 16, 16))
    assert info["task"] == "segmentation" and info["output_shape"] == (1, 2, 16, 16, 16)
    # last decoder features before the head (MONAI UNet: model.1, the skip-connection block, half resolution)
    assert name == "model.1" and info["shape"] == (1, 8, 8, 8, 8)
    deep, dinfo = find_cam_layer(net, (1, 16, 16, 16), prefer="deepest")
    assert deep.startswith("model.1.submodule") and dinfo["shape"][2:] == (4, 4, 4)
    traces, out = trace_layers(net, torch.rand(1, 1, 16, 16, 16))
    head = [t.name for t in traces if t.shape == tuple(out.shape)]
    assert head and name not in head  # the head is never chosen
    assert info["total_stride"] == (4, 4, 4)


@pytest.mark.parametrize("fmt", FMTS)
def test_segmentation_bundle(tmp_path, fmt, one_thread):
    root = write_seg_bundle(tmp_path / "seg", fmt=fmt, seed=1)
    bm = load_bundle(root, device="cpu")
    assert bm.task == "segmentation" and bm.target_layer == "model.1"
    assert bm.class_names == ["background", "spleen"]
    inf = bm.inferer()
    assert type(inf).__name__ == "SlidingWindowInferer" and tuple(inf.roi_size) == (16, 16, 16)
    assert _same_state(bm.network, reference_state(SEG_NET, 1))
    assert label_index("spleen", bm.class_names) == 1 and label_index(0, bm.class_names) == 0
    assert label_index("1", bm.class_names) == 1
    with pytest.raises(ValueError, match="unknown label 'liver'.*background"):
        label_index("liver", bm.class_names)
    with pytest.raises(ValueError, match="out of range"):
        label_index(2, bm.class_names)


def test_bundle_with_own_scripts(tmp_path, one_thread):
    """Two bundles, each with its own ``scripts`` package: each gets its own network class."""
    for k, width in [("a", 3), ("b", 5)]:
        root = tmp_path / k
        (root / "scripts").mkdir(parents=True)
        (root / "scripts" / "__init__.py").write_text("")
        (root / "scripts" / "net.py").write_text(
            "import torch\n"
            "class TinyNet(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            f"        self.conv = torch.nn.Conv2d(1, {width}, 3, padding=1)\n"
            "        self.act = torch.nn.ReLU()\n"
            "        self.pool = torch.nn.AdaptiveAvgPool2d(1)\n"
            f"        self.fc = torch.nn.Linear({width}, 2)\n"
            "    def forward(self, x):\n"
            "        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))\n"
        )
        net = {"_target_": "scripts.net.TinyNet"}
        write_cls_bundle(root, fmt="json", weights=None, net=net, spatial_shape=[16, 16])
        fresh = load_bundle(root, device="cpu", require_weights=False).network
        assert fresh.conv.out_channels == width
        (root / "models").mkdir()
        torch.save(fresh.state_dict(), root / "models" / "model.pt")
    for k, width in [("a", 3), ("b", 5)]:
        bm = load_bundle(tmp_path / k, device="cpu")
        assert bm.network.conv.out_channels == width
        assert type(bm.network).__module__ == "scripts.net"
        assert bm.target_layer == "act"


def test_check_bundle_names_what_is_missing(tmp_path, one_thread):
    assert "is not a directory" in check_bundle(tmp_path / "nope").problems[0]
    (tmp_path / "empty" / "configs").mkdir(parents=True)
    rep = check_bundle(tmp_path / "empty")
    assert not rep.ok and "inference.json, inference.yaml" in rep.problems[0]
    with pytest.raises(ValueError, match="NOT usable"):
        check_bundle(tmp_path / "empty", strict=True)

    root = write_cls_bundle(tmp_path / "noweights", fmt="json", weights=None)
    rep = check_bundle(root)
    assert any("no weights" in p and "model.pt" in p for p in rep.problems)
    assert rep.info["layer"] == "class_layers.relu (auto)"

    root = write_cls_bundle(tmp_path / "noshape", fmt="json", spatial_shape=[])
    rep = check_bundle(root)
    assert any("spatial_shape" in p for p in rep.problems)
    assert any("spatial_shape" in p for p in rep.problems if "layer" in p or "CAM" in p)
    rep = check_bundle(root, layer="features.denseblock2")
    assert rep.info["layer"] == "features.denseblock2 (given)"

    root = write_cls_bundle(tmp_path / "nonet", fmt="json")
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    del cfg["network_def"], cfg["network"]
    del cfg["preprocessing"]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    rep = check_bundle(root)
    assert any("defines no 'network_def'" in p for p in rep.problems)

    root = write_cls_bundle(tmp_path / "nopre", fmt="json")
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    del cfg["preprocessing"]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    rep = check_bundle(root)
    assert rep.ok and any("no 'preprocessing'" in w for w in rep.warnings)

    root = write_cls_bundle(tmp_path / "badlayer", fmt="json")
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["cam_layer"] = "features.denseblok2"
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    rep = check_bundle(root)
    assert any("denseblock2" in p for p in rep.problems)  # close-match suggestion


def test_weights_that_do_not_fit_are_refused(tmp_path, one_thread):
    root = write_cls_bundle(tmp_path / "c", fmt="json")
    torch.save({"model": {"bogus": torch.zeros(1)}}, root / "models" / "model.pt")
    with pytest.raises(ValueError, match="does not fit the network"):
        load_bundle(root, device="cpu")


def test_torchscript_modules_take_no_forward_hooks(tmp_path, one_thread):
    """Why model.ts is read for its tensors only: torch refuses forward hooks on a ScriptModule (if a future torch
    accepts them, this test says the fallback can be revisited)."""
    root = write_cls_bundle(tmp_path / "ts", fmt="json", weights="ts")
    scripted = torch.jit.load(str(root / "models" / "model.ts"))
    sub = dict(scripted.named_modules())["features"]
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        sub.register_forward_hook(lambda *a: None)
    # the fallback network gives the scripted module's outputs
    bm = load_bundle(root, device="cpu")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bm.network(x), scripted(x), atol=1e-6)


def test_task_from_the_traced_output_not_loose_metadata(tmp_path, one_thread):
    """Model-zoo metadata writes class scores as spatial_shape [1, K]: the task comes from the traced output."""
    root = write_cls_bundle(tmp_path / "c", fmt="json")
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] = [1, 3]
    meta_path.write_text(json.dumps(meta))
    assert load_bundle(root, device="cpu").task == "classification"
    # no declared input shape: the metadata output type decides
    root = write_seg_bundle(tmp_path / "s", fmt="json")
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    del cfg["inferer"]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = []
    meta_path.write_text(json.dumps(meta))
    bm = load_bundle(root, device="cpu")
    assert bm.target_layer is None and "spatial_shape" in bm.layer_error
    assert bm.task == "segmentation"


def test_config_choice(tmp_path):
    root = tmp_path / "b"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "inference.yaml").write_text("a: 1\n")
    assert find_config(root).name == "inference.yaml"
    (root / "configs" / "inference.json").write_text("{}")
    assert find_config(root).name == "inference.json"  # JSON first, as MONAI's own examples
    assert find_config(root, "inference.yaml").name == "inference.yaml"
    with pytest.raises(FileNotFoundError, match="infer.json is missing"):
        find_config(root, "infer.json")
