"""gamverify demo: one quick run (tiny cohorts, 1 epoch, trained through the bundles) -> report directory."""

from __future__ import annotations

import base64
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from monai_gamverify.apps.demo import (
    DEMO_MARKER,
    MODELS,
    WEIGHTS_DIR,
    demo_settings,
    format_summary,
    run_demo,
    shipped_weights,
    weights_config,
)
from monai_gamverify.apps.demo.settings import N_STAGES
from monai_gamverify.apps.report import PNG_SIGNATURE, external_references

SUMMARY_KEYS = {
    "out",
    "report",
    "seed",
    "mode",
    "device",
    "weights",
    "settings",
    "cohorts",
    "models",
    "key_figures",
    "explanations",
    "verification",
    "energy",
    "garbage",
    "files",
    "timings_s",
    "verdicts",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("demo") / "out"
        summary = run_demo(out, seed=0, quick=True, device="cpu", train=True, progress=False)
    finally:
        torch.set_num_threads(n)
    return out, summary


def test_summary_keys_and_files(demo):
    out, s = demo
    assert SUMMARY_KEYS <= set(s)
    assert s["mode"] == "quick" and s["weights"] == "trained" and s["report"] == str(out / "report.html")
    assert json.loads((out / "summary.json").read_text())["key_figures"] == pytest.approx(s["key_figures"], nan_ok=True)
    assert set(s["timings_s"]) >= {"cohorts", "models", "verification", "energy", "garbage", "report", "total"}
    for name in MODELS:
        assert (out / "models" / name / "model.pt").is_file(), name
        assert list((out / "tensorboard" / f"train_{name}").glob("events.out.tfevents.*")), name
    assert list((out / "tensorboard" / "summary").glob("events.out.tfevents.*"))
    for method in ("gradcam", "featuremap"):
        d = out / "verify" / method
        for f in ("roc.png", "reference_map.png", "feature_distributions.png", "features.csv", "cv.json"):
            assert (d / f).is_file(), (method, f)
    for f in ("energy_table.csv", "energy_loo.csv", "ae.csv", "consensus.csv", "regression_metrics.csv"):
        assert (out / "energy" / f).is_file(), f
    assert len(list((out / "energy").glob("energy_scatter_*.png"))) == 5
    assert (out / "garbage" / "rejections.csv").is_file()
    text = format_summary(s)
    assert "verdicts:" in text and str(out / "report.html") in text


def test_figures_agree_with_the_files(demo):
    out, s = demo
    cv = json.loads((out / "verify" / "gradcam" / "cv.json").read_text())
    key = s["key_figures"]["verifier model-level ROC AUC, leave-models-out (Method 1)"]
    assert cv["protocol"] == "leave-models-out"  # two models per label: the candidate is always an unseen model
    assert key == pytest.approx(cv["model_level"]["roc_auc"], nan_ok=True)
    assert set(s["verification"]["gradcam"]["per_model"]) == {"sos_b", "sos_kplus1", "chin", "cvm"}
    # the screen's table recomputed from its per-image file
    items = pd.read_csv(out / "screening" / "screen_items.csv")
    for row in s["screen"]["rejections"]:
        part = items[items["source"] == row["source"]]
        assert row["n"] == len(part) and row["rejected"] == int((~part["in_distribution"].astype(bool)).sum())
    # rejection table recomputed from the per-volume file
    items = pd.read_csv(out / "garbage" / "garbage_items.csv")
    for row in s["garbage"]["rejections"]:
        part = items[items["source"] == row["source"]]
        assert row["n"] == len(part) and row["rejected"] == int(part["rejected"].sum())
        p6 = part["garbage_prob"].to_numpy()
        assert ((p6 >= 0) & (p6 <= 1)).all()
    assert set(items["source"]) == {"sos (in-distribution)", "chin", "cvm", "noise"}
    # AE table: one row per category, n = held-out quality volumes, rho in [-1, 1]
    table = pd.read_csv(out / "energy" / "energy_table.csv")
    assert list(table["category"]) == ["parotid", "submandibular", "larynx", "mandible", "overall"]
    assert (table["n"] == s["energy"]["n"]).all() and table["rho"].abs().le(1).all()
    # the NIfTI map overlays its (preprocessed) image: same grid, values in [0, 1]
    maps = sorted((out / "cams").glob("*_gradcam.nii.gz"))
    assert len(maps) == 2 * demo_settings(quick=True).n_examples
    arr = np.asarray(nib.load(str(maps[0])).dataobj)
    assert arr.shape == (32, 32, 32) and arr.min() >= 0 and arr.max() == pytest.approx(1.0)
    assert all(isinstance(e["text"], str) and e["text"] for e in s["explanations"])


def test_report_html_is_self_contained(demo):
    out, s = demo
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and external_references(text) == []
    srcs = re.findall(r'<img src="([^"]+)"', text)
    n = demo_settings(quick=True).n_examples
    n_rejected_pictures = len(s["screen"]["pictures"])
    # overlays, (ROC, reference map, features) x 2 methods, AE scatters, pictures of inputs the screen rejected
    assert len(srcs) == 2 * n + 2 * 3 + 5 + n_rejected_pictures
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    for heading in (
        "Explanations",
        "Method 1",
        "Method 2",
        "Attribution energy",
        "Garbage class",
        "In-distribution screen",
    ):
        assert heading in text
    for v in s["verdicts"]:
        assert v["subject"].split(" (")[0] in text


def test_shipped_weights(tmp_path):
    settings = demo_settings()
    found = shipped_weights(settings, seed=0)
    if found is None:
        pytest.skip(f"no shipped weights in {WEIGHTS_DIR}")
    from monai_gamverify.apps.demo import load_model as _load

    for name, path in found.items():  # every file loads into its bundle network with weights_only=True
        bm = _load(name, path, torch.device("cpu"))
        head = bm.network.head
        expected = {"chin": 2, "cvm": 6, "sos_kplus1": 6, "quality": 5}.get(name, 5)
        assert head.out_features == expected, name
    assert shipped_weights(settings, seed=1) is None  # trained for seed 0 only
    assert shipped_weights(demo_settings(quick=True), seed=0) is None
    # a changed file is refused (its SHA-256 no longer matches the manifest)
    copy = tmp_path / "w"
    shutil.copytree(WEIGHTS_DIR, copy)
    assert shipped_weights(settings, 0, weights_dir=copy) is not None
    (copy / "chin.pt").write_bytes((copy / "chin.pt").read_bytes()[:-10])
    assert shipped_weights(settings, 0, weights_dir=copy) is None
    assert json.loads((copy / "manifest.json").read_text())["config"] == weights_config(settings, 0)


def test_no_weights_without_training_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_demo_weights"):
        run_demo(tmp_path / "x", quick=True, train=False, progress=False)
    assert not (tmp_path / "x").exists()


class _Stop(Exception):
    pass


def _stop_at_cohorts(*args, **kwargs):
    raise _Stop


def test_out_must_be_new_empty_or_a_previous_demo(tmp_path, monkeypatch, capsys):
    import monai_gamverify.apps.demo.runner as runner

    monkeypatch.setattr(runner, "prepare_cohorts", _stop_at_cohorts)  # stop right after the directory is set up
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "my_cohort.nii.gz").write_bytes(b"precious")
    (project / "models").mkdir()
    (project / "models" / "mine.pt").write_bytes(b"weights")
    with pytest.raises(ValueError, match="not a previous demo output"):
        run_demo(project, quick=True, train=True, progress=False)
    assert (project / "data" / "my_cohort.nii.gz").read_bytes() == b"precious"  # nothing deleted
    assert (project / "models" / "mine.pt").is_file()
    # a new directory is claimed (marker written), stage lines go to the callback and the log, not to stdout
    stages = []
    with pytest.raises(_Stop):
        run_demo(tmp_path / "new", quick=True, train=True, progress=False, on_stage=lambda *a: stages.append(a))
    assert stages == [(1, N_STAGES, f"synthetic cohorts -> {tmp_path / 'new' / 'data'}")]
    assert capsys.readouterr().out == ""
    assert (tmp_path / "new" / DEMO_MARKER).is_file()
    # a previous demo output is cleaned and reused
    (tmp_path / "new" / "data").mkdir()
    (tmp_path / "new" / "data" / "old.nii.gz").write_bytes(b"old")
    with pytest.raises(_Stop):
        run_demo(tmp_path / "new", quick=True, train=True, progress=False)
    assert not (tmp_path / "new" / "data").exists()


def test_demo_output_is_marked(demo):
    out, _ = demo
    assert json.loads((out / DEMO_MARKER).read_text())["format"] == "monai-gamverify.demo"
