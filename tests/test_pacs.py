"""PACS -> app -> PACS against a real DICOM server (Orthanc, started here on free loopback ports): C-STORE a small
study, the route C-GETs it, judges it and C-STOREs the Comprehensive SR, the Secondary Capture overlay and (for a
segmentation bundle) the SEG back; read back through Orthanc's REST API and checked with pydicom/highdicom against the
source (geometry against ITK), the NIfTI label map and the JSON record. Bad studies: one SR saying why, nothing
else, and the route goes on."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from _dicom_study import PRIVATE_PATIENT, compress_undecodable, ct_series, drop_slice, rotation, sr_only_study
from _orthanc import OrthancServer, orthanc_binary
from _zoo_bundles import write_seg_bundle

pytest.importorskip("pynetdicom")
hd = pytest.importorskip("highdicom")
itk = pytest.importorskip("itk")

from monai_gamverify.apps.integrations.deploy import GamverifyRunner  # noqa: E402
from monai_gamverify.apps.integrations.pacs import PacsRoute, main, parse_node, store_datasets  # noqa: E402
from monai_gamverify.bundle import load_bundle  # noqa: E402
from monai_gamverify.io.dicom import dicom_affine  # noqa: E402
from monai_gamverify.io.dicom_out import LINK_KEYWORDS, read_sr_values  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = {"network_name": "small_cnn", "networks#small_cnn#width": 4, "roi_size": [16, 16, 16], "pixdim": [2.5] * 3}
SR_CLASS, SC_CLASS, SEG_CLASS = (
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.66.4",
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class _Screen:
    """An in-distribution screen stand-in with fixed answers (what the SR does with them is under test)."""

    def __init__(self, task: str, answer: dict) -> None:
        self.task, self.answer, self.needs_network = task, answer, False

    def recorder(self, network):
        return contextlib.nullcontext(None)

    def score(self, image, **_):
        return dict(self.answer)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc; .ci/run installs it)")
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def cls_runner(tmp_path_factory):
    """sos_staging with small untrained weights, a reference map, a fitted verifier and a screen that says 'in'."""
    from monai_gamverify.metrics.similarity import DEFAULT_METRICS
    from monai_gamverify.verification.verifier import SuitabilityVerifier

    work = tmp_path_factory.mktemp("cls")
    root = work / "sos_staging"
    shutil.copytree(REPO / "bundles" / "sos_staging" / "configs", root / "configs")
    torch.manual_seed(0)
    net = load_bundle(root, overrides=TINY, require_weights=False, device="cpu").network
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij"))
    nib.save(nib.Nifti1Image(np.exp(-(grid**2).sum(0) * 2).astype(np.float32), np.eye(4)), str(work / "ref.nii.gz"))
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.uniform(0, 1, (40, len(DEFAULT_METRICS))), columns=list(DEFAULT_METRICS))
    table["label"] = (table["cosine"] > 0.5).astype(int)
    SuitabilityVerifier(n_estimators=15, random_state=0).fit(table).save(work / "verifier.skops")
    screen = _Screen("classification", {"in_distribution": True, "p_value": 0.37, "reasons": []})
    return GamverifyRunner(root, work / "out", overrides=TINY, device="cpu", reference=work / "ref.nii.gz",
                           verifier=work / "verifier.skops", screen=screen)  # fmt: skip


@pytest.fixture(scope="module")
def seg_runner(tmp_path_factory):
    work = tmp_path_factory.mktemp("seg")
    root = write_seg_bundle(work / "seg_tiny", fmt="json", seed=4)
    screen = _Screen("segmentation", {"in_distribution": False, "p_value": 0.004, "reasons": ["spacing is outside"]})
    return GamverifyRunner(root, work / "out", device="cpu", screen=screen)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _push(orthanc, datasets):
    store_datasets(parse_node(orthanc.node), datasets, ae_title="GVTEST", associations=4)


def _results(orthanc, source):
    """What the app stored in the source's study (everything but the source instances)."""
    mine = {str(d.SOPInstanceUID) for d in source}
    return [d for d in orthanc.instances(str(source[0].StudyInstanceUID)) if str(d.SOPInstanceUID) not in mine]


def _itk_source_affine(tmp_path, source):
    folder = tmp_path / "src"
    folder.mkdir()
    for i, d in enumerate(source):
        d.save_as(str(folder / f"{i:03d}.dcm"), enforce_file_format=True)
    img = itk.imread(str(folder))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection(), float) @ np.diag(np.asarray(img.GetSpacing(), float))
    lps[:3, 3] = np.asarray(img.GetOrigin(), float)
    return LPS_TO_RAS @ lps


def _slice_of(nifti_affine, ipp) -> int:
    """The NIfTI slice index (third axis) at a DICOM ImagePositionPatient (LPS), found through the NIfTI's affine."""
    ijk = np.linalg.solve(nifti_affine, np.append(LPS_TO_RAS[:3, :3] @ np.asarray(ipp, float), 1.0))[:3]
    assert np.allclose(ijk[:2], 0, atol=1e-3), ijk  # each slice starts at the NIfTI's in-plane origin
    return int(round(ijk[2]))


def _check_linking(results, source):
    src = source[0]
    for d in results:
        assert str(d.StudyInstanceUID) == str(src.StudyInstanceUID)
        assert str(d.SeriesInstanceUID) != str(src.SeriesInstanceUID)
        assert str(d.SOPInstanceUID) not in {str(s.SOPInstanceUID) for s in source}
        assert str(d.PatientID) == str(src.PatientID)
        for key in PRIVATE_PATIENT:
            assert key not in d, f"{key} leaked into {d.SOPClassUID.name}"
        patient = {e.keyword for e in d if e.tag.group == 0x0010}
        assert patient <= set(LINK_KEYWORDS), patient - set(LINK_KEYWORDS)


def test_round_trip_classification(orthanc, cls_runner, tmp_path):
    source = ct_series(seed=1)
    _push(orthanc, source)
    summary = PacsRoute(cls_runner, parse_node(orthanc.node)).process(str(source[0].StudyInstanceUID))
    assert summary["status"] == "judged", summary
    results = _results(orthanc, source)
    classes = sorted(str(d.SOPClassUID) for d in results)
    assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == len(source) and len(classes) == len(source) + 1
    _check_linking(results, source)

    # the SR's numbers are the JSON record's
    series_uid = str(source[0].SeriesInstanceUID)
    record = json.loads((cls_runner.output_folder / f"{series_uid}_gamverify.json").read_text())
    sr = next(d for d in results if str(d.SOPClassUID) == SR_CLASS)
    values = read_sr_values(sr)
    meta = json.loads((cls_runner.bundle_path / "configs" / "metadata.json").read_text())
    assert values["Algorithm Name"] == meta["name"] and values["Algorithm Version"] == meta["version"]
    assert values["Prediction"] == record["prediction"]["class_name"]
    for name, p in record["prediction"]["probabilities"].items():
        assert values[f"Probability of {name}"] == pytest.approx(p, rel=1e-6)
    assert record["p_suitable"] is not None and values["P(suitable)"] == pytest.approx(record["p_suitable"], rel=1e-6)
    assert values["Suitability verdict"] == record["verdict"] in ("suitable", "not suitable")
    assert values["Suitability threshold"] == record["threshold"] == 0.5
    assert values["In distribution"] == "yes" and values["In-distribution p-value"] == pytest.approx(0.37)
    assert "verifier verifier.skops" in values["Verification protocol"]
    assert values["Study Instance UID"] == str(source[0].StudyInstanceUID)
    assert values["Series Instance UID"] == series_uid
    assert sorted(values["images"]) == sorted(str(d.SOPInstanceUID) for d in source)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source[0].StudyInstanceUID
    refs = {str(r.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert refs == {str(d.SOPInstanceUID) for d in source}

    # the overlay: the source's frame of reference and geometry (ITK's reading of the source), one per source slice
    sc = [d for d in results if str(d.SOPClassUID) == SC_CLASS]
    np.testing.assert_allclose(dicom_affine(sc), _itk_source_affine(tmp_path, source), atol=1e-4)
    by_uid = {str(d.SOPInstanceUID): d for d in source}
    cam_img = nib.load(record["cam"])
    cam = np.asarray(cam_img.dataobj, dtype=np.float32)
    for d in sc:
        ref = by_uid[str(d.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert d.FrameOfReferenceUID == ref.FrameOfReferenceUID and (d.Rows, d.Columns) == (ref.Rows, ref.Columns)
        np.testing.assert_allclose(
            np.asarray(d.ImagePositionPatient, float), np.asarray(ref.ImagePositionPatient, float)
        )
        np.testing.assert_allclose([float(v) for v in d.PixelSpacing], [float(v) for v in ref.PixelSpacing])
        rgb = d.pixel_array.astype(int)
        assert rgb.shape == (ref.Rows, ref.Columns, 3) and d.PhotometricInterpretation == "RGB"
        k = _slice_of(cam_img.affine, ref.ImagePositionPatient)
        quiet = cam[:, :, k].T < 0.1  # no overlay there: gray
        assert (rgb[quiet, 0] == rgb[quiet, 1]).all() and (rgb[quiet, 1] == rgb[quiet, 2]).all()
        assert (rgb[~quiet].std(axis=-1) > 0).mean() > 0.5 if (~quiet).any() else True


def test_round_trip_segmentation(orthanc, seg_runner):
    source = ct_series(seed=2, spacing=(0.9, 1.4))
    _push(orthanc, source)
    summary = PacsRoute(seg_runner, parse_node(orthanc.node)).process(str(source[0].StudyInstanceUID))
    assert summary["status"] == "judged", summary
    results = _results(orthanc, source)
    assert sorted({str(d.SOPClassUID) for d in results}) == sorted({SR_CLASS, SC_CLASS, SEG_CLASS})
    _check_linking(results, source)
    record = json.loads((seg_runner.output_folder / f"{source[0].SeriesInstanceUID}_gamverify.json").read_text())
    seg = hd.seg.Segmentation.from_dataset(next(d for d in results if str(d.SOPClassUID) == SEG_CLASS))
    labels = nib.load(record["prediction"]["label_map"])
    label_map = np.asarray(labels.dataobj)
    assert label_map.any(), "the tiny bundle labels nothing: the comparison below would be empty"
    order = sorted(source, key=lambda d: _slice_of(labels.affine, d.ImagePositionPatient))
    pixels = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in order], combine_segments=True)
    want = np.stack([label_map[:, :, _slice_of(labels.affine, d.ImagePositionPatient)].T for d in order])
    np.testing.assert_array_equal(pixels, want)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen"]
    # geometry: the source's orientation, spacing and positions
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source[0].ImageOrientationPatient],
    )
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [0.9, 1.4])
    by_uid = {str(d.SOPInstanceUID): d for d in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = by_uid[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        np.testing.assert_allclose(
            np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float),
            np.asarray(src.ImagePositionPatient, float),
            atol=1e-4,
        )
    values = read_sr_values(next(d for d in results if str(d.SOPClassUID) == SR_CLASS))
    for name, count in record["prediction"]["voxels"].items():
        assert values[f"Voxels labelled {name}"] == count
    assert values["In distribution"] == "no" and values["In-distribution p-value"] == pytest.approx(0.004)
    assert values["Out-of-distribution reason"] == "spacing is outside"
    assert values["Suitability verdict"] == record["verdict"] == "out of distribution"


def _mixed_orientation(source):
    rot = rotation(0.0, 0.0, 0.3)
    for d in sorted(source, key=lambda d: int(d.InstanceNumber))[:3]:
        d.ImageOrientationPatient = [round(float(v), 6) for v in (*rot[:, 0], *rot[:, 1])]
    return source


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: sr_only_study(), "no image series in the study: it holds SR 'Dose report'"),
        (lambda: drop_slice(ct_series(seed=3, description="gappy"), 7), "about 1 missing slice(s)"),
        (lambda: _mixed_orientation(ct_series(seed=4)), "different orientations"),
        (lambda: compress_undecodable(ct_series(seed=5)), "cannot decode the pixel data"),
    ],
    ids=["no-image-series", "missing-slice", "mixed-orientation", "undecodable"],
)
def test_bad_study_gets_an_sr_and_nothing_else(orthanc, cls_runner, make, expected, caplog):
    source = make()
    _push(orthanc, source)
    route = PacsRoute(cls_runner, parse_node(orthanc.node))
    with caplog.at_level(logging.WARNING):
        summary = route.process(str(source[0].StudyInstanceUID))
    assert summary["status"] == "not judged" and expected in summary["reason"], summary
    results = _results(orthanc, source)
    assert [str(d.SOPClassUID) for d in results] == [SR_CLASS]  # nothing partial
    values = read_sr_values(results[0])
    assert values["Processing status"] == "not judged" and expected in values["Reason"]
    assert str(source[0].SeriesInstanceUID) in values["Reason"]  # names the series
    assert any(str(source[0].SeriesInstanceUID) in r.getMessage() for r in caplog.records)
    _check_linking(results, source)
    if "decode" in expected:
        assert "JPEG Lossless" in values["Reason"]


def test_route_keeps_serving_and_cli(orthanc, cls_runner, tmp_path, capsys):
    """A study the PACS does not have is a log line; the next study is answered. The command line does the same."""
    good = ct_series(seed=6)
    _push(orthanc, good)
    uid = str(good[0].StudyInstanceUID)
    root = cls_runner.bundle_path
    code = main(["--from-pacs", orthanc.node, "--study", "1.2.3.4.5.404", "--study", uid, "-m", str(root),
                 "--overrides", json.dumps(TINY), "--out", str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 1 and [s["status"] for s in lines] == ["not found", "judged"]
    assert lines[1]["stored"] == {"Comprehensive SR Storage": 1, "Secondary Capture Image Storage": len(good)}
    assert (tmp_path / "out" / f"{good[0].SeriesInstanceUID}_gamverify.json").is_file()
    bad = main(["--from-pacs", "NOPE@127.0.0.1:1", "--study", uid, "-m", str(root), "--overrides", json.dumps(TINY)])
    assert bad == 1 and "error" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--from-pacs", "not-a-node", "--study", uid, "-m", str(root)])
