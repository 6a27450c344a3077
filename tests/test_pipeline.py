"""The single-image engine (apps.pipeline.ImagePipeline) against independent references: plain forward passes,
Grad-CAM, MONAI's Invertd, nibabel affines; 2D, 3D and 2D-on-volume networks; bundle and network-by-name routes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_gamverify.apps.pipeline import ImagePipeline, PreprocessingError, decide_verdict
from monai_gamverify.bundle import load_bundle
from monai_gamverify.energy import SliceAggregateInferer, SliceCAMd, attribution_energy
from monai_gamverify.io.grid import invert_to_input
from monai_gamverify.networks.nets import SmallCNN
from monai_gamverify.visualize.cam import GradCAM, normalize_maps
from monai_gamverify.visualize.hooks import record_activations

SOS = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"
TINY = {"network_name": "small_cnn", "networks#small_cnn#width": 4, "roi_size": [16, 16, 16], "pixdim": [2.5] * 3}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _net(spatial_dims: int = 3, out: int = 3, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    net = SmallCNN(spatial_dims=spatial_dims, in_channels=1, out_channels=out, width=4).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
    return net


def _save(tmp_path: Path, arr: np.ndarray, affine: np.ndarray, name: str = "img.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))
    return path


def _volume(shape=(16, 18, 14), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=shape)
    vol[4:10, 5:12, 3:9] += 3.0
    return vol


AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.25, 0, 4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def test_3d_network_by_name(tmp_path):
    net = _net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    path = _save(tmp_path, _volume(), AFFINE)
    pipe = ImagePipeline.from_network("monai_gamverify.networks.nets.SmallCNN", "res4", checkpoint=tmp_path / "w.pt",
                                      network_args={"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                    "width": 4}, device="cpu", class_names=["a", "b", "c"])  # fmt: skip
    res = pipe.run(path, tmp_path / "out", name="case")
    x = torch.as_tensor(nib.load(str(path)).get_fdata(), dtype=torch.float32)[None, None]
    with torch.no_grad():
        logits = net(x)[0]
    np.testing.assert_allclose(res.logits.numpy(), logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.probabilities, logits.softmax(0).numpy(), rtol=1e-5, atol=1e-7)
    assert res.prediction == int(logits.argmax()) and res.prediction_name == "abc"[res.prediction]
    raw = GradCAM(net, "res4")(x, normalize=False)
    assert res.energy == pytest.approx(float(attribution_energy(raw)[0]), rel=1e-5)
    saved = nib.load(res.files["map"])
    np.testing.assert_array_equal(saved.affine, nib.load(str(path)).affine)  # the input's affine
    np.testing.assert_allclose(saved.get_fdata(), normalize_maps(raw)[0, 0].numpy(), atol=1e-6)
    assert Path(res.files["overlay"]).read_bytes()[:4] == b"\x89PNG" and Path(res.files["summary"]).is_file()
    assert res.verdict == "unverified" and res.garbage is None and res.in_distribution is None


def test_2d_image(tmp_path):
    net = _net(spatial_dims=2)
    rng = np.random.default_rng(1)
    img = rng.normal(size=(24, 20))
    img[5:12, 6:14] += 3
    affine = np.diag([0.5, 0.7, 1.0, 1.0])
    path = _save(tmp_path, img, affine)
    pipe = ImagePipeline.from_network(net, "res4", spatial_dims=2, device="cpu")
    res = pipe.run(path, tmp_path / "out")
    x = torch.as_tensor(img, dtype=torch.float32)[None, None]
    want = GradCAM(net, "res4")(x)[0, 0].numpy()
    saved = nib.load(res.files["map"])
    assert saved.shape == (24, 20)
    np.testing.assert_allclose(saved.get_fdata(), want, atol=1e-6)
    np.testing.assert_allclose(saved.affine, affine)


def test_2d_network_on_a_volume_slice_by_slice(tmp_path):
    net = _net(spatial_dims=2, out=2)
    path = _save(tmp_path, _volume((12, 14, 6)), AFFINE)
    pipe = ImagePipeline.from_network(net, "res4", slice_axis=2, device="cpu", regression=True)
    res = pipe.run(path)
    x = torch.as_tensor(nib.load(str(path)).get_fdata(), dtype=torch.float32)[None, None]
    with torch.no_grad():
        logits = SliceAggregateInferer(spatial_dim=2)(x, net)[0]
    np.testing.assert_allclose(res.logits.numpy(), logits.numpy(), rtol=1e-5, atol=1e-6)
    assert res.probabilities is None  # regression: scores, no softmax
    raw = SliceCAMd("image", net, "res4", column=int(logits.argmax()), slice_axis=2, normalize=False).maps(x[0])
    assert res.energy == pytest.approx(float(raw.double().sum()), rel=1e-5)
    np.testing.assert_allclose(res.cam.numpy(), normalize_maps(raw[None])[0].numpy(), atol=1e-6)


def test_bundle_route_equals_network_by_name_route(tmp_path):
    torch.manual_seed(2)
    bm = load_bundle(SOS, overrides=TINY, require_weights=False, device="cpu")
    torch.save(bm.network.state_dict(), tmp_path / "w.pt")
    # an image already on the bundle's grid (RAS, 2.5 mm, 16^3): its preprocessing is then only the HU window
    path = _save(tmp_path, _volume((16, 16, 16)) * 500, np.diag([2.5, 2.5, 2.5, 1.0]))
    by_bundle = ImagePipeline.from_bundle(SOS, overrides=TINY, checkpoint=tmp_path / "w.pt", device="cpu")
    by_name = ImagePipeline.from_network("monai_gamverify.networks.SmallCNN", "res4", checkpoint=tmp_path / "w.pt",
                                         network_args={"spatial_dims": 3, "in_channels": 1, "out_channels": 5,
                                                       "width": 4}, a_min=-1000, a_max=2000, device="cpu")  # fmt: skip
    a, b = by_bundle.run(path, tmp_path / "a"), by_name.run(path, tmp_path / "b")
    np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.cam.numpy(), b.cam.numpy(), atol=1e-5)
    ma, mb = nib.load(a.files["map"]), nib.load(b.files["map"])
    np.testing.assert_allclose(ma.get_fdata(), mb.get_fdata(), atol=1e-5)
    np.testing.assert_array_equal(ma.affine, mb.affine)
    assert a.energy == pytest.approx(b.energy, rel=1e-5)


def test_map_on_input_grid_equals_invertd_and_keeps_the_affine(tmp_path):
    torch.manual_seed(3)
    lpi = np.array([[-1.3, 0, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 1.6, -5.0], [0, 0, 0, 1]])
    path = _save(tmp_path, _volume((20, 26, 12)) * 400, lpi)
    pipe = ImagePipeline.from_bundle(SOS, overrides=TINY, require_weights=False, device="cpu")
    res = pipe.run(path, tmp_path / "o", name="m")
    want = invert_to_input(res.cam, res.input, pipe.preprocessing)  # MONAI's Invertd
    saved = nib.load(res.files["map"])
    assert saved.shape == (20, 26, 12)
    np.testing.assert_allclose(saved.get_fdata(), want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(saved.affine, nib.load(str(path)).affine, atol=1e-6)
    pipe.invert = False  # the preprocessed grid: the reference map's grid
    flat = pipe.run(path, tmp_path / "o", name="flat")
    assert nib.load(flat.files["map"]).shape == (16, 16, 16)


class _FixedScreen:
    """A minimal screen (the engine's protocol): names the layers it wants recorded, keeps the observations it is
    given, answers with a fixed verdict."""

    early_layers = ["res2"]
    head = "head"

    def __init__(self, in_distribution: bool) -> None:
        self.ok, self.calls = in_distribution, []

    def score(self, observation):
        self.calls.append(observation)
        return {"in_distribution": self.ok, "p_value": 0.5 if self.ok else 0.001, "reasons": [] if self.ok else ["x"]}


def test_screen_uses_the_cam_forward_pass_and_decides_first(tmp_path):
    net = _net(out=4)
    path = _save(tmp_path, _volume(), AFFINE)
    screen = _FixedScreen(False)
    forwards = []
    handle = net.register_forward_pre_hook(lambda m, i: forwards.append(1))
    try:
        pipe = ImagePipeline.from_network(net, "res4", device="cpu", screen=screen,
                                          class_names=["a", "b", "c", "garbage"], garbage_threshold=0.0)  # fmt: skip
        res = pipe.run(path)
    finally:
        handle.remove()
    assert len(forwards) == 1  # the features come from the CAM's own forward pass
    obs = screen.calls[0]
    x = obs.input.unsqueeze(0)
    want = record_activations(net, x, "res2")["res2"].double().flatten(2)
    pooled = torch.cat([want.mean(-1), want.std(-1, unbiased=False)], 1)[0].numpy()
    np.testing.assert_allclose(obs.features["res2"], pooled, rtol=1e-5, atol=1e-7)
    assert obs.raw_image.shape == (1, 16, 18, 14) and torch.equal(obs.cam, res.cam)
    assert res.in_distribution is False and res.p_value == 0.001 and res.reasons == ["x"]
    assert res.rejected  # K+1 rejects too, but the screen's verdict comes first
    assert res.verdict == "out of distribution"
    screen.ok = True
    assert pipe.run(path).verdict == "rejected"


def test_observe_against_independent_references(tmp_path):
    """ImagePipeline.observe: logits of a plain forward, the raw map of GradCAM, the head input of a hook, the early
    layer pooled by numpy, the map on the input grid equal to the written NIfTI, the image's affine."""
    net = _net(out=3)
    path = _save(tmp_path, _volume(), AFFINE)
    pipe = ImagePipeline.from_network(net, "res4", device="cpu", feature_layers=["stem"], head="head")
    obs = pipe.observe(str(path))
    x = torch.as_tensor(nib.load(str(path)).get_fdata(), dtype=torch.float32)[None, None]
    with torch.no_grad():
        logits = net(x)[0]
    np.testing.assert_allclose(obs.logits.numpy(), logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(obs.probabilities.numpy(), logits.softmax(0).numpy(), rtol=1e-5, atol=1e-7)
    assert obs.prediction == int(logits.argmax()) == obs.explained_class and obs.task == "classification"
    raw = GradCAM(net, "res4")(x, normalize=False)
    np.testing.assert_allclose(obs.raw_map.numpy(), raw[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(obs.cam.numpy(), normalize_maps(raw)[0].numpy(), atol=1e-6)
    assert obs.energy == pytest.approx(float(raw.double().sum()), rel=1e-6)
    heads = []
    handle = net.head.register_forward_pre_hook(lambda m, i: heads.append(i[0].detach().double()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    np.testing.assert_allclose(obs.features["penultimate"], heads[0][0].numpy(), rtol=1e-5, atol=1e-7)
    stem = record_activations(net, x, "stem")["stem"][0].double().numpy().reshape(4, -1)
    np.testing.assert_allclose(obs.features["stem"], np.r_[stem.mean(1), stem.std(1)], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(obs.affine), nib.load(str(path)).affine)
    res = pipe.run(path, tmp_path / "out", name="case")  # the written map is the observation's map on the input grid
    np.testing.assert_allclose(nib.load(res.files["map"]).get_fdata(), obs.cam_input[0].numpy(), atol=1e-6)
    assert set(obs.settings) == {"reader", "layer", "method", "class_policy", "slice_axis", "preprocessing"}
    # an item dict and the image as read give the same observation; forward=False reads and preprocesses only
    again = pipe.observe({"image": str(path)})
    torch.testing.assert_close(again.logits, obs.logits)
    bare = pipe.observe(str(path), forward=False)
    assert bare.logits is None and bare.raw_maps == {} and bare.input.shape == (1, 16, 18, 14)


def test_verdict_order():
    assert decide_verdict(False, True, 0.9, 0.5) == "out of distribution"
    assert decide_verdict(True, True, 0.9, 0.5) == "rejected"
    assert decide_verdict(None, False, 0.5, 0.5) == "suitable"
    assert decide_verdict(None, None, 0.49, 0.5) == "not suitable"
    assert decide_verdict(None, None, None, 0.5) == "unverified"


def test_batched_features_equal_one_call_per_map(tmp_path):
    from monai_gamverify.metrics.similarity import similarity_metrics

    net = _net()
    ref = normalize_maps(torch.rand(1, 1, 16, 18, 14))
    pipe = ImagePipeline.from_network(net, "res4", device="cpu", reference=ref)
    maps = [normalize_maps(torch.rand(1, 1, 16, 18, 14))[0] for _ in range(3)] + [torch.zeros(1, 4, 4, 4)]
    got = pipe.features(maps)
    for m, f in zip(maps[:3], got[:3]):
        want = similarity_metrics(m[None], ref, metrics=pipe.metrics)
        assert f == pytest.approx({k: float(v[0]) for k, v in want.items()}, rel=1e-5, abs=1e-6)
    assert isinstance(got[3], ValueError) and "reference map" in str(got[3])


def test_missing_image_and_dicom_series_directory(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.uid import generate_uid

    net = _net()
    pipe = ImagePipeline.from_network(net, "res4", device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        pipe.run(tmp_path / "nope.nii.gz")
    study = generate_uid()
    vol = (_volume((8, 16, 18)) * 100 + 1000).astype(np.uint16)  # 8 slices of 16 x 18
    d = tmp_path / "series"
    d.mkdir()
    write_series(d, generate_uid(), study, vol)
    res = pipe.run(d, tmp_path / "out", name="series")  # a directory: not refused by an is_file() check
    saved = nib.load(res.files["map"])
    assert saved.shape == tuple(res.raw_image.shape[1:]) and sorted(saved.shape) == [8, 16, 18]
    np.testing.assert_allclose(saved.affine, np.asarray(res.raw_image.affine), atol=1e-4)
    assert sorted(np.round(np.abs(np.diag(saved.affine[:3, :3])), 3)) == [0.8, 0.9, 1.5]
    # two series in one folder: refused (io.load_image's policy), never the first one ITK happens to list
    pytest.importorskip("itk")
    write_series(d, generate_uid(), study, vol, prefix="t")
    with pytest.raises(PreprocessingError, match="holds 2 DICOM series"):
        pipe.observe(d)


def write_series(d: Path, series: str, study: str, vol: np.ndarray, prefix: str = "s") -> None:
    """One DICOM file per slice of ``vol`` in ``d`` (pydicom), series ``series``."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    for k in range(vol.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(d / f"{prefix}{k:02d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.9], 1.5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 1.5 * k]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = vol[k].tobytes()
        ds.save_as(str(d / f"{prefix}{k:02d}.dcm"), enforce_file_format=True)


def test_observation_settings_and_the_screen_refusal():
    """The preprocessing hash follows every setting of the transforms; a screen refuses observations made with
    settings it was not fitted with, naming both."""
    from monai_gamverify.apps.pipeline import preprocessing_hash, simple_preprocessing
    from monai_gamverify.screening import Screen

    assert preprocessing_hash(simple_preprocessing(3, -1000, 2000)) == preprocessing_hash(
        simple_preprocessing(3, -1000, 2000)
    )
    assert preprocessing_hash(simple_preprocessing(3, -1000, 2000)) != preprocessing_hash(
        simple_preprocessing(3, -1000, 1500)
    )
    pipe = ImagePipeline.from_network(_net(), "res4", device="cpu", a_min=-1000, a_max=2000)
    fitted = pipe.observation_settings()
    assert (
        fitted["reader"] == "default" and fitted["slice_axis"] is None and fitted["class_policy"] == "predicted class"
    )
    screen = Screen(cam_layer="res4")
    screen.observation_ = fitted
    screen.check_settings(fitted)
    other = ImagePipeline.from_network(_net(), "res4", device="cpu", a_min=-1000, a_max=1500).observation_settings()
    with pytest.raises(ValueError, match=r"preprocessing '[0-9a-f]{16}' \(the screen was fitted with '[0-9a-f]{16}'\)"):
        screen.check_settings(other)
    with pytest.raises(ValueError, match=r"slice_axis 2 \(the screen was fitted with None\)"):
        screen.check_settings({**fitted, "slice_axis": 2})
    # without the attention detector, the CAM layer, method and class do not change the screen's evidence
    no_attention = Screen(cam_layer=None)
    no_attention.observation_ = fitted
    no_attention.check_settings({**fitted, "method": "scorecam", "layer": "res2", "class_policy": "output 1"})
    with pytest.raises(ValueError, match="method 'scorecam'"):
        screen.check_settings({**fitted, "method": "scorecam"})
    screen.observation_ = None  # a screen of an earlier version records no settings: not checked
    screen.check_settings(other)
