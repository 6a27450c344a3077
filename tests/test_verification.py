"""Verification: streaming reference map, feature table, Random-Forest verifier, skops persistence, report."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn

from monai_gamverify.metrics.similarity import DEFAULT_METRICS, similarity_metrics
from monai_gamverify.verification.reference import ReferenceMap, reference_map
from monai_gamverify.verification.tables import feature_table, summary_table
from monai_gamverify.verification.verifier import SuitabilityVerifier, forest_proba, pack_forest, roc_png
from monai_gamverify.verification.workflow import run_verification
from monai_gamverify.visualize.cam import GradCAM


def small_net(dims: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(
        conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 6, 3, stride=2, padding=1), nn.ReLU(), pool(1), nn.Flatten(),
        nn.Linear(6, 3),
    )  # fmt: skip


SHAPES = [pytest.param((16, 12), id="2d"), pytest.param((12, 16, 10), id="3d")]


def synthetic_table(n_subjects: int = 40, shift: float = 0.4, seed: int = 0) -> pd.DataFrame:
    """Two models per subject: label 1 rows have higher similarity features than label 0 rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for model, label in (("good", 1), ("bad", 0)):
            feats = rng.normal(0.3 + shift * label, 0.1, size=len(DEFAULT_METRICS))
            rows.append(
                {
                    "sample_id": s,
                    "subject_id": f"s{s}",
                    "model": model,
                    "label": label,
                    **dict(zip(DEFAULT_METRICS, feats)),
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- reference map
@pytest.mark.parametrize("spatial", SHAPES)
def test_running_mean_equals_numpy_mean(spatial):
    rng = np.random.default_rng(0)
    batches = [rng.random((b, 1, *spatial)).astype(np.float32) for b in (3, 1, 4)]
    ref = ReferenceMap()
    for b in batches:
        ref.update(torch.from_numpy(b))
    expected = np.concatenate(batches).astype(np.float64).mean(0, keepdims=True)
    assert ref.count == 8 and ref.value.shape == (1, 1, *spatial)
    np.testing.assert_allclose(ref.value.numpy(), expected, atol=1e-7)


@pytest.mark.parametrize("spatial", SHAPES)
def test_reference_map_of_cam_and_save_load(spatial, tmp_path):
    net = small_net(len(spatial))
    cam = GradCAM(net, "3")
    from monai.data import MetaTensor

    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [5.0, -6.0, 7.0]
    data = [{"image": MetaTensor(torch.rand(b, 1, *spatial), affine=torch.as_tensor(affine))} for b in (2, 3)]
    ref = reference_map(cam, data, progress=False)
    direct = torch.cat([cam(d["image"]).as_tensor() for d in data]).double().mean(0, keepdim=True)
    np.testing.assert_allclose(ref.value.numpy(), direct.numpy(), atol=1e-6)
    paths = ref.save(tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import nibabel as nib

    img = nib.load(str(paths["nifti"]))
    np.testing.assert_allclose(img.affine, affine)
    loaded = ReferenceMap.load(tmp_path)
    assert loaded.count == 5
    np.testing.assert_allclose(loaded.value.numpy(), ref.value.numpy(), atol=1e-6)
    loaded.update(torch.zeros(5, 1, *spatial))  # continues the running mean
    np.testing.assert_allclose(loaded.value.numpy(), ref.value.numpy() / 2, atol=1e-6)


def test_reference_map_bad_input():
    ref = ReferenceMap()
    with pytest.raises(ValueError, match="empty"):
        _ = ref.value
    with pytest.raises(ValueError, match="normalised"):
        ref.update(torch.full((1, 1, 8, 8), 2.0))
    with pytest.raises(ValueError, match="shape"):
        ref.update(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        ref.update(torch.full((1, 1, 8, 8), float("nan")))
    ref.update(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="differs"):
        ref.update(torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="no batches"):
        reference_map(lambda x: x, [], progress=False)
    with pytest.raises(ValueError, match="'image'"):
        reference_map(lambda x: x, [{"img": torch.rand(1, 1, 8, 8)}], progress=False)


# ---------------------------------------------------------------- feature table
@pytest.mark.parametrize("spatial", SHAPES)
def test_feature_table_equals_direct_metrics(spatial, tmp_path):
    dims = len(spatial)
    ref_cam = GradCAM(small_net(dims, 0), "3")
    cams = {"a": (GradCAM(small_net(dims, 1), "3"), 1), "b": (GradCAM(small_net(dims, 2), "1"), 0)}
    torch.manual_seed(5)
    data = [
        {"image": torch.rand(2, 1, *spatial), "id": ["x0", "x1"], "subject": torch.tensor([7, 7])},
        {"image": torch.rand(2, 1, *spatial), "id": ["x2", "x3"], "subject": torch.tensor([8, 9])},
    ]
    ref = reference_map(ref_cam, data, progress=False)
    slice_axis = 0 if dims == 3 else None
    table = feature_table(ref, cams, data, slice_axis=slice_axis, progress=False, path=tmp_path / "f.csv")
    assert list(table.columns) == ["sample_id", "subject_id", "model", "label", *DEFAULT_METRICS]
    assert len(table) == 8
    x = torch.cat([d["image"] for d in data])
    for name, (cam, label) in cams.items():
        rows = table[table["model"] == name]
        assert rows["sample_id"].tolist() == ["x0", "x1", "x2", "x3"]
        assert rows["subject_id"].tolist() == [7, 7, 8, 9]
        assert (rows["label"] == label).all()
        direct = similarity_metrics(cam(x), ref.value, slice_axis=slice_axis)
        for metric, values in direct.items():
            np.testing.assert_allclose(rows[metric].to_numpy(), values.numpy(), rtol=1e-6, atol=1e-7)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "f.csv"), table, check_dtype=False)


def test_feature_table_calls_each_candidate_once_per_batch():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return torch.rand(x.shape[0], 1, *x.shape[2:])

    data = [{"image": torch.rand(b, 1, 8, 8)} for b in (3, 2)]
    table = feature_table(torch.rand(1, 1, 8, 8), {"m": (fn, None)}, data, metrics=["cosine"], progress=False)
    assert calls == [3, 2] and table["label"].isna().all() and table["sample_id"].tolist() == [0, 1, 2, 3, 4]


def test_feature_table_bad_input():
    data = [{"image": torch.rand(2, 1, 8, 8)}]
    ref = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="label"):
        feature_table(ref, {"m": (lambda x: x, 2)}, data, progress=False)
    with pytest.raises(TypeError, match="map function"):
        feature_table(ref, {"m": (None, 1)}, data, progress=False)
    with pytest.raises(ValueError, match="shape"):
        feature_table(ref, {"m": (lambda x: torch.rand(2, 1, 8, 9), 1)}, data, progress=False)
    with pytest.raises(ValueError, match="reference"):
        feature_table(torch.rand(8, 8), {"m": (lambda x: x, 1)}, data, progress=False)
    with pytest.raises(ValueError, match="'id'"):
        feature_table(ref, {"m": (lambda x: x, 1)}, [{**data[0], "id": ["a"]}], progress=False)


# ---------------------------------------------------------------- verifier
def test_cv_folds_never_share_a_subject_and_scores_match_sklearn():
    table = synthetic_table(n_subjects=30, shift=0.1, seed=1)
    ver = SuitabilityVerifier(n_estimators=30, random_state=0)
    cv = ver.cross_validate(table, n_splits=5, groups="subject_id", seed=3)
    assert (cv.fold >= 0).all() and len(cv.folds) == 5
    per_subject = pd.Series(cv.fold).groupby(table["subject_id"].to_numpy()).nunique()
    assert (per_subject == 1).all()  # every subject is a test subject of exactly one fold, so never on both sides
    for k, row in cv.folds.iterrows():
        m = cv.fold == k
        pred = (cv.oof_proba[m] >= 0.5).astype(int)
        assert row["accuracy"] == pytest.approx(accuracy_score(cv.y_true[m], pred))
        assert row["f1"] == pytest.approx(f1_score(cv.y_true[m], pred))
        assert row["roc_auc"] == pytest.approx(roc_auc_score(cv.y_true[m], cv.oof_proba[m]))
    assert cv.mean["accuracy"] == pytest.approx(cv.folds["accuracy"].mean())
    assert cv.mean["roc_auc_oof"] == pytest.approx(roc_auc_score(table["label"], cv.oof_proba))
    json.dumps(cv.to_dict())  # JSON-ready
    again = ver.cross_validate(table, n_splits=5, groups="subject_id", seed=3)
    np.testing.assert_array_equal(again.oof_proba, cv.oof_proba)  # seeded


def test_verifier_separates_easy_table_and_is_chance_on_permuted_labels():
    table = synthetic_table(n_subjects=60, shift=0.4)
    ver = SuitabilityVerifier(n_estimators=50, random_state=0)
    assert ver.cross_validate(table, n_splits=5).mean["roc_auc"] > 0.9
    permuted = table.assign(label=np.random.default_rng(0).permutation(table["label"].to_numpy()))
    auc = ver.cross_validate(permuted, n_splits=5).mean["roc_auc"]
    assert 0.3 < auc < 0.7
    weighted = ver.cross_validate(table, n_splits=5, average="weighted", groups=None)
    assert weighted.params["groups"] is None and weighted.mean["f1"] > 0.9


@pytest.mark.parametrize("kw", [{}, {"max_depth": 3}, {"class_weight": "balanced", "min_samples_leaf": 3}])
def test_packed_forest_equals_sklearn_predict_proba(kw):
    """The few-rows path (every tree walked at once in numpy) gives the forest's own probabilities, ties included."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5)).round(1)  # rounded: many values sit exactly on split thresholds
    y = (X[:, 0] + 0.5 * rng.normal(size=120) > 0).astype(int)
    forest = RandomForestClassifier(40, random_state=0, **kw).fit(X, y)
    test = np.vstack([rng.normal(size=(30, 5)).round(1), X[:10]])
    np.testing.assert_allclose(forest_proba(pack_forest(forest), test), forest.predict_proba(test), atol=1e-12)
    ver = SuitabilityVerifier(n_estimators=40, random_state=0).fit(X, y)
    one = ver.predict_proba(test[:1])  # the packed path
    np.testing.assert_allclose(one, ver.model_.predict_proba(test[:1]), atol=1e-12)
    many = np.vstack([test] * 3)  # more than 64 rows: scikit-learn's path, same numbers
    np.testing.assert_allclose(ver.predict_proba(many)[:1], one, atol=1e-12)


def test_estimator_api_and_importances():
    table = synthetic_table(n_subjects=20)
    ver = SuitabilityVerifier(n_estimators=20, random_state=0)
    assert not hasattr(ver, "model_")  # no work in __init__
    params = ver.get_params()
    assert params["n_estimators"] == 20 and clone(ver).get_params() == params
    ver.set_params(max_depth=3)
    with pytest.raises(NotFittedError):
        ver.predict(table)
    ver.fit(table)
    assert list(ver.feature_names_in_) == list(DEFAULT_METRICS)
    assert ver.feature_importances_.shape == (7,) and ver.feature_importances_.sum() == pytest.approx(1.0)
    proba = ver.predict_proba(table.iloc[::-1][list(reversed(DEFAULT_METRICS))])  # columns chosen by name
    np.testing.assert_allclose(proba[::-1], ver.predict_proba(table))
    X = table[list(DEFAULT_METRICS)].to_numpy()
    np.testing.assert_array_equal(ver.predict(X), ver.predict(table))
    assert ver.score(table[list(DEFAULT_METRICS)], table["label"]) > 0.9
    sub = SuitabilityVerifier(n_estimators=10, features=["iou", "ssim"]).fit(table)
    assert list(sub.feature_names_in_) == ["iou", "ssim"]


def test_skops_round_trip_and_tampered_file(tmp_path):
    table = synthetic_table(n_subjects=20)
    ver = SuitabilityVerifier(n_estimators=15, random_state=4, features=list(DEFAULT_METRICS[:5])).fit(table)
    path = ver.save(tmp_path / "v.skops")
    loaded = SuitabilityVerifier.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(table), ver.predict_proba(table))
    assert loaded.get_params() == ver.get_params()
    with zipfile.ZipFile(path) as z:
        assert not any(n.endswith(".pkl") for n in z.namelist())
        members = {n: z.read(n) for n in z.namelist()}
    schema = json.loads(members["schema.json"])

    def tamper(node):
        if isinstance(node, dict):
            if node.get("__class__") == "RandomForestClassifier":
                node["__class__"], node["__module__"] = "Popen", "subprocess"
            for v in node.values():
                tamper(v)
        elif isinstance(node, list):
            for v in node:
                tamper(v)

    tamper(schema)
    bad = tmp_path / "tampered.skops"
    with zipfile.ZipFile(bad, "w") as z:
        for n, content in members.items():
            z.writestr(n, json.dumps(schema) if n == "schema.json" else content)
    with pytest.raises(ValueError, match="subprocess.Popen"):
        SuitabilityVerifier.load(bad)
    import skops.io as sio

    sio.dump({"format": "other"}, tmp_path / "foreign.skops")
    with pytest.raises(ValueError, match="not a SuitabilityVerifier"):
        SuitabilityVerifier.load(tmp_path / "foreign.skops")
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable skops"):
        SuitabilityVerifier.load(tmp_path / "junk.skops")
    with pytest.raises(FileNotFoundError):
        SuitabilityVerifier.load(tmp_path / "missing.skops")


def test_verifier_bad_input():
    table = synthetic_table(n_subjects=10)
    ver = SuitabilityVerifier(n_estimators=5)
    with pytest.raises(ValueError, match="single class"):
        ver.fit(table.assign(label=1))
    with pytest.raises(ValueError, match="single class"):
        ver.cross_validate(table.assign(label=0))
    with pytest.raises(ValueError, match="too few samples"):
        ver.cross_validate(table.head(6), n_splits=5)
    with pytest.raises(ValueError, match="distinct 'subject_id'"):
        ver.cross_validate(table.assign(subject_id=np.arange(20) % 3), n_splits=5)
    with pytest.raises(ValueError, match="NaN"):
        ver.fit(table.assign(iou=np.where(np.arange(20) == 3, np.nan, 0.5)))
    with pytest.raises(ValueError, match="missing"):
        SuitabilityVerifier(features=["iou", "nope"]).fit(table)
    fitted = SuitabilityVerifier(n_estimators=5).fit(table)
    with pytest.raises(ValueError, match="missing"):
        fitted.predict_proba(table.drop(columns=["ssim"]))
    with pytest.raises(ValueError, match="expects 7"):
        fitted.predict_proba(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="0 \\(unsuitable\\) or 1"):
        ver.fit(table.assign(label=2 * table["label"]))
    with pytest.raises(ValueError, match="no label"):
        ver.fit(table.assign(label=pd.array([None] + [1] * 19, dtype="Int64")))
    with pytest.raises(ValueError, match="group column"):
        ver.cross_validate(table, groups="patient")
    with pytest.raises(ValueError, match="n_splits"):
        ver.cross_validate(table, n_splits=1)


def test_summary_table_matches_pandas():
    table = synthetic_table(n_subjects=15)
    summary = summary_table(table)
    assert list(summary.columns) == ["label", "feature", "mean", "min", "max", "std", "count"]
    assert summary["label"].tolist() == [0] * 7 + [1] * 7
    for _, row in summary.iterrows():
        v = table.loc[table["label"] == row["label"], row["feature"]].to_numpy()
        np.testing.assert_allclose(
            [row["mean"], row["min"], row["max"], row["std"]], [v.mean(), v.min(), v.max(), v.std(ddof=1)]
        )
        assert row["count"] == 15


def test_roc_png(tmp_path):
    y = np.array([0, 0, 1, 1, 0, 1])
    p = roc_png(y, [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], tmp_path / "roc.png", fold=[0, 0, 0, 1, 1, 1])
    assert p.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one value per label"):
        roc_png(y, [0.1, 0.2], tmp_path / "x.png")


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("method,layer", [("gradcam", "3"), ("featuremap", "1")])
def test_run_verification_report(method, layer, tmp_path):
    torch.manual_seed(0)
    data = [{"image": torch.rand(3, 1, 16, 16), "subject": [f"s{b}{i}" for i in range(3)]} for b in range(4)]
    cands = {
        "same": (small_net(2, 0), layer, 1),
        "near": (small_net(2, 1), layer, 1),
        "other": (small_net(2, 9), layer, 0),
    }
    out = run_verification(
        (small_net(2, 0), layer), cands, data, tmp_path, method=method, n_splits=3, n_estimators=20, progress=False
    )
    names = {p.name for p in tmp_path.iterdir()}
    expected = {"features.csv", "predictions.csv", "cv.json", "summary.csv", "roc.png", "verifier.skops"}
    assert expected | {"reference_map.nii.gz", "reference_map.png", "tensorboard"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    report = json.loads((tmp_path / "cv.json").read_text())
    assert report["method"] == method and len(report["cross_validation"]["folds"]) == 3
    assert set(report["per_model"]) == set(cands) and report["n_rows"] == 36
    features = pd.read_csv(tmp_path / "features.csv")
    assert len(features) == 36 and set(features["model"]) == set(cands)
    assert set(out["cv_mean"]) >= {"accuracy", "precision", "recall", "f1", "roc_auc"}
    ver = SuitabilityVerifier.load(tmp_path / "verifier.skops")
    assert ver.predict_proba(features).shape == (36, 2)
    with pytest.raises(TypeError, match="iterator"):
        run_verification((small_net(2), layer), cands, iter(data), tmp_path / "x", method=method, progress=False)
    with pytest.raises(ValueError, match="method"):
        run_verification((small_net(2), layer), cands, data, tmp_path / "x", method="lime", progress=False)


def test_run_verification_leave_models_out_report(tmp_path):
    from monai_gamverify.verification.bundles import format_summary

    torch.manual_seed(0)
    data = [{"image": torch.rand(3, 1, 16, 16), "subject": [f"s{b}{i}" for i in range(3)]} for b in range(4)]
    cands = {"a": (small_net(2, 0), "3", 1), "b": (small_net(2, 1), "3", 1), "c": (small_net(2, 8), "3", 0),
             "d": (small_net(2, 9), "3", 0)}  # fmt: skip
    out = run_verification((small_net(2, 0), "3"), cands, data, tmp_path, n_splits=5, n_estimators=20, progress=False)
    report = json.loads((tmp_path / "cv.json").read_text())
    assert report["protocol"] == "leave-models-out" == out["protocol"]
    assert report["cross_validation"]["params"]["splitter"].startswith("LeaveOneGroupOut")  # 2 models per label < 5
    assert report["cross_validation_secondary"]["protocol"] == "subject-grouped"
    assert report["model_level"]["protocol"] == "leave-models-out"
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert list(verdicts.columns) == [
        "model",
        "label",
        "n",
        "mean_p_suitable",
        "ci_low",
        "ci_high",
        "verdict",
        "protocol",
    ]
    assert set(verdicts["verdict"]) <= {"suitable", "not suitable", "undecided"} and (verdicts["n"] == 12).all()
    assert (verdicts["ci_low"] <= verdicts["mean_p_suitable"]).all()
    preds = pd.read_csv(tmp_path / "predictions.csv")
    assert preds.groupby("model")["fold"].nunique().eq(1).all()  # each model in one test fold
    text = format_summary({**out, "n_splits": 5})
    assert "leave-models-out" in text and "secondary, subject-grouped" in text and "95% CI" in text


def test_verification_methods_come_from_the_cam_registry():
    from monai_gamverify.verification.workflow import METHODS, verification_method
    from monai_gamverify.visualize.registry import CAM_METHODS

    assert set(METHODS) == set(CAM_METHODS) | {"featuremap"}
    assert verification_method("gradcam++") == verification_method("GradCAMpp") == "gradcampp"
    assert verification_method("featuremap") == "featuremap"
    with pytest.raises(ValueError, match="gradcam\\+\\+ = gradcampp"):
        verification_method("lime")
