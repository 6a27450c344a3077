"""MONAI Label core (:class:`SuitabilityInfer`) on a segmentation bundle in the model zoo's form: the label map on the
input grid equals MONAI's own bundle chain (preprocessing, inferer, postprocessing, ``Invertd``); ``result=cam`` gives
the Seg-Grad-CAM that ``gamverify cam --label`` writes; the label-only route needs no gradient."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from monai_gamverify import cli
from monai_gamverify.apps.integrations.monailabel import SuitabilityInfer
from monai_gamverify.bundle import load_bundle
from tests._zoo_bundles import write_seg_bundle


@pytest.fixture()
def seg_case(tmp_path):
    root = write_seg_bundle(tmp_path / "seg", fmt="json", seed=4)
    affine = np.diag([-0.8, 0.8, 1.2, 1.0])  # LPS-like: the bundle's Orientationd(RAS) flips the first axis
    vol = np.random.default_rng(0).normal(50, 40, (24, 22, 20)).astype(np.float32)
    vol[6:16, 5:15, 4:12] += 90
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return root, path, affine, vol.shape


def _monai_label_map(root, path) -> np.ndarray:
    """The bundle's own chain, as MONAI's bundle workflow runs it, inverted onto the input grid by ``Invertd``."""
    bm = load_bundle(root, device="cpu")
    pre = bm.preprocessing()
    data = pre({"image": str(path)})
    with torch.no_grad():
        data["pred"] = bm.inferer()(data["image"][None], bm.network)[0]
    data = bm.parser.get_parsed_content("postprocessing")(data)
    inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)
    return np.asarray(inv["pred"])[0]


def test_segmentation_answer_is_the_bundle_label_map_on_the_input_grid(seg_case, tmp_path, one_thread):
    root, path, affine, shape = seg_case
    infer = SuitabilityInfer(root)
    assert infer.task == "segmentation" and infer.info()["type"] == "segmentation"
    assert infer.labels == {"spleen": 1} and infer.label == 1
    label_file, answer = infer({"image": str(path)})
    img = nib.load(label_file)
    assert img.shape == shape and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    want = _monai_label_map(root, path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), want)
    assert 0 < (want == 1).sum() < want.size  # both labels present: the comparison means something
    assert answer["voxels"] == {"background": int((want == 0).sum()), "spleen": int((want == 1).sum())}
    assert answer["cam"]["label"] == "spleen" and answer["cam"]["in_response"] is False
    assert answer["suitability"]["verdict"] == "unverified"
    # the label-only route: the same label map, no CAM
    plain_file, plain = infer.predict({"image": str(path)})
    np.testing.assert_array_equal(np.asarray(nib.load(plain_file).dataobj), want)
    assert "cam" not in plain
    # result=cam: the Seg-Grad-CAM map `gamverify cam --label spleen` writes
    cam_file, cam_answer = infer({"image": str(path), "result": "cam"})
    single = cli.cam(str(path), out=str(tmp_path / "cam"), bundle_root=str(root), label="spleen")
    np.testing.assert_allclose(nib.load(cam_file).get_fdata(), nib.load(single["map"]).get_fdata(), atol=1e-5)
    assert cam_answer["cam"]["in_response"] is True and cam_answer["cam"]["shape"] == list(shape)


def test_segmentation_request_errors(seg_case, one_thread):
    root, path, _, _ = seg_case
    infer = SuitabilityInfer(root)
    with pytest.raises(ValueError, match="unknown label 'liver'"):
        infer({"image": str(path), "label": "liver"})
    with pytest.raises(ValueError, match="result must be 'label' or 'cam'"):
        infer({"image": str(path), "result": "mask"})
    with pytest.raises(ValueError, match="label-only route returns no CAM"):
        infer.predict({"image": str(path), "result": "cam"})
    with pytest.raises(ValueError, match="label= is for segmentation bundles"):
        SuitabilityInfer("bundles/sos_staging", label=1, require_weights=False)


class _RejectAll:
    """A segmentation screen that rejects everything (what the answer does with it is under test, not the screen)."""

    task, needs_network = "segmentation", False

    def score(self, observation):
        assert observation.raw_image is not None and observation.input is not None  # the engine's observation
        return {"in_distribution": False, "p_value": 0.004, "reasons": ["spacing is outside the training range"]}


def test_segmentation_answer_carries_the_screen(seg_case, one_thread):
    root, path, _, _ = seg_case
    infer = SuitabilityInfer(root, screen=_RejectAll())
    _, answer = infer({"image": str(path)})
    assert answer["screen"] == {"in_distribution": False, "p_value": 0.004,
                                "reasons": ["spacing is outside the training range"]}  # fmt: skip
    assert answer["suitability"]["verdict"] == "out of distribution"
    _, plain = SuitabilityInfer(root)({"image": str(path)})
    assert plain["screen"]["in_distribution"] is None and plain["suitability"]["verdict"] == "unverified"


def test_deploy_runner_on_a_segmentation_bundle(seg_case, tmp_path, one_thread):
    """The MONAI Deploy operator's logic (no SDK needed): label map + Seg-Grad-CAM + JSON record, the same label map
    as the bundle's own chain."""
    import json

    from monai_gamverify.apps.integrations.deploy import GamverifyRunner

    root, path, affine, shape = seg_case
    runner = GamverifyRunner(root, tmp_path / "out", device="cpu")
    prediction, cam, verdict = runner(str(path))
    want = _monai_label_map(root, path)
    np.testing.assert_array_equal(np.asarray(nib.load(prediction["label_map"]).dataobj), want)
    assert prediction["explained_label"] == "spleen" and prediction["labels"] == {"spleen": 1}
    assert nib.load(cam).shape == shape and verdict["verdict"] == "unverified"
    record = json.loads((tmp_path / "out" / "ct_gamverify.json").read_text())
    assert record["prediction"]["voxels"]["spleen"] == int((want == 1).sum())


def test_deploy_runner_carries_the_screen(seg_case, tmp_path, one_thread):
    """The Deploy runner with a screen (the apps' --screen): out of distribution before any model verdict."""
    from monai_gamverify.apps.integrations.deploy import GamverifyRunner

    root, path, _, _ = seg_case
    _, _, verdict = GamverifyRunner(root, tmp_path / "out", device="cpu", screen=_RejectAll())(str(path))
    assert verdict["verdict"] == "out of distribution" and verdict["in_distribution"] is False
    assert verdict["reasons"] == ["spacing is outside the training range"]
