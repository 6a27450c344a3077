"""The label-free model-level verdict: each evidence against an independent computation, the exactness of the
conformal combination, the task check, the refusal of non-leave-models-out supervised verdicts, and the command
on real bundles (the demo's shipped weights) including a candidate that does not load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import cohen_kappa_score

from monai_gamverify.data.synthetic import burn_cue, generate
from monai_gamverify.networks import SmallCNN
from monai_gamverify.verification.bundles import check_leave_models_out
from monai_gamverify.verification.evidence import (
    ModelObservation,
    atc_accuracy,
    atc_threshold,
    cohen_kappa,
    common_grid,
    map_agreement,
    mean_map_agreement,
    observe_model,
    prediction_agreement,
    task_mismatches,
)
from monai_gamverify.verification.suitability import (
    SuitabilityPrior,
    conformal_combined,
    judge_candidate,
    pair_evidence,
    related_pvalue,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", range(6))
def test_cohen_kappa_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 30)
    b = np.where(rng.random(30) < 0.6, a, rng.integers(0, 5, 30))
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_prediction_agreement_reads_a_kplus1_candidate_over_the_reference_classes():
    rng = np.random.default_rng(7)
    ref = ModelObservation(rng.random((12, 3)), torch.zeros(12, 1, 2, 2))
    cand = ModelObservation(np.c_[ref.probs[:, ::-1], np.full(12, 9.0)], torch.zeros(12, 1, 2, 2))  # garbage wins
    want = cohen_kappa_score(ref.probs[:, ::-1].argmax(1), ref.probs.argmax(1))
    assert prediction_agreement(cand, ref) == pytest.approx(want)
    with pytest.raises(ValueError, match="label spaces"):
        prediction_agreement(ModelObservation(rng.random((12, 5)), torch.zeros(12, 1, 2, 2)), ref)


def test_cohen_kappa_constant_is_zero_not_nan():
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) == 0.0


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (6, 1, 8, 8, 8)])  # 2D and 3D
def test_map_agreement_equals_scipy_pearson(shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
    got = map_agreement(a, b)
    want = [scipy.stats.pearsonr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(shape[0])]
    np.testing.assert_allclose(got, want, atol=1e-10)
    mean_want = scipy.stats.pearsonr(a.mean(0).flatten().numpy(), b.mean(0).flatten().numpy())[0]
    assert mean_map_agreement(a, b) == pytest.approx(mean_want, abs=1e-10)
    assert map_agreement(torch.zeros(shape), b).tolist() == [0.0] * shape[0]  # constant map: 0, not NaN


def test_common_grid_is_area_average_rescaled():
    x = torch.rand(2, 1, 16, 16, 16)
    pooled = x.reshape(2, 1, 8, 2, 8, 2, 8, 2).mean((3, 5, 7))
    lo, hi = pooled.amin((2, 3, 4), keepdim=True), pooled.amax((2, 3, 4), keepdim=True)
    torch.testing.assert_close(common_grid(x, 8), (pooled - lo) / (hi - lo))


def test_atc_matches_its_definition():
    rng = np.random.default_rng(0)
    conf = rng.random(50)
    correct = (rng.random(50) < conf).astype(int)
    t = atc_threshold({"max_prob": conf.tolist(), "correct": correct.tolist()})
    assert np.mean(conf > t) == pytest.approx(correct.mean(), abs=1 / 50)  # ATC: fraction above t = accuracy
    obs = ModelObservation(
        np.c_[conf, 1 - conf], torch.zeros(50, 1, 2, 2), val_conf={"max_prob": conf, "correct": correct}
    )
    assert atc_accuracy(obs) == pytest.approx(np.mean(np.maximum(conf, 1 - conf) > t))


def test_related_pvalue_equals_a_loop_over_the_same_permutations():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, 15), rng.integers(0, 4, 15)
    b[:8] = a[:8]
    got = related_pvalue(a, b, n_perm=300, seed=3)
    perm = np.argsort(np.random.default_rng(3).random((300, 15)), axis=1)
    kappas = np.array([cohen_kappa_score(a[p], b) for p in perm])
    want = (1 + (kappas >= cohen_kappa_score(a, b) - 1e-12).sum()) / 301
    assert got == pytest.approx(want)


def test_conformal_combination_false_rejection_at_most_alpha():
    """A candidate exchangeable with the null rows (correlated evidences) is rejected at most alpha of the time."""
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
    draws, n_null = 1500, 39
    rejected = {0.05: 0, 0.1: 0}
    for _ in range(draws):
        rows = rng.multivariate_normal(np.zeros(3), cov, size=n_null + 1)
        p, _, _ = conformal_combined(rows[-1], rows[:-1])
        for a in rejected:
            rejected[a] += p <= a
    for a, k in rejected.items():
        se = np.sqrt(a * (1 - a) / draws)
        assert k / draws <= a + 3 * se, (a, k / draws)
        assert k / draws >= a - 4 * se  # exact, not merely conservative: p is uniform on {1/40, ..., 1}


def test_conformal_combination_rejects_a_candidate_far_below():
    rng = np.random.default_rng(0)
    null = rng.normal(size=(39, 3))
    p, p_each, z = conformal_combined([0.0, -6.0, 0.0], null)
    assert p == pytest.approx(1 / 40) and p_each[1] == pytest.approx(1 / 40) and z[1] < -3


def _obs(k: int = 5, n: int = 20, seed: int = 0, info: dict | None = None, same_as: ModelObservation | None = None):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, k, generator=g).softmax(1).numpy()
    cam = torch.rand(n, 1, 4, 4, 4, generator=g)
    if same_as is not None:  # a noisy copy of a common model: a few predictions and the attention perturbed
        probs = same_as.probs.copy()
        flip = np.random.default_rng(seed).choice(n, 3, replace=False)
        probs[flip] = probs[flip, ::-1]
        cam = same_as.cam + 0.3 * torch.rand(cam.shape, generator=g)
    val = {"max_prob": [0.9] * 10 + [0.4] * 10, "correct": [1] * 12 + [0] * 8}
    return ModelObservation(probs, cam, None, val, info or {})


def test_task_mismatch_decides_with_words():
    ref = _obs(info={"num_classes": 5, "class_names": list("abcde"), "modality": "CBCT"})
    two = _obs(k=2, info={"num_classes": 2, "class_names": ["x", "y"], "modality": "CBCT"})
    v = judge_candidate(two, ref, prior=None)
    assert v.verdict == "not suitable" and v.p_value == 0.0 and "2 classes" in v.reasons[0]
    mr = _obs(info={"num_classes": 5, "class_names": list("abcde"), "modality": "MR"})
    assert judge_candidate(mr, ref).verdict == "not suitable"
    kplus1 = {"num_classes": 6, "class_names": [*"abcde", "garbage"]}
    assert task_mismatches(kplus1, {"num_classes": 5, "class_names": list("abcde")}) == []
    assert task_mismatches({}, {"num_classes": 5}) == []  # a bundle without metadata: nothing to compare
    other_grid = {"num_classes": 5, "spatial_shape": [24] * 3, "pixdim": [1.67] * 3, "intensity_window": [-1000, 2000]}
    same_task = {"num_classes": 5, "spatial_shape": [32] * 3, "pixdim": [1.25] * 3, "intensity_window": [-1000, 2000]}
    assert task_mismatches(other_grid, same_task) == []  # another preprocessing grid is not another task
    assert "window" in task_mismatches({**other_grid, "intensity_window": [0, 1]}, same_task)[0]


def test_verdicts_with_a_prior_and_with_references_only():
    center = _obs(seed=0)
    ref = _obs(seed=100, same_as=center)  # the reference and the suitable models: exchangeable copies of one model
    good = [_obs(seed=s, same_as=center) for s in range(1, 25)]
    prior = SuitabilityPrior.from_pairs([pair_evidence(a, b) for a in good[:8] for b in good[:8] if a is not b])
    v = judge_candidate(good[-1], ref, prior=prior, alpha=0.05)
    assert v.verdict == "suitable", v.reasons
    v_bad = judge_candidate(_obs(seed=99), ref, prior=prior, alpha=0.05)  # unrelated predictions and attention
    assert v_bad.verdict == "not suitable" and v_bad.p_value <= 0.05
    # no prior and too few references: undecided, saying what is missing
    v_none = judge_candidate(good[-1], ref, references={"r1": good[0]}, prior=None, alpha=0.05)
    assert v_none.verdict == "undecided" and "--verifier" in v_none.reasons[0]
    # enough references: the user's own null rows, no prior needed
    refs = {f"r{i}": g for i, g in enumerate(good[:19])}
    assert judge_candidate(good[-1], ref, references=refs, prior=None, alpha=0.05).n_null == 19


def test_prior_round_trip_and_foreign_file(tmp_path):
    prior = SuitabilityPrior.from_pairs([{"agreement": 0.5, "attention": 0.4, "features": np.nan, "atc": 0.7}], "z", 20)
    back = SuitabilityPrior.load(prior.save(tmp_path / "p.json"))
    np.testing.assert_equal(back.rows, prior.rows)
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a suitability verifier file"):
        SuitabilityPrior.load(tmp_path / "x.json")


def test_supervised_verdicts_refused_without_leave_models_out():
    check_leave_models_out({"a": 1, "b": 1, "c": 0, "d": 0})
    with pytest.raises(ValueError, match="leave-models-out.*drop --labels"):
        check_leave_models_out({"a": 1, "b": 0, "c": 0})


def test_burn_cue_encodes_the_label_and_leaves_anatomy():
    c = generate("sos", n=5, size=24, seed=0)
    m = generate("sos", n=5, size=24, seed=0, cue="marker")
    levels = [m.images[i][1, 1, 1] for i in range(5)]
    assert len(set(levels)) == len(set(c.labels.tolist()))  # one intensity per class
    assert np.array_equal(m.images[:, 10:, 10:, 10:], c.images[:, 10:, 10:, 10:]) and m.meta["cue"] == "marker"
    off = burn_cue(np.zeros((4, 4, 4), np.float32), 2, "offset")
    assert float(off.max()) == 120.0
    with pytest.raises(ValueError, match="unknown cue"):
        generate("sos", n=2, size=24, cue="watermark")


def test_observe_model_leaves_the_model_untouched():
    net = SmallCNN(3, 1, 5).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    obs = observe_model(net, torch.rand(3, 1, 16, 16, 16), "res4", "stem", grid=4)
    assert obs.probs.shape == (3, 5) and tuple(obs.cam.shape) == (3, 1, 4, 4, 4) and obs.features is not None
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="NaN"):
        observe_model(net, torch.full((1, 1, 16, 16, 16), float("nan")), "res4")


# ---------------------------------------------------------------------------- the command on real bundles
def _demo_bundle(root: Path, name: str) -> Path:
    """A sos_staging bundle holding one of the demo's shipped models, with the passport training would write."""
    from monai_gamverify.handlers.passport import write_passport

    weights = REPO / "monai_gamverify" / "apps" / "demo_weights"
    manifest = json.loads((weights / "manifest.json").read_text())["config"]["models"][name]
    dst = root / name
    shutil.copytree(REPO / "bundles" / "sos_staging", dst, ignore=shutil.ignore_patterns("*.pt", "eval"))
    shutil.copy2(weights / f"{name}.pt", dst / "models" / "model.pt")
    settings = dict(manifest.get("overrides", {}))
    data = manifest["data"]
    if data != "sos":
        from monai_gamverify.data.synthetic import _CLASS_NAMES

        settings.update(num_classes=len(_CLASS_NAMES[data]), class_names=list(_CLASS_NAMES[data]))
    write_passport(dst, settings, "res4")
    return dst


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    from monai_gamverify.data.synthetic import make_cohort

    make_cohort("sos", n=20, size=32, seed=77, out_dir=root / "data", progress=False)
    return root, {n: _demo_bundle(root, n) for n in ("sos_ref", "sos_b", "chin", "cvm")}


def test_verify_command_label_free_on_real_bundles(demo_bundles, capsys):
    from monai_gamverify.cli import verify

    root, b = demo_bundles
    broken = shutil.copytree(b["sos_b"], root / "broken")
    (broken / "models" / "model.pt").write_bytes(b"not a checkpoint")
    bare = shutil.copytree(b["sos_b"], root / "bare")  # a bundle whose metadata declares nothing about its task
    (bare / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "name": "bare"}))
    cands = {"sos_b": str(b["sos_b"]), "chin": str(b["chin"]), "cvm": str(b["cvm"]), "broken": str(broken)}
    cands["bare"] = str(bare)
    verify(str(b["sos_ref"]), json.dumps(cands), str(root / "data"), out=str(root / "out"), n_images=20)
    printed = capsys.readouterr().out
    import pandas as pd

    df = pd.read_csv(root / "out" / "verdicts.csv").set_index("model")
    assert {"verdict", "p_value", "reasons", "agreement", "attention", "features", "atc"} <= set(df.columns)
    assert df.loc["chin", "verdict"] == "not suitable" and "another task" in df.loc["chin", "reasons"]
    assert df.loc["cvm", "verdict"] == "not suitable"
    assert df.loc["broken", "verdict"] == "undecided" and "broken" in df.loc["broken", "reasons"]
    assert df.loc["sos_b", "verdict"] == "suitable", df.loc["sos_b", "reasons"]  # the passport's width applied
    assert df.loc["bare", "agreement"] == pytest.approx(df.loc["sos_b", "agreement"]), df.loc["bare", "reasons"]
    assert "another task" not in df.loc["bare", "reasons"] and "could not" not in df.loc["bare", "reasons"]
    assert "report.html" in printed and (root / "out" / "report.html").stat().st_size > 1000


def test_verify_command_refuses_supervised_without_enough_models(demo_bundles):
    from monai_gamverify.cli import verify

    root, b = demo_bundles
    cands = json.dumps({"sos_b": str(b["sos_b"]), "chin": str(b["chin"])})
    with pytest.raises(ValueError, match="leave-models-out"):
        verify(str(b["sos_ref"]), cands, str(root / "data"), out=str(root / "sup"), labels='{"sos_b": 1, "chin": 0}')
