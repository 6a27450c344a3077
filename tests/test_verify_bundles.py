"""verify_bundles: reference + candidate bundles (untrained small_cnn weights) on a tiny cohort -> report directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import DataError
from monai_gamverify.data.synthetic import make_cohort
from monai_gamverify.verification.bundles import verify_bundles

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"
SMALL = {"network_name": "small_cnn"}


def _bundle(tmp: Path, name: str, seed: int, num_classes: int | None = None) -> Path:
    root = tmp / name
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval"))
    (root / "models").mkdir()
    overrides = dict(SMALL, **({"num_classes": num_classes} if num_classes else {}))
    torch.manual_seed(seed)
    bm = load_bundle(root, require_weights=False, overrides=overrides, device="cpu")
    torch.save(bm.network.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vb")
    make_cohort("sos", n=12, size=24, seed=0, out_dir=tmp / "sos", progress=False)
    make_cohort("chin", n=6, size=24, seed=1, out_dir=tmp / "chin", progress=False)
    return {
        "tmp": tmp,
        "ref": _bundle(tmp, "ref", 0),
        "sos_b": _bundle(tmp, "sos_b", 1),
        "sos_c": _bundle(tmp, "sos_c", 3),
        "chin": _bundle(tmp, "chin_b", 2, num_classes=2),
        "chin_c": _bundle(tmp, "chin_c", 4, num_classes=2),
    }


def _kwargs(s):
    return {
        "reference": str(s["ref"]),
        "candidates": {n: str(s[n]) for n in ("sos_b", "sos_c", "chin", "chin_c")},
        "dataset_dir": str(s["tmp"] / "sos"),
        "labels": {"sos_b": 1, "sos_c": 1, "chin": 0, "chin_c": 0},  # two per label: leave-models-out folds
        "split": "training",
        "overrides": SMALL,
        "candidate_overrides": {"*": SMALL, "chin": {"num_classes": 2}, "chin_c": {"num_classes": 2}},
        "n_splits": 2,
        "n_estimators": 10,
        "progress": False,
        "device": "cpu",
    }


def test_verify_bundles_report(setup, capsys):
    out = setup["tmp"] / "report"
    kw = _kwargs(setup)
    # JSON strings, as python-fire may pass them
    kw["candidates"] = json.dumps(kw["candidates"])
    kw["labels"] = json.dumps(kw["labels"])
    report = verify_bundles(out=str(out), max_items=6, **kw)
    n_items = report["n_items"]
    assert n_items == 6
    table = pd.read_csv(out / "features.csv")
    assert len(table) == n_items * 4
    assert set(table["model"]) == {"sos_b", "sos_c", "chin", "chin_c"}
    assert table.groupby("model")["label"].first().to_dict() == {"chin": 0, "chin_c": 0, "sos_b": 1, "sos_c": 1}
    cv = json.loads((out / "cv.json").read_text())
    assert {"cross_validation", "per_model", "feature_importances", "method", "models"} <= set(cv)
    assert cv["models"]["chin"]["layer"] == "res4"
    for name in ("roc.png", "predictions.csv", "summary.csv", "verifier.skops", "reference_map.nii.gz"):
        assert (out / name).is_file(), name
    assert set(report["per_model"]) == {"sos_b", "sos_c", "chin", "chin_c"}
    assert cv["protocol"] == "leave-models-out"
    assert capsys.readouterr().out == ""  # the library logs; `gamverify verify` prints the summary
    assert "mean P(suitable)" in report["summary"] and str(out) in report["summary"]


def test_verify_bundles_featuremap(setup):
    out = setup["tmp"] / "report_fm"
    report = verify_bundles(out=str(out), method="featuremap", max_items=4, **_kwargs(setup))
    assert report["reference"]["layer"] == "stem"
    assert len(pd.read_csv(out / "features.csv")) == 16


def test_verify_bundles_errors(setup):
    kw = _kwargs(setup)
    with pytest.raises(ValueError, match="unknown candidate"):
        verify_bundles(**{**kw, "labels": {"sos_b": 1, "sos_c": 1, "chin": 0, "chinn": 0}})
    with pytest.raises(ValueError, match="has no label"):
        verify_bundles(**{**kw, "labels": {"sos_b": 1, "sos_c": 1, "chin": 0}})
    one_each = {
        "candidates": {"sos_b": str(setup["sos_b"]), "chin": str(setup["chin"])},
        "labels": {"sos_b": 1, "chin": 0},
        "candidate_overrides": {"*": SMALL, "chin": {"num_classes": 2}},
    }
    with pytest.raises(ValueError, match="leave-models-out"):  # no silent fallback to subject-grouped folds
        verify_bundles(**{**kw, **one_each})
    nope = {**kw["candidates"], "chin": str(setup["tmp"] / "nope")}
    with pytest.raises(FileNotFoundError, match="bundle not found"):
        verify_bundles(**{**kw, "candidates": nope})
    no_weights = setup["tmp"] / "no_weights"
    shutil.copytree(BUNDLE, no_weights, ignore=shutil.ignore_patterns("models", "eval"))
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        verify_bundles(**{**kw, "candidates": {**kw["candidates"], "chin": str(no_weights)}})
    empty = setup["tmp"] / "empty"
    empty.mkdir()
    (empty / "datalist.json").write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(DataError, match="no entries"):
        verify_bundles(**{**kw, "dataset_dir": str(empty)})


def test_verify_config(setup):
    from monai.bundle import run

    out = setup["tmp"] / "report_cfg"
    run(
        config_file=str(setup["ref"] / "configs" / "verify.json"),
        bundle_root=str(setup["ref"]),
        dataset_dir=str(setup["tmp"] / "sos"),
        output_dir=str(out),
        network_name="small_cnn",
        candidates={n: str(setup[n]) for n in ("sos_b", "sos_c", "chin", "chin_c")},
        labels={"sos_b": 1, "sos_c": 1, "chin": 0, "chin_c": 0},
        candidate_overrides={"*": SMALL, "chin": {"num_classes": 2}, "chin_c": {"num_classes": 2}},
        split="training",
        n_splits=2,
        n_estimators=10,
        max_items=4,
        progress=False,
        device="cpu",
    )
    assert len(pd.read_csv(out / "features.csv")) == 16
    assert (out / "cv.json").is_file()


def test_verify_bundles_one_class(setup, capsys):
    out = setup["tmp"] / "report_oc"
    kw = _kwargs(setup)
    kw.update(
        candidates={"chin": str(setup["chin"])},
        labels=None,
        one_class=True,
        references=json.dumps({"sos_b": str(setup["sos_b"])}),
        candidate_overrides={"*": SMALL, "chin": {"num_classes": 2}},
        alpha=0.5,
    )
    report = verify_bundles(out=str(out), max_items=4, **kw)
    cv = json.loads((out / "cv.json").read_text())
    assert cv["one_class"] and cv["params"]["references"] == ["reference", "sos_b"]
    p = cv["per_model"]["chin"]["p_value"]
    assert p in (pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)  # 3 models in the set
    for name in ("features.csv", "verdicts.csv", "predictions.csv", "summary.csv", "reference_map.nii.gz"):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / "features.csv")) == 3 * 4
    assert capsys.readouterr().out == ""
    printed = report["summary"]
    assert (
        "one-class" in printed
        and "p-value" in printed
        and report["per_model"]["chin"]["verdict"]
        in (
            "consistent",
            "not suitable",
        )
    )
    with pytest.raises(ValueError, match="needs references"):
        verify_bundles(**{**kw, "references": None})
    with pytest.raises(ValueError, match="one-class mode only"):
        verify_bundles(**{**_kwargs(setup), "references": {"x": str(setup["sos_b"])}})
