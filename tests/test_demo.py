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
from monai_gamverify.apps.demo.report import verdicts as verdict_lines
from monai_gamverify.apps.demo.settings import N_STAGES, bundles_dir
from monai_gamverify.apps.demo.stages import CANDIDATES, TARGETS, verdict_cohorts, verify_models
from monai_gamverify.apps.report import PNG_SIGNATURE, external_references
from monai_gamverify.apps.suitability import default_prior_path
from monai_gamverify.data.synthetic import make_cohort
from monai_gamverify.verification.suitability import VERDICTS, SuitabilityPrior

#: the shipped prior's path, read before the stand-in replaces it for the other tests
PRIOR_AT_IMPORT = default_prior_path()

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


@pytest.fixture(scope="module", autouse=True)
def stand_in_prior(tmp_path_factory):
    """A stand-in for the prior shipped with the package (suitable-pair rows drawn around the demo's own SOS pairs;
    seeded), so that these tests do not depend on that file: a quick run's 1-epoch models make no meaningful verdict
    on SOS candidates anyway, and chin and CVM are refused by their task metadata whatever the prior."""
    rng = np.random.default_rng(0)
    rows = [
        {"agreement": a, "attention": b, "features": c, "atc": np.nan}
        for a, b, c in zip(rng.normal(0.85, 0.08, 30), rng.normal(0.55, 0.1, 30), rng.normal(0.78, 0.07, 30))
    ]
    path = SuitabilityPrior.from_pairs(rows, source="test stand-in", n_images=20).save(
        tmp_path_factory.mktemp("prior") / "prior.json"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("monai_gamverify.apps.suitability._PRIOR", path)
        yield path


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
    for name in MODELS:  # each model trained in its own copy of its bundle, with the passport training writes
        assert (out / "models" / name / "models" / "model.pt").is_file(), name
        assert (out / "models" / name / "configs" / "train.json").is_file(), name
        if MODELS[name]["bundle"] == "sos_staging":
            assert (out / "models" / name / "models" / "passport.json").is_file(), name
        assert list((out / "tensorboard" / f"train_{name}").glob("events.out.tfevents.*")), name
    assert not (bundles_dir() / "sos_staging" / "models" / "passport.json").exists()  # the package's bundle untouched
    assert list((out / "tensorboard" / "summary").glob("events.out.tfevents.*"))
    for target in TARGETS:
        for f in ("verdicts.csv", "verdicts.json", "report.html"):
            assert (out / "verify" / target / f).is_file(), (target, f)
    assert (out / "verify" / "ground_truth.csv").is_file()
    for f in ("energy_table.csv", "energy_loo.csv", "ae.csv", "consensus.csv", "regression_metrics.csv"):
        assert (out / "energy" / f).is_file(), f
    assert len(list((out / "energy").glob("energy_scatter_*.png"))) == 5
    assert (out / "garbage" / "rejections.csv").is_file()
    text = format_summary(s)
    assert "verdicts:" in text and str(out / "report.html") in text
    assert "model chin (trained on other data): not suitable for the SOS data (label-free, p = 0): another task" in text


def test_figures_agree_with_the_files(demo):
    out, s = demo
    # the label-free verdicts: one per candidate and target, recomputed key figures, chin and CVM refused by task
    v = s["verification"]
    assert v["prior"]["source"] == "test stand-in" and v["n_images"] == demo_settings(quick=True).n_target
    lines = {(subject, text): good for subject, text, good in verdict_lines(s)}
    for target, info in v["targets"].items():
        table = pd.read_csv(out / "verify" / target / "verdicts.csv")
        assert list(table["model"]) == list(CANDIDATES) == [r["model"] for r in info["verdicts"]]
        assert set(table["verdict"]) <= set(VERDICTS)
        for name in ("chin", "cvm"):
            row = table.set_index("model").loc[name]
            assert row["verdict"] == "not suitable" and row["p_value"] == 0 and "another task" in row["reasons"]
        what = "clean SOS target" if target == "clean" else "SOS target carrying the marker"
        right = np.mean([verdict == CANDIDATES[m][1] for m, verdict in zip(table["model"], table["verdict"])])
        assert s["key_figures"][f"label-free model verdicts as expected, {what}"] == pytest.approx(right)
    for name in ("chin", "cvm"):
        subject = f"model {name} (trained on other data)"
        found = [good for (subj, text), good in lines.items() if subj == subject and "label-free" in text]
        assert found == [True], (name, found)
    truth = pd.read_csv(out / "verify" / "ground_truth.csv").set_index("model")
    assert set(truth.index) == {"sos_ref", "sos_b", "sos_kplus1", "sos_shortcut"}
    short = truth.loc["sos_shortcut"]
    assert s["key_figures"]["shortcut model accuracy, SOS test split with the marker"] == pytest.approx(
        short["accuracy, SOS test split with the marker"], nan_ok=True
    )
    assert s["key_figures"]["shortcut model accuracy, SOS test split without the marker"] == pytest.approx(
        short["accuracy, SOS test split"], nan_ok=True
    )
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
    n_mean_maps = len(list((out / "verify").glob("*/maps/*_mean_maps.png")))
    assert n_mean_maps == len(TARGETS) * len(CANDIDATES)
    # overlays, mean maps of every candidate on every target, AE scatters, pictures of inputs the screen rejected
    assert len(srcs) == 2 * n + n_mean_maps + 5 + n_rejected_pictures
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    for heading in (
        "Explanations",
        "Model verdicts (label-free)",
        "ground truth",
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

    assert set(found) == set(MODELS)
    for name, path in found.items():  # every file loads into its bundle network with weights_only=True
        bm = _load(name, path, torch.device("cpu"))
        head = [m for m in bm.network.modules() if isinstance(m, torch.nn.Linear)][-1]
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


def test_missing_prior_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("monai_gamverify.apps.suitability._PRIOR", tmp_path / "no_prior.json")
    with pytest.raises(FileNotFoundError, match="prior"):
        run_demo(tmp_path / "x", quick=True, train=True, progress=False)
    assert not (tmp_path / "x").exists()


def test_shipped_verdicts_are_right(tmp_path):
    """The user's case on the shipped weights and the **shipped prior**: every candidate's label-free verdict as
    expected on the clean SOS target and on the same volumes carrying the marker (chin, CVM and the shortcut model
    not suitable, the SOS models suitable), and the shortcut model measured to rely on its marker."""
    if not PRIOR_AT_IMPORT.is_file():
        pytest.skip(f"no shipped prior {PRIOR_AT_IMPORT} (scripts/experiment_verify.py --write-prior)")
    settings = demo_settings()
    found = shipped_weights(settings, seed=0)
    if found is None:
        pytest.skip(f"no shipped weights in {WEIGHTS_DIR}")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_cohort("sos", n=settings.n["sos"], size=settings.size, seed=0, out_dir=tmp_path / "sos", progress=False)
        verdict_cohorts(tmp_path, settings, seed=0, progress=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("monai_gamverify.apps.suitability._PRIOR", PRIOR_AT_IMPORT)
            res = verify_models(tmp_path, found, tmp_path / "verify", settings, 0, torch.device("cpu"), False)
    finally:
        torch.set_num_threads(n)
    for target, info in res["targets"].items():
        got = dict(zip(info["verdicts"]["model"], info["verdicts"]["verdict"]))
        assert got == {m: expected for m, (_, expected) in CANDIDATES.items()}, (target, info["summary"])
    short = res["truth"].set_index("model").loc["sos_shortcut"]
    assert short["accuracy, SOS test split with the marker"] >= 0.7 > 0.5 > short["accuracy, SOS test split"]


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
