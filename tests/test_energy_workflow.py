from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from scipy import stats

from monai_gamverify.energy import volume_energy, volume_energy_multi
from monai_gamverify.energy.workflow import (
    AttributionEnergyd,
    AttributionEnergyHandler,
    SliceAggregateInferer,
    SliceCAMd,
    regression_metrics,
)
from monai_gamverify.networks.nets import convnext_pico
from monai_gamverify.visualize.cam import GradCAM

CATS = ["parotid", "larynx", "overall"]
COLS = {c: i for i, c in enumerate(CATS)}


@pytest.fixture(scope="module")
def net2d():
    torch.manual_seed(0)
    net = convnext_pico(spatial_dims=2, in_channels=1, out_channels=3).eval()
    with torch.no_grad():  # non-trivial head so every column has its own gradient
        net.head.weight.normal_(0, 0.5)
        net.head.bias.copy_(torch.tensor([3.0, 2.5, 3.5]))
    return net


@pytest.mark.parametrize(
    "spatial_dim, reduction",
    [(0, "none")]
    + [
        pytest.param(d, r, marks=pytest.mark.slow)
        for d in (0, 1, 2)
        for r in ("mean", "median", "none")
        if d or r != "none"
    ],
)
def test_slice_aggregate_inferer_matches_manual(net2d, spatial_dim, reduction):
    x = torch.rand(2, 1, 16, 16, 12)
    inferer = SliceAggregateInferer(spatial_dim=spatial_dim, sw_batch_size=5, reduction=reduction)
    with torch.no_grad():
        out = inferer(x, net2d)
        per = torch.stack([torch.stack([net2d(s) for s in x[b : b + 1].unbind(2 + spatial_dim)]) for b in range(2)])
        per = per[:, :, 0]  # (B, S, K)
    expected = {"mean": per.mean(1), "median": per.median(1).values, "none": per}[reduction]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_slice_aggregate_inferer_2d_passthrough_and_errors(net2d):
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(SliceAggregateInferer()(x, net2d), net2d(x))
    with pytest.raises(ValueError, match="expects"):
        SliceAggregateInferer()(torch.rand(1, 16, 16), net2d)
    with pytest.raises(ValueError, match="spatial_dim"):
        SliceAggregateInferer(spatial_dim=3)
    with pytest.raises(ValueError, match="reduction"):
        SliceAggregateInferer(reduction="max")


def _captum_energy(net, vol, column, slice_axis=2):
    """AE from captum: LayerGradCam (ReLU) of every slice along ``slice_axis``, bilinearly upsampled, summed."""
    captum = pytest.importorskip("captum.attr")
    lgc = captum.LayerGradCam(net, net.get_submodule("stages.2"))
    total = 0.0
    for sl in vol.as_tensor().unbind(1 + slice_axis):  # (C, H, W) slices of (C, D, H, W)
        x = sl[None].float()
        attr = lgc.attribute(x, target=column, relu_attributions=True)
        up = captum.LayerAttribution.interpolate(attr, tuple(x.shape[2:]), "bilinear")
        total += float(up.detach().double().sum())
    return total


@pytest.fixture(scope="module")
def captum_case(net2d):
    """A volume and its captum AE per output column (computed once for the parametrised test below)."""
    data = torch.rand(1, 16, 16, 6, generator=torch.Generator().manual_seed(5))
    vol = MetaTensor(data, meta={"filename_or_obj": "v"})
    return vol, {c: _captum_energy(net2d, vol, c) for c in range(3)}


@pytest.mark.parametrize("columns", [CATS, {"overall": 2, "parotid": 0}, [2, 0]])
def test_attribution_energyd_equals_captum_slice_sums(net2d, captum_case, columns):
    # independent reference: captum's LayerGradCam per slice, summed by hand (not the volume_energy the transform calls)
    vol, ref = captum_case
    out = AttributionEnergyd("image", net2d, "stages.2", columns, batch_size=4)({"image": vol, "id": "a"})
    if isinstance(columns, dict):
        expected = {k: ref[c] for k, c in columns.items()}
    elif isinstance(columns[0], str):
        expected = {k: ref[c] for c, k in enumerate(columns)}
    else:
        expected = {c: ref[c] for c in columns}
    assert list(out["energy"]) == list(expected)
    for k, v in expected.items():
        assert v > 0 and out["energy"][k] == pytest.approx(v, rel=1e-4)
    assert out["id"] == "a"


def test_attribution_energyd_known_map():
    # a network whose CAM is known in closed form: a 1x1 conv (weight w, activation A = w x) then global average
    # pooling, so dy/dA = 1 / (H W) everywhere, the Grad-CAM channel weight is 1 / (H W) and the map is w x / (H W)
    # (already at input size: no upsampling); AE = sum over the volume of 2 x / 64
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(1, 1, 1, bias=False))
    net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    with torch.no_grad():
        net.conv.weight.fill_(2.0)
    x = np.random.default_rng(2).random((1, 8, 8, 3)).astype(np.float32)
    out = AttributionEnergyd("image", net.eval(), "conv", ["only"], batch_size=2)({"image": torch.as_tensor(x)})
    assert out["energy"]["only"] == pytest.approx(float((2.0 * x.astype(np.float64) / 64).sum()), rel=1e-5)


def test_attribution_energyd_bad_input_names_file(net2d):
    vol = MetaTensor(torch.rand(1, 16, 16), meta={"filename_or_obj": "/data/flat.nii.gz"})
    with pytest.raises(ValueError, match="flat.nii.gz"):
        AttributionEnergyd("image", net2d, "stages.2", CATS)({"image": vol})
    with pytest.raises(ValueError, match="unknown CAM method"):
        AttributionEnergyd("image", net2d, "stages.2", CATS, method="lime")


def test_slice_camd_raw_sum_is_energy(net2d):
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    vol = MetaTensor(torch.rand(1, 16, 16, 8), affine=affine)
    raw = SliceCAMd("image", net2d, "stages.2", column=1, normalize=False, batch_size=3)({"image": vol})["cam"]
    assert raw.shape == (1, 16, 16, 8)
    torch.testing.assert_close(raw.affine, vol.affine)
    ae = volume_energy(GradCAM(net2d, "stages.2"), vol, class_idx=1, progress=False)
    assert float(raw.double().sum()) == pytest.approx(ae, rel=1e-5)
    norm = SliceCAMd("image", net2d, "stages.2", column=1)({"image": vol})["cam"]
    assert float(norm.min()) >= 0 and float(norm.max()) <= 1


def test_regression_metrics_known_values():
    pred = np.array([[1.0, 2.0], [2.0, 2.0], [4.0, 2.0], [3.0, 2.0]])
    target = np.array([[1.0, 1.0], [2.5, 2.0], [3.0, 3.0], [4.0, 4.0]])
    df = regression_metrics(pred, target, ["a", "b"])
    assert df.loc[0, "mae"] == pytest.approx(np.mean([0, 0.5, 1, 1]))
    assert df.loc[0, "spearman_rho"] == pytest.approx(stats.spearmanr(pred[:, 0], target[:, 0]).statistic)
    assert math.isnan(df.loc[1, "spearman_rho"])  # constant prediction: undefined, not an error
    with pytest.raises(ValueError, match="must both be"):
        regression_metrics(pred, target[:, :1], ["a", "b"])


def _evaluator(net, data, postprocessing, handler):
    loader = DataLoader(data, batch_size=1)
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=net,
        inferer=SliceAggregateInferer(spatial_dim=2, sw_batch_size=8),
        postprocessing=postprocessing,
        val_handlers=[handler],
    )


@pytest.mark.slow
def test_handler_in_evaluator_writes_table_and_plots(net2d, tmp_path):
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(6):
        img = MetaTensor(torch.rand(1, 16, 16, 6, generator=g) * (0.5 + i / 6))
        data.append({"image": img, "label": torch.tensor([1.0 + i * 0.5, 2.0 + (i % 3), 5.0 - i * 0.5]), "id": f"v{i}"})
    handler = AttributionEnergyHandler(CATS, tmp_path / "energy", log_dir=tmp_path / "tb", prefix="test_", n_boot=50)
    post = Compose([AttributionEnergyd("image", net2d, "stages.2", CATS, batch_size=4)])
    ev = _evaluator(net2d, data, post, handler)
    ev.run()

    vol = pd.read_csv(tmp_path / "energy" / "volume_scores.csv")
    assert vol["id"].tolist() == [f"v{i}" for i in range(6)]
    for i, d in enumerate(data):  # the handler's AE is the streamed AE of each volume
        expected = volume_energy_multi(GradCAM(net2d, "stages.2"), d["image"], COLS, progress=False)
        assert vol.loc[i, "ae_overall"] == pytest.approx(expected["overall"], rel=1e-4)
        assert vol.loc[i, "consensus_parotid"] == pytest.approx(float(d["label"][0]))
    table = pd.read_csv(tmp_path / "energy" / "energy_table.csv")
    assert table["category"].tolist() == CATS
    e = vol["ae_larynx"].to_numpy()
    s = vol["consensus_larynx"].to_numpy()
    assert table.set_index("category").loc["larynx", "rho"] == pytest.approx(stats.spearmanr(e, s).statistic)
    for name in ("energy_atypical.csv", "energy_loo.csv", "energy_table.json", "regression_metrics.csv"):
        assert (tmp_path / "energy" / name).is_file()
    for c in CATS:
        png = tmp_path / "energy" / f"energy_scatter_{c}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test_ae_rho_larynx" in ev.state.metrics and "test_mae_overall" in ev.state.metrics
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    # TensorBoard holds the AE rho scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "test_ae_rho_overall" in acc.Tags()["scalars"]


def test_handler_without_energy_or_labels(net2d, tmp_path):
    data = [{"image": torch.rand(1, 16, 16, 4), "label": torch.tensor([1.0 + i, 2.0, 3.0]), "id": i} for i in range(3)]
    handler = AttributionEnergyHandler(CATS, tmp_path, energy_key=None)
    ev = _evaluator(net2d, data, None, handler)
    ev.run()
    assert (tmp_path / "regression_metrics.csv").is_file()
    assert not (tmp_path / "energy_table.csv").exists()
    assert "mae_parotid" in ev.state.metrics

    bad = AttributionEnergyHandler(["a", "b"], None, energy_key=None)
    with pytest.raises(Exception, match="expected one per category"):
        _evaluator(net2d, data, None, bad).run()
    with pytest.raises(ValueError, match="categories"):
        AttributionEnergyHandler("parotid")


@pytest.mark.parametrize(
    "error, expected",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), torch.cuda.OutOfMemoryError),
        (RuntimeError("bad"), ValueError),
    ],
)
def test_bundle_energy_lets_out_of_memory_through(monkeypatch, tmp_path, error, expected):
    # an item that fails is named in a ValueError, but running out of memory is not the item's fault: it propagates
    import monai_gamverify.energy.workflow as wf

    class FakeBundle:
        metadata: dict = {}
        class_names = ["a", "b"]
        target_layer = "stages.2"
        network = convnext_pico(spatial_dims=2, in_channels=1, out_channels=2)

        def preprocessing(self):
            return None

        def slice_axis(self, ndim):
            return 2

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(wf, "load_bundle", lambda *a, **k: FakeBundle())
    monkeypatch.setattr(wf, "load_datalist", lambda *a, **k: [{"image": "/d/case_0/imaging.nii.gz", "a": 1, "b": 2}])
    monkeypatch.setattr(wf, "load_image", lambda path: torch.zeros(1, 8, 8, 4))
    monkeypatch.setattr(wf, "volume_energy_multi", fail)
    with pytest.raises(expected) as info:
        wf.bundle_energy("bundle", "datalist.json", tmp_path, progress=False)
    if expected is ValueError:
        assert "case_0/imaging.nii.gz" in str(info.value)
