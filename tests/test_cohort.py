"""Cohort runs: per-item results against direct calls, skip-and-report, resume after SIGKILL / SIGINT, torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DistributedSampler

from monai_gamverify.apps.cohort import cohort_items, results_table, run_cohort, shard
from monai_gamverify.apps.cohort.command import main
from monai_gamverify.data.datalist import DataError
from monai_gamverify.networks.nets import SmallCNN
from monai_gamverify.visualize.cam import GradCAM, normalize_maps

NET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "width": 4}
NET = "monai_gamverify.networks.nets.SmallCNN"
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
N_GOOD = 8
BAD = {  # id -> expected start of the errors.csv message
    "bad_2d": "ValueError: image",  # "... has 2 spatial dimension(s)"
    "bad_junk": "ImageFileError",
    "bad_missing": "image file not found",
    "bad_nan": "ValueError: image",
    "bad_trunc": "EOFError",
    "item00013": "entry 13 has no 'image' key",
}


def _kwargs(root: Path) -> dict:
    return {"network": NET, "network_args": NET_ARGS, "checkpoint": str(root / "model.pt"), "layer": "res4"}


def _cli_args(root: Path, out: Path) -> list[str]:
    return [
        "--datalist", str(root / "datalist.json"), "--out", str(out), "--network", NET,
        "--network_args", json.dumps(NET_ARGS), "--checkpoint", str(root / "model.pt"), "--layer", "res4",
        "--threads", "1", "--no_progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """8 tiny volumes (16^3), 6 bad entries, SmallCNN weights, a datalist."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "img").mkdir()
    torch.manual_seed(0)
    net = SmallCNN(**NET_ARGS)
    with torch.no_grad():  # non-trivial BatchNorm statistics so the classes differ between images
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), root / "model.pt")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N_GOOD):
        vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
        vol[4 + i : 9 + i, 3:8, 5:11] += 3.0  # a bright block that moves from image to image
        vol = vol * (0.3 + 0.4 * i) + (i - 4) * 0.7  # and varied contrast, so the predicted classes differ
        nib.save(nib.Nifti1Image(vol, AFFINE), str(root / "img" / f"v{i:02d}.nii.gz"))
        entries.append({"image": f"img/v{i:02d}.nii.gz", "label": i % 3})
    good = (root / "img" / "v00.nii.gz").read_bytes()
    (root / "img" / "bad_trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (root / "img" / "bad_junk.nii.gz").write_bytes(b"this is not a NIfTI file" * 20)
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(root / "img" / "bad_2d.nii.gz"))
    nan = np.zeros((16, 16, 16), np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(root / "img" / "bad_nan.nii.gz"))
    for name in ("bad_trunc", "bad_junk", "bad_2d", "bad_nan", "bad_missing"):
        entries.append({"image": f"img/{name}.nii.gz", "label": 0})
    entries.append({"label": 1})  # no image key
    (root / "datalist.json").write_text(json.dumps({"test": entries}))
    return root


@pytest.fixture(scope="module")
def baseline(cohort, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted single-process run (one thread, like the subprocesses)."""
    out = tmp_path_factory.mktemp("baseline")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_cohort(cohort / "datalist.json", out, progress=False, **_kwargs(cohort))
    finally:
        torch.set_num_threads(n)
    return out, result


def _tables(out: Path) -> tuple[str, str, dict]:
    summary = json.loads((out / "summary.json").read_text())
    return (out / "results.csv").read_text(), (out / "errors.csv").read_text(), summary


def _assert_same_run(out: Path, ref: Path, maps_exact: bool = True) -> None:
    res, err, summ = _tables(out)
    ref_res, ref_err, ref_summ = _tables(ref)
    assert err == ref_err
    assert summ == ref_summ
    if maps_exact:
        assert res == ref_res
    else:
        a, b = pd.read_csv(out / "results.csv"), pd.read_csv(ref / "results.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    for f in sorted((ref / "maps").glob("*.nii.gz")):
        x, y = nib.load(str(out / "maps" / f.name)), nib.load(str(f))
        np.testing.assert_allclose(x.get_fdata(), y.get_fdata(), rtol=0, atol=0 if maps_exact else 1e-6)
        np.testing.assert_array_equal(x.affine, y.affine)
    leftovers = [p.name for sub in ("items", "maps", "errors") for p in (out / sub).glob(".*")]
    assert leftovers == [], f"half-written files left: {leftovers}"


def test_results_match_direct_calls_and_bad_items_are_reported(cohort, baseline, one_thread):
    out, result = baseline
    assert (result["n_items"], result["n_succeeded"], result["n_failed"]) == (N_GOOD + len(BAD), N_GOOD, len(BAD))
    errors = pd.read_csv(out / "errors.csv")
    assert errors["id"].tolist() == sorted(BAD)
    for _, row in errors.iterrows():
        assert row["message"].startswith(BAD[row["id"]]), row["message"]
    msg = dict(zip(errors["id"], errors["message"]))
    assert "2 spatial dimension" in msg["bad_2d"] and "NaN" in msg["bad_nan"]
    assert errors.set_index("id").loc["bad_missing", "file"].endswith("bad_missing.nii.gz")

    # independent reference: plain forward for the prediction, GradCAM call for the map and the energy
    net = SmallCNN(**NET_ARGS)
    net.load_state_dict(torch.load(cohort / "model.pt", weights_only=True))
    net.eval()
    table = pd.read_csv(out / "results.csv")
    assert table["id"].tolist() == [f"v{i:02d}" for i in range(N_GOOD)]
    assert (table["prediction_name"].astype(str) == table["prediction"].astype(str)).all()  # no class names given
    for _, row in table.iterrows():
        img = nib.load(str(cohort / "img" / f"{row['id']}.nii.gz"))
        x = torch.as_tensor(img.get_fdata(), dtype=torch.float32)[None, None]
        with torch.no_grad():
            probs = net(x).softmax(1)[0]
        np.testing.assert_allclose(row[["p_0", "p_1", "p_2"]].to_numpy(float), probs.numpy(), rtol=1e-5)
        assert row["prediction"] == int(probs.argmax()) and row["label"] == int(row["id"][1:]) % 3
        raw = GradCAM(net, "res4")(x, normalize=False)
        assert row["energy"] == pytest.approx(float(raw.double().sum()), rel=1e-5)
        saved = nib.load(str(out / row["map"]))
        np.testing.assert_allclose(saved.get_fdata(), normalize_maps(raw)[0, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(saved.affine, img.affine)  # the map overlays its image
        item = json.loads((out / "items" / f"{row['id']}.json").read_text())
        assert item["status"] == "ok" and item["result"]["energy"] == row["energy"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["energy"]["mean"] == pytest.approx(table["energy"].mean(), rel=1e-12)
    assert sum(summary["predictions"].values()) == N_GOOD
    assert json.loads((out / "run.json").read_text())["config"]["layer"] == "res4"


def test_resume_skips_valid_items_and_redoes_damaged_ones(cohort, baseline, tmp_path, one_thread):
    ref, _ = baseline
    out = tmp_path / "out"
    # writes in the loop here (the baseline writes in the background thread): the same files
    first = run_cohort(cohort / "datalist.json", out, progress=False, background_writes=False, **_kwargs(cohort))
    assert first["computed"] == N_GOOD + len(BAD) and first["skipped"] == 0
    _assert_same_run(out, ref)
    # damage: a deleted result, a truncated result JSON, a deleted map, a stale temp file of a killed write
    (out / "items" / "v01.json").unlink()
    text = (out / "items" / "v02.json").read_text()
    (out / "items" / "v02.json").write_text(text[: len(text) // 2])
    (out / "maps" / "v03_cam.nii.gz").unlink()
    (out / "items" / ".v04.abc123.json").write_text("{")
    # maps that exist but are not valid: truncated (a gzip cut short), another shape, NaN values
    data = (out / "maps" / "v05_cam.nii.gz").read_bytes()
    (out / "maps" / "v05_cam.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), AFFINE), str(out / "maps" / "v06_cam.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), AFFINE), str(out / "maps" / "v07_cam.nii.gz"))
    for name in ("results.csv", "summary.json", "errors.csv"):
        (out / name).unlink()
    again = run_cohort(cohort / "datalist.json", out, progress=False, **_kwargs(cohort))
    assert again["skipped"] == N_GOOD - 6 and again["computed"] == 6 + len(BAD)  # failed items are retried
    _assert_same_run(out, ref)


def test_refuses_other_config_unless_overwrite(cohort, baseline, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    items = [str(cohort / "img" / f"v{i:02d}.nii.gz") for i in range(2)]
    run_cohort(items, out, progress=False, **_kwargs(cohort))
    other = {**_kwargs(cohort), "layer": "res2"}
    with pytest.raises(ValueError, match=r"different configuration \(differs in: .*layer"):
        run_cohort(items, out, progress=False, **other)
    assert json.loads((out / "run.json").read_text())["config"]["layer"] == "res4"  # untouched
    result = run_cohort(items, out, progress=False, overwrite=True, **other)
    assert result["computed"] == 2 and json.loads((out / "run.json").read_text())["config"]["layer"] == "res2"
    # the command line reports the same as a one-line error, exit code 2
    assert main(_cli_args(cohort, out)) == 2
    assert "different configuration" in capsys.readouterr().err
    # a foreign non-empty directory is never taken over
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        run_cohort(items, foreign, progress=False, **_kwargs(cohort))


def test_items_ids_and_sharding(cohort, tmp_path):
    items = cohort_items(cohort / "datalist.json")
    assert [i["id"] for i in items][:2] == ["v00", "v01"] and Path(items[0]["image"]).is_absolute()
    assert "_error" in items[-1] and items[-1]["id"] == "item00013"
    with pytest.raises(DataError, match="same id 'v00'"):
        cohort_items([str(cohort / "img" / "v00.nii.gz"), {"image": "x/v00.nii.gz"}])
    with pytest.raises(DataError, match="no entries under 'validation'"):
        cohort_items(cohort / "datalist.json", split="validation")
    for n, world in ((7, 3), (10, 2), (2, 4)):
        shards = [shard(n, r, world) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n)), "every item exactly once, no padding duplicates"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        if n >= world:  # same split as MONAI's sampler without padding
            want = [list(DistributedSampler(range(n), False, world, r, shuffle=False)) for r in range(world)]
            assert shards == want


def test_verdicts_from_reference_map_and_verifier(cohort, tmp_path, one_thread):
    from monai_gamverify.metrics.similarity import DEFAULT_METRICS, similarity_metrics
    from monai_gamverify.verification.reference import ReferenceMap
    from monai_gamverify.verification.verifier import SuitabilityVerifier

    items = [str(cohort / "img" / f"v{i:02d}.nii.gz") for i in range(4)]
    net = SmallCNN(**NET_ARGS)
    net.load_state_dict(torch.load(cohort / "model.pt", weights_only=True))
    net.eval()
    xs = torch.stack([torch.as_tensor(nib.load(p).get_fdata(), dtype=torch.float32)[None] for p in items])
    ref = ReferenceMap().update(GradCAM(net, "res4")(xs[:2]))
    ref.save(tmp_path / "ref")
    rng = np.random.default_rng(0)
    train = pd.DataFrame(rng.uniform(size=(40, len(DEFAULT_METRICS))), columns=list(DEFAULT_METRICS))
    train["label"] = (train["cosine"] > 0.5).astype(int)
    ver = SuitabilityVerifier(n_estimators=10, random_state=0).fit(train)
    ver.save(tmp_path / "ver.skops")
    out = tmp_path / "out"
    result = run_cohort(
        items, out, reference=tmp_path / "ref", verifier=tmp_path / "ver.skops", progress=False, **_kwargs(cohort)
    )
    table = pd.read_csv(out / "results.csv")
    maps = GradCAM(net, "res4")(xs)
    want = similarity_metrics(maps, ReferenceMap.load(tmp_path / "ref").value)
    for k in DEFAULT_METRICS:
        np.testing.assert_allclose(table[k].to_numpy(), want[k].numpy(), rtol=1e-5, atol=1e-7)
    p = ver.predict_proba(table[list(DEFAULT_METRICS)])[:, 1]
    np.testing.assert_allclose(table["p_suitable"].to_numpy(), p)
    assert table["verdict"].tolist() == ["suitable" if v >= 0.5 else "not suitable" for v in p]
    assert sum(result["verdicts"].values()) == 4
    with pytest.raises(ValueError, match="needs the reference map"):
        run_cohort(items, tmp_path / "o2", verifier=tmp_path / "ver.skops", **_kwargs(cohort))


def test_bundle_maps_are_inverted_onto_the_input_grid(cohort, tmp_path, one_thread):
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"
    torch.manual_seed(0)
    torch.save(SmallCNN(3, 1, 5).state_dict(), tmp_path / "w.pt")
    items = [str(cohort / "img" / f"v{i:02d}.nii.gz") for i in range(2)] + [str(cohort / "img" / "bad_2d.nii.gz")]
    out = tmp_path / "out"
    result = run_cohort(
        items, out, bundle_root=bundle, overrides={"network_name": "small_cnn"}, checkpoint=tmp_path / "w.pt",
        progress=False,
    )  # fmt: skip
    assert (result["n_succeeded"], result["n_failed"]) == (2, 1)
    assert "2 spatial dimension" in pd.read_csv(out / "errors.csv")["message"][0]
    table = pd.read_csv(out / "results.csv")
    assert set(table["prediction_name"]) <= {"stage1_open", "stage2", "stage3", "stage4", "stage5_fused"}
    for _, row in table.iterrows():
        img, cam = nib.load(row["image"]), nib.load(str(out / row["map"]))
        assert cam.shape == img.shape  # preprocessing (1.25 mm, 32^3) inverted back to 16^3 at 1.5/2 mm
        np.testing.assert_allclose(cam.affine, img.affine, atol=1e-5)
        assert cam.get_fdata().max() > 0


@pytest.mark.parametrize(
    "shape, affine",
    [
        ((16, 16, 16), AFFINE),  # resampled 1.5/2 mm -> 1.25 mm, then padded to 32^3
        ((32, 32, 32), np.diag([1.25, 1.25, 1.25, 1.0])),  # already the preprocessed grid: nothing to resample
        ((40, 30, 50), np.diag([1.0, 1.1, 0.9, 1.0])),  # cropped along one axis, padded along another
        ((20, 36, 28), np.array([[-1.3, 0, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 1.6, -5.0], [0, 0, 0, 1]])),  # LPI
        ((24, 18, 30), np.array([[0, 0, 1.2, 1.0], [1.4, 0, 0, 2.0], [0, -1.0, 0, 3.0], [0, 0, 0, 1]])),  # permuted
        ((22, 22, 22), np.array([[1.2, 0.2, 0, 1.0], [-0.2, 1.2, 0, 2.0], [0, 0, 1.5, 3.0], [0, 0, 0, 1]])),  # oblique
    ],
)
def test_fast_invert_equals_monai_invertd(tmp_path, shape, affine, one_thread):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Rotate90d

    from monai_gamverify.bundle import load_bundle
    from monai_gamverify.io.grid import fast_invert, invert_to_input

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"
    pre = load_bundle(bundle, device="cpu", require_weights=False).preprocessing()
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine), str(path))
    img = pre({"image": str(path)})["image"]
    torch.manual_seed(0)
    cam = normalize_maps(torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, 4), img.shape[1:], mode="trilinear"))
    want = invert_to_input(cam[0], img, pre)
    got, got_affine = fast_invert(cam[0], img)
    assert got.shape == want.shape == (1, *shape)
    np.testing.assert_allclose(got.numpy(), want.as_tensor().numpy(), rtol=0, atol=1e-5)  # equal here
    np.testing.assert_allclose(got_affine, want.affine.numpy(), atol=1e-6)
    np.testing.assert_array_equal(got_affine, nib.load(str(path)).affine)  # the input's own affine
    # a preprocessing with a transform it does not handle: None, and the cohort run falls back to Invertd
    other = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Rotate90d("image")])
    rotated = other({"image": str(path)})["image"]
    assert fast_invert(torch.zeros_like(rotated), rotated) is None


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before it could be interrupted")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for item files")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_sigint_then_resume_equals_uninterrupted_run(cohort, baseline, tmp_path, one_thread):
    ref, _ = baseline
    out = tmp_path / "out"
    # each item is slowed down by 0.3 s in the children only, so the signals land mid-run; the second child
    # imports everything while the first one runs and starts its run when the "go" file appears
    go = tmp_path / "go"
    script = tmp_path / "slow_cohort.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "import monai.bundle, monai.transforms, monai_gamverify.cli, monai_gamverify.handlers\n"
        "import monai_gamverify.apps.pipeline as p\n"
        "orig = p.ImagePipeline.explain\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return orig(self, *a, **k)\n"
        "p.ImagePipeline.explain = slow\n"
        "go = Path(sys.argv[1])\n"
        "while not go.exists():\n"
        "    time.sleep(0.02)\n"
        "sys.exit(monai_gamverify.cli.cohort(*sys.argv[2:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(go_file: Path) -> subprocess.Popen:
        cmd = [sys.executable, str(script), str(go_file), *_cli_args(cohort, out)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done() -> int:
        return len(list((out / "items").glob("v*.json"))) if (out / "items").is_dir() else 0

    (tmp_path / "go_now").touch()
    proc = start(tmp_path / "go_now")
    second = start(go)
    _wait_for(lambda: done() >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = done()
    assert 2 <= killed_at < N_GOOD and not (out / "results.csv").exists()

    proc = second
    go.touch()
    _wait_for(lambda: done() >= killed_at + 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    assert killed_at + 2 <= done() < N_GOOD and not (out / "results.csv").exists()
    for sub in ("items", "maps", "errors"):
        assert [p.name for p in (out / sub).glob(".*")] == [], "nothing half-written after SIGINT"
    for f in (out / "items").glob("*.json"):
        assert json.loads(f.read_text())["status"] == "ok"

    before = done()
    result = run_cohort(cohort / "datalist.json", out, progress=False, **_kwargs(cohort))
    assert result["skipped"] == before and result["computed"] == N_GOOD - before + len(BAD)
    assert result["n_succeeded"] == N_GOOD and result["n_failed"] == len(BAD)
    _assert_same_run(out, ref)


@pytest.mark.slow
def test_two_processes_under_torch_distributed_equal_single_process(cohort, baseline, tmp_path):
    ref, _ = baseline
    out = tmp_path / "out"
    # the environment torchrun gives its workers (`torchrun --standalone --nproc_per_node=2 -m
    # monai_gamverify.apps.cohort ...` does the same; started directly here to spare the launcher's start-up)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # fmt: skip
        cmd = [sys.executable, "-m", "monai_gamverify.apps.cohort", *_cli_args(cohort, out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 1, err[-3000:]  # 1: some items failed (the bad ones), the rest succeeded
    assert f"{N_GOOD} succeeded, {len(BAD)} failed" in outputs[0][0]  # rank 0 reports
    assert outputs[1][0] == ""
    _assert_same_run(out, ref, maps_exact=False)
    # each rank wrote its own share of the item files: all of them are there exactly once
    assert sorted(p.stem for p in (out / "items").glob("*.json")) == [f"v{i:02d}" for i in range(N_GOOD)]
    assert sorted(p.stem for p in (out / "errors").glob("*.json")) == sorted(BAD)


def test_results_table_is_built_once_in_linear_time():
    # 2000 rows x 400 columns: merging the column lists row by row (O(rows * cols^2)) takes seconds; a DataFrame from
    # the records takes a fraction of a second
    cols = [f"feature_{j:03d}" for j in range(400)]
    rows = [{"id": f"i{i:04d}", **{c: float(i) for c in cols}} for i in range(2000)]
    rows[5]["late_column"] = 1.0  # a column only one row has: kept, in order of first appearance, empty elsewhere
    start = time.perf_counter()
    table = results_table(rows)
    seconds = time.perf_counter() - start
    assert list(table.columns) == ["id", *cols, "late_column"]
    assert table.shape == (2000, 402) and table["late_column"].notna().sum() == 1
    assert table.loc[7, "feature_123"] == 7.0
    baseline = time.perf_counter()
    _ = pd.DataFrame(rows)
    baseline = time.perf_counter() - baseline
    assert seconds < 3 * baseline + 0.2, (seconds, baseline)


class _OOMNet(torch.nn.Module):
    """SmallCNN that runs out of device memory on its third forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = SmallCNN(**NET_ARGS)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_stops_the_run_instead_of_failing_every_item(cohort, tmp_path, one_thread):
    from monai_gamverify.apps.cohort import CohortOutOfMemory

    items = [str(cohort / "img" / f"v{i:02d}.nii.gz") for i in range(5)]
    out = tmp_path / "out"
    with pytest.raises(CohortOutOfMemory, match="out of device memory"):
        run_cohort(items, out, network=_OOMNet(), layer="inner.res4", progress=False, background_writes=False)
    assert sorted(p.stem for p in (out / "items").glob("*.json")) == ["v00", "v01"]  # finished items are kept
    assert list((out / "errors").glob("*.json")) == []  # and the OOM is no item error


def test_one_parser_and_exit_codes(cohort, tmp_path, one_thread, capsys):
    items = [str(cohort / "img" / f"v{i:02d}.nii.gz") for i in range(2)] + [str(cohort / "img" / "bad_2d.nii.gz")]
    (tmp_path / "list.json").write_text(json.dumps({"test": [{"image": p} for p in items]}))
    args = ["--out", str(tmp_path / "o"), "--network", NET, "--network_args", json.dumps(NET_ARGS),
            "--checkpoint", str(cohort / "model.pt"), "--layer", "res4", "--no_progress"]  # fmt: skip
    # gamverify cohort DATA ... and python -m monai_gamverify.apps.cohort --datalist DATA: one parser, same codes
    assert main([str(tmp_path / "list.json"), *args]) == 1  # an item failed: non-zero
    assert "2 succeeded, 1 failed" in capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (
        [sys.executable, "-m", "monai_gamverify.cli", "cohort", str(tmp_path / "list.json")],
        [sys.executable, "-m", "monai_gamverify.apps.cohort", "--datalist", str(tmp_path / "list.json")],
    ):
        proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "2 succeeded, 1 failed" in proc.stdout
    assert main(["--datalist", str(tmp_path / "missing.json"), *args]) == 2
    assert "datalist not found" in capsys.readouterr().err


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_separable_resampling_equals_monai_affine_transform(k, padding):
    """The axis-aligned inverse (one linear interpolation per axis) equals MONAI's AffineTransform (grid_sample),
    up- and downsampling with offsets that reach outside the volume, either align_corners."""
    from monai.networks.layers import AffineTransform

    from monai_gamverify.io.grid import _lerp_axis

    rng = np.random.default_rng(k)
    for _ in range(6):
        n_in, n_out = rng.integers(5, 16, k), rng.integers(5, 20, k)
        scale, shift = rng.uniform(0.3, 2.5, k), rng.uniform(-3, 3, k)
        x = torch.rand(2, *n_in.tolist(), dtype=torch.float64)
        theta = np.eye(k + 1)
        theta[:k, :k], theta[:k, k] = np.diag(scale), shift
        out = x
        for a in range(k):
            coords = torch.arange(int(n_out[a]), dtype=torch.float64) * scale[a] + shift[a]
            out = _lerp_axis(out, a + 1, coords, padding)
        for align in (False, True):
            ref = AffineTransform(normalized=False, mode="bilinear", padding_mode=padding, align_corners=align,
                                  reverse_indexing=True)(x[None], theta=torch.as_tensor(theta),
                                                         spatial_size=n_out.tolist())[0]  # fmt: skip
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
