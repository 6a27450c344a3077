"""MONAI Label / MONAI Deploy integrations: bundle checks, the SDK-independent core, the SDK operator if installed."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from monai_gamverify.apps.integrations import VERDICTS, SuitabilityPipeline, image_stem
from monai_gamverify.apps.integrations.deploy import GamverifyRunner, image_array_and_affine
from monai_gamverify.apps.integrations.monailabel import (
    SuitabilityInfer,
    check_bundle_for_monailabel,
    infer_type_from_name,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SOS = BUNDLES / "sos_staging"
TINY = {
    "network_name": "small_cnn",
    "networks#small_cnn#width": 4,
    "roi_size": [16, 16, 16],
    "pixdim": [2.5, 2.5, 2.5],
}
NAMES = ["stage1_open", "stage2", "stage3", "stage4", "stage5_fused"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A 20x22x18 HU volume with an oblique-free but shifted, anisotropic affine."""
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 400, (20, 22, 18))
    vol[6:14, 8:16, 5:12] += 1200  # a bright block so the map has structure
    affine = np.diag([1.5, 1.25, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    path = tmp_path_factory.mktemp("img") / "case_7.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(path))
    return path


@pytest.fixture(scope="module")
def pipeline() -> SuitabilityPipeline:
    torch.manual_seed(0)
    return SuitabilityPipeline(SOS, overrides=TINY, require_weights=False, device="cpu")


# ----------------------------------------------------------------------------------------------------- MONAI Label
@pytest.mark.parametrize("name", ["sos_staging", "ceph_class3", "cbct_quality"])
def test_bundles_have_what_bundle_infer_task_reads(name):
    root = BUNDLES / name
    report = check_bundle_for_monailabel(root, instantiate=name == "sos_staging")
    assert report["ok"], report["problems"]
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    nd = meta["network_data_format"]
    pred = nd["outputs"]["pred"]["channel_def"]
    assert report["key_image"] == next(iter(nd["inputs"])) == "image"
    assert report["key_pred"] == next(iter(nd["outputs"])) == "pred"
    assert report["labels"] == {v.lower(): int(k) for k, v in pred.items()}
    assert report["dimension"] == len(nd["inputs"]["image"]["spatial_shape"])
    assert report["pre_keys"] == ["preprocessing"] and report["post_keys"] == ["postprocessing"]
    # the stock monaibundle app derives the type from the directory name: these bundles need a custom task
    assert report["type_from_name"] == "segmentation" and report["recommended_type"] == "classification"
    assert any("add_post_restore=False" in w for w in report["warnings"])


def test_check_bundle_reports_problems(tmp_path):
    root = tmp_path / "broken_classification"
    shutil.copytree(SOS / "configs", root / "configs")
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    del cfg["preprocessing"]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    report = check_bundle_for_monailabel(root, instantiate=False)
    assert not report["ok"]
    assert any("preprocessing" in p for p in report["problems"])
    assert any("channel_def is empty" in p for p in report["problems"])
    assert report["type_from_name"] == "classification" and not report["has_weights"]
    with pytest.raises(ValueError, match="channel_def"):
        check_bundle_for_monailabel(root, instantiate=False, strict=True)
    (root / "configs" / "inference.json").unlink()
    assert any("no infer config" in p for p in check_bundle_for_monailabel(root)["problems"])


def test_check_bundle_runs_network_on_declared_shape(tmp_path):
    root = tmp_path / "sos"
    shutil.copytree(SOS / "configs", root / "configs")
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"]["5"] = "extra"
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 6
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["network_name"] = "small_cnn"
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    report = check_bundle_for_monailabel(root)
    assert report["problems"] == ["network_def gives 5 outputs for 6 labels in channel_def"]


def test_infer_type_from_name():
    assert infer_type_from_name("sos_staging") == "segmentation"
    assert infer_type_from_name("SOS_Classification_v1") == "classification"
    assert infer_type_from_name("deepedit_seg") == "deepedit"


def test_pipeline_prediction_and_map_against_references(pipeline, image, tmp_path):
    from monai.visualize import GradCAM as MonaiGradCAM

    res = pipeline.run(image, tmp_path)
    assert res["verdict"] == "unverified" and res["p_suitable"] is None and res["features"] is None
    assert res["garbage"] is None and res["cam_layer"] == "res4"
    # independent reference: the bundle's preprocessing and a plain forward pass
    x = pipeline.preprocessing({"image": str(image)})["image"].unsqueeze(0).float()
    net = pipeline.bundle.network
    with torch.no_grad():
        probs = torch.softmax(net(x.as_tensor()), dim=1)[0]
    assert list(res["probabilities"]) == NAMES
    np.testing.assert_allclose(list(res["probabilities"].values()), probs.numpy(), rtol=1e-5, atol=1e-6)
    assert res["prediction"] == int(probs.argmax()) and res["prediction_name"] == NAMES[res["prediction"]]
    # the map lies on the input's grid, with its affine
    src, cam = nib.load(str(image)), nib.load(res["cam"])
    assert Path(res["cam"]).name == "case_7_cam.nii.gz"
    assert cam.shape == src.shape
    np.testing.assert_allclose(cam.affine, src.affine, atol=1e-5)
    data = cam.get_fdata()
    assert np.isfinite(data).all() and data.min() >= -1e-5 and data.max() <= 1 + 1e-5 and data.max() > 0.1
    # on the preprocessed grid the map is MONAI's Grad-CAM of the predicted class
    flat = SuitabilityPipeline(SOS, overrides=TINY, require_weights=False, device="cpu", invert=False)
    flat.bundle.network.load_state_dict(net.state_dict())
    res2 = flat.run(image, tmp_path / "flat")
    assert all(p.grad is None for p in net.parameters()) and not net.training  # the pipeline left no trace
    # MONAI's default normaliser maps (min, max) to (1, 0): take the raw map and min-max it here
    # (on a copy: MONAI's hooks stay on the module)
    raw = MonaiGradCAM(nn_module=copy.deepcopy(net), target_layers="res4", postprocessing=lambda m: m)(x.as_tensor())
    ref = raw[0, 0].detach().numpy()
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    got = nib.load(res2["cam"]).get_fdata()
    assert got.shape == ref.shape == (16, 16, 16)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_pipeline_verdict_with_reference_and_verifier(pipeline, image, tmp_path):
    from monai_gamverify.io import save_nifti
    from monai_gamverify.metrics.similarity import DEFAULT_METRICS
    from monai_gamverify.verification.verifier import SuitabilityVerifier

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij"))
    ref_map = np.exp(-(grid**2).sum(0) * 2).astype(np.float32)
    ref_path = save_nifti(ref_map, tmp_path / "reference_map.nii.gz")
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.uniform(0, 1, (40, len(DEFAULT_METRICS))), columns=list(DEFAULT_METRICS))
    table["label"] = (table["cosine"] > 0.5).astype(int)
    ver_path = SuitabilityVerifier(n_estimators=15, random_state=0).fit(table).save(tmp_path / "verifier.skops")

    with pytest.raises(ValueError, match="reference"):
        SuitabilityPipeline(SOS, overrides=TINY, require_weights=False, verifier=ver_path)
    pipe = SuitabilityPipeline(
        SOS, overrides=TINY, require_weights=False, device="cpu", reference=ref_path, verifier=ver_path, invert=False
    )
    pipe.bundle.network.load_state_dict(pipeline.bundle.network.state_dict())
    res = pipe.run(image, tmp_path / "out")
    assert set(res["features"]) == set(DEFAULT_METRICS)
    cam = nib.load(res["cam"]).get_fdata().ravel()
    cos = float(cam @ ref_map.ravel() / (np.linalg.norm(cam) * np.linalg.norm(ref_map)))
    assert res["features"]["cosine"] == pytest.approx(cos, abs=1e-4)
    loaded = SuitabilityVerifier.load(ver_path)
    expected = loaded.predict_proba(pd.DataFrame([res["features"]])[list(DEFAULT_METRICS)])[0, 1]
    assert res["p_suitable"] == pytest.approx(expected)
    assert res["verdict"] == ("suitable" if expected >= 0.5 else "not suitable")
    pipe.threshold = 0.0
    assert pipe.run(image, tmp_path / "out")["verdict"] == "suitable"
    pipe.threshold = 1.0 + 1e-9
    assert pipe.run(image, tmp_path / "out")["verdict"] == "not suitable"


def test_pipeline_garbage_class(image, tmp_path):
    torch.manual_seed(3)
    over = {**TINY, "num_classes": 6, "class_names": NAMES + ["garbage"]}
    pipe = SuitabilityPipeline(SOS, overrides=over, require_weights=False, device="cpu")
    assert pipe.garbage_index == 5
    res = pipe.run(image, tmp_path)
    probs = np.array(list(res["probabilities"].values()))
    g = res["garbage"]
    assert g["rejected"] == (int(probs.argmax()) == 5)
    assert g["garbage_prob"] == pytest.approx(probs[5], abs=1e-6)
    assert g["best_real_class"] == int(probs[:5].argmax()) and g["best_real_name"] == NAMES[g["best_real_class"]]
    assert res["verdict"] == ("rejected" if g["rejected"] else "unverified")
    pipe.garbage_threshold = 0.0  # every image reaches p(garbage) >= 0
    res = pipe.run(image, tmp_path)
    assert res["garbage"]["rejected"] and res["verdict"] == "rejected" and res["verdict"] in VERDICTS


def test_pipeline_bad_inputs(pipeline, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        pipeline.run(tmp_path / "nope.nii.gz", tmp_path)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(flat))
    with pytest.raises(ValueError, match="flat.nii.gz"):
        pipeline.run(flat, tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        pipeline.run_array(np.full((8, 8, 8), np.nan), tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        SuitabilityPipeline(SOS, overrides=TINY, require_weights=False, threshold=2.0)
    with pytest.raises(FileNotFoundError, match="weights"):
        SuitabilityPipeline(SOS, overrides=TINY, checkpoint=tmp_path / "missing.pt")
    assert image_stem("/a/b/case_1.nii.gz") == "case_1" and image_stem("x.mha") == "x"


def test_suitability_infer_request(pipeline, image, tmp_path):
    infer = SuitabilityInfer(SOS, overrides=TINY, require_weights=False, device="cpu", output_dir=tmp_path)
    infer.pipeline.bundle.network.load_state_dict(pipeline.bundle.network.state_dict())
    cam_file, result = infer({"image": str(image), "device": "cpu"})
    direct = pipeline.run(image, tmp_path / "direct")
    assert Path(cam_file).is_file() and cam_file == result["cam"]["path"] and result["cam"]["in_response"]
    assert result["cam"]["shape"] == list(nib.load(str(image)).shape)
    assert result["label"] == direct["prediction_name"] and result["label_index"] == direct["prediction"]
    assert result["probabilities"] == pytest.approx(direct["probabilities"])
    assert result["suitability"]["verdict"] == "unverified" and result["suitability"]["threshold"] == 0.5
    assert result["screen"] == {"in_distribution": None, "p_value": None, "reasons": direct["reasons"]}  # no screen
    np.testing.assert_allclose(nib.load(cam_file).get_fdata(), nib.load(direct["cam"]).get_fdata(), atol=1e-6)
    json.dumps(result)  # MONAI Label sends it as JSON
    info = infer.info()
    assert info["labels"] == {n: i for i, n in enumerate(NAMES)} and info["dimension"] == 3
    with pytest.raises(ValueError, match="image"):
        infer({"image": None})
    with pytest.raises(TypeError, match="dict"):
        infer("case.nii.gz")
    with pytest.raises(ValueError, match="nope.nii.gz.*not found"):
        infer({"image": str(tmp_path / "nope.nii.gz")})
    # the plain route: same preprocessing and network, no map
    none, plain = infer.predict({"image": str(image)})
    assert none is None and plain["label"] == result["label"]
    assert plain["probabilities"] == pytest.approx(result["probabilities"], abs=1e-5)


def test_suitability_infer_leaves_one_file_only(pipeline, image, tmp_path, monkeypatch):
    """Without output_dir (the server's case): one temporary file, which the server deletes; no folder left."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    infer = SuitabilityInfer(SOS, overrides=TINY, require_weights=False, device="cpu")
    infer.pipeline.bundle.network.load_state_dict(pipeline.bundle.network.state_dict())
    cam_file, result = infer({"image": str(image)})
    assert [p.name for p in tmp.iterdir()] == [Path(cam_file).name] and Path(cam_file).is_file()
    assert result["cam"]["path"] is None  # the server deletes the file once answered: no dead path in the json
    np.testing.assert_allclose(nib.load(cam_file).affine, nib.load(str(image)).affine, atol=1e-5)
    Path(cam_file).unlink()
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(flat))
    with pytest.raises(ValueError, match="flat.nii.gz"):
        infer({"image": str(flat)})
    assert list(tmp.iterdir()) == []  # a failed request leaves nothing either


def _fake_monailabel(monkeypatch) -> None:
    """Minimal stand-ins for the two MONAI Label modules the task subclasses (signatures as in MONAI Label 0.8)."""

    class InferType:
        CLASSIFICATION = "classification"

    class BasicInferTask:
        def __init__(self, path, network, type, labels, dimension, description, config=None, **kwargs):
            self.path, self.network, self.type, self.labels = path, network, type, labels
            self.dimension, self.description, self._config = dimension, description, dict(config or {})

        def info(self):
            return {"type": self.type, "labels": self.labels, "dimension": self.dimension}

    class MONAILabelError:
        INVALID_INPUT = "INVALID_INPUT"
        APP_INIT_ERROR = "APP_INIT_ERROR"

    class MONAILabelException(Exception):
        def __init__(self, error, msg):
            super().__init__(msg)
            self.error, self.msg = error, msg

    class HTTPException(Exception):  # fastapi.HTTPException's signature
        def __init__(self, status_code, detail=None, headers=None):
            super().__init__(detail)
            self.status_code, self.detail = status_code, detail

    mods = {
        "fastapi": types.ModuleType("fastapi"),
        "monailabel.interfaces.exception": types.ModuleType("monailabel.interfaces.exception"),
        "monailabel": types.ModuleType("monailabel"),
        "monailabel.interfaces": types.ModuleType("monailabel.interfaces"),
        "monailabel.interfaces.tasks": types.ModuleType("monailabel.interfaces.tasks"),
        "monailabel.interfaces.tasks.infer_v2": types.ModuleType("monailabel.interfaces.tasks.infer_v2"),
        "monailabel.tasks": types.ModuleType("monailabel.tasks"),
        "monailabel.tasks.infer": types.ModuleType("monailabel.tasks.infer"),
        "monailabel.tasks.infer.basic_infer": types.ModuleType("monailabel.tasks.infer.basic_infer"),
    }
    mods["monailabel.interfaces.tasks.infer_v2"].InferType = InferType
    mods["monailabel.tasks.infer.basic_infer"].BasicInferTask = BasicInferTask
    mods["fastapi"].HTTPException = HTTPException
    mods["monailabel.interfaces.exception"].MONAILabelError = MONAILabelError
    mods["monailabel.interfaces.exception"].MONAILabelException = MONAILabelException
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_monailabel_task_is_built_lazily(monkeypatch, image, tmp_path):
    import monai_gamverify.apps.integrations.monailabel as ml

    monkeypatch.setattr(ml, "_TASK_CLASS", None)
    monkeypatch.setattr(ml, "_ERROR_CLASS", None)
    monkeypatch.setitem(sys.modules, "monailabel", None)  # not installed
    with pytest.raises(ImportError, match="SuitabilityInfer"):
        ml.SuitabilityInferTask  # noqa: B018
    monkeypatch.delitem(sys.modules, "monailabel")
    _fake_monailabel(monkeypatch)
    task_cls = ml.SuitabilityInferTask
    base = sys.modules["monailabel.tasks.infer.basic_infer"].BasicInferTask
    assert issubclass(task_cls, base) and ml.SuitabilityInferTask is task_cls
    conf = {"gamverify_threshold": "0.7"}
    task = task_cls(str(SOS), conf, overrides=TINY, require_weights=False, output_dir=tmp_path)
    assert task.type == "classification" and task.labels == {n: i for i, n in enumerate(NAMES)}
    version = json.loads((SOS / "configs" / "metadata.json").read_text())["version"]
    assert task.path is None and task.core.pipeline.threshold == 0.7 and task.info()["version"] == version
    assert task.pre_transforms() and task.post_transforms() == []
    cam_file, result = task({"image": str(image), "device": "cpu"})
    assert Path(cam_file).is_file() and result["label_names"] == task.labels
    assert result["suitability"]["verdict"] == "unverified"
    # bad requests: MONAI Label's exception type that the server answers as HTTP 4xx with the message
    exc = sys.modules["monailabel.interfaces.exception"]
    http = sys.modules["fastapi"].HTTPException
    with pytest.raises(exc.MONAILabelException, match="not found") as err:
        task({"image": str(tmp_path / "nope.nii.gz")})
    assert (
        isinstance(err.value, http)
        and err.value.status_code == 404
        and err.value.error == exc.MONAILabelError.INVALID_INPUT
    )
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(http, match="bad.nii.gz") as err:
        task({"image": str(bad)})
    assert err.value.status_code == 422 and "bad.nii.gz" in err.value.detail
    # the predict route shares the network
    plain = task_cls(str(SOS), conf, predict_only=True, core=task.core)
    assert plain.core is task.core and plain.info()["gamverify"]["predict_only"]
    none, res = plain({"image": str(image)})
    assert none is None and res["label"] == result["label"]


# ----------------------------------------------------------------------------------------------------- MONAI Deploy
class _FakeImage:
    """Same interface as ``monai.deploy.core.domain.Image`` (``asnumpy()``, ``metadata()``)."""

    def __init__(self, data, metadata=None):
        self._data, self._metadata = data, metadata or {}

    def asnumpy(self):
        return self._data

    def metadata(self):
        return self._metadata


def test_image_array_and_affine():
    from monai.data import MetaTensor

    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a, af, name = image_array_and_affine(_FakeImage(arr, {"affine": aff, "filename": "/x/case_3.nii.gz"}))
    assert a is arr and np.array_equal(af, aff) and name == "case_3"
    dicom = {
        "row_pixel_spacing": 3.0,  # PixelSpacing[0]: between rows, along the column direction (j)
        "col_pixel_spacing": 2.0,  # PixelSpacing[1]: between columns, along the row direction (i)
        "row_direction_cosine": [1.0, 0.0, 0.0],
        "col_direction_cosine": [0.0, 1.0, 0.0],
        "dicom_affine_transform": np.array([[3.0, 0, 0, 5], [0, 2.0, 0, 6], [0, 0, 4.0, 7], [0, 0, 0, 1]]),
        "nifti_affine_transform": np.eye(4),  # SDK 4.0's, wrong for non-square pixels: not used
        "SeriesInstanceUID": "1.2.3",
    }
    a, af, name = image_array_and_affine(_FakeImage(arr, dicom))
    expected = np.array([[-2.0, 0, 0, -5], [0, -3.0, 0, -6], [0, 0, 4.0, 7], [0, 0, 0, 1]])  # LPS -> RAS
    assert a.shape == (4, 3, 2) and a[3, 2, 1] == arr[1, 2, 3] and np.array_equal(af, expected) and name == "1.2.3"
    mt = MetaTensor(torch.as_tensor(arr)[None], affine=torch.as_tensor(aff), meta={"filename_or_obj": "y/z.nii"})
    a, af, name = image_array_and_affine(mt)
    assert a.shape == (1, 2, 3, 4) and np.allclose(af, aff) and name == "z"
    assert image_array_and_affine(arr)[1] is None
    with pytest.raises(TypeError, match="Image"):
        image_array_and_affine({"image": arr})


def test_gamverify_runner_without_sdk(pipeline, image, tmp_path):
    runner = GamverifyRunner(SOS, tmp_path / "out", overrides=TINY, require_weights=False, device="cpu")
    runner.pipeline.bundle.network.load_state_dict(pipeline.bundle.network.state_dict())
    prediction, cam, verdict = runner(str(image))
    src = nib.load(str(image))
    in_memory = _FakeImage(np.asarray(src.dataobj)[None], {"affine": src.affine, "filename": "mem_case.nii.gz"})
    prediction2, cam2, verdict2 = runner(in_memory)
    assert prediction == {**prediction2} and verdict == verdict2 and verdict["verdict"] == "unverified"
    assert cam.name == "case_7_cam.nii.gz" and cam2.name == "mem_case_cam.nii.gz"
    np.testing.assert_allclose(nib.load(cam2).get_fdata(), nib.load(cam).get_fdata(), atol=1e-5)
    np.testing.assert_allclose(nib.load(cam2).affine, src.affine, atol=1e-5)
    record = json.loads((tmp_path / "out" / "mem_case_gamverify.json").read_text())
    assert record["prediction"] == prediction2 and record["verdict"] == "unverified" and record["cam"] == str(cam2)


def test_deploy_operator_in_application(pipeline, image, tmp_path):
    pytest.importorskip("monai.deploy.core")
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import Application

    from monai_gamverify.apps.integrations.deploy import GamverifyOperator, ImageFileLoaderOperator

    state = pipeline.bundle.network.state_dict()
    ops = {}

    class App(Application):
        def compose(self):
            load = ImageFileLoaderOperator(self, CountCondition(self, 1), input_path=image, name="load")
            gam = GamverifyOperator(
                self, bundle_path=SOS, output_folder=tmp_path, overrides=TINY, require_weights=False, name="gam"
            )
            gam.runner.pipeline.bundle.network.load_state_dict(state)
            ops["gam"] = gam
            self.add_flow(load, gam, {("image", "image")})

    App([sys.executable, "app.py"]).run()
    (prediction, cam, verdict), *rest = ops["gam"].results
    assert not rest
    direct = pipeline.run(image, tmp_path / "direct")
    assert prediction["class_name"] == direct["prediction_name"]
    assert prediction["probabilities"] == pytest.approx(direct["probabilities"], abs=1e-5)
    assert verdict["verdict"] == "unverified" and cam == tmp_path / "case_7_cam.nii.gz"
    np.testing.assert_allclose(nib.load(cam).affine, nib.load(str(image)).affine, atol=1e-5)
    np.testing.assert_allclose(nib.load(cam).get_fdata(), nib.load(direct["cam"]).get_fdata(), atol=1e-5)
    assert json.loads((tmp_path / "case_7_gamverify.json").read_text())["prediction"] == prediction
