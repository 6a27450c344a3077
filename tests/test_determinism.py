"""End-to-end determinism: the same seed gives identical cohorts, trained bundle weights (CPU), features and reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_gamverify.data.synthetic import generate, make_cohort
from monai_gamverify.networks.nets import SmallCNN
from monai_gamverify.verification.workflow import run_verification

REPO = Path(__file__).resolve().parents[1]
TINY = {"roi_size": [16, 16, 16], "pixdim": [2.5, 2.5, 2.5], "network_name": "small_cnn", "batch_size": 4}


def _train(root: Path, cohort: Path, seed: int) -> dict[str, torch.Tensor]:
    shutil.copytree(REPO / "bundles" / "sos_staging", root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    overrides = {**TINY, "dataset_dir": str(cohort), "num_epochs": 1, "val_interval": 1, "seed": seed}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json"]
    cmd += ["--bundle_root", str(root)]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_same_seed_same_cohort_weights_and_report(tmp_path):
    # cohorts: same seed -> identical voxels, masks and labels; another seed -> different volumes
    a, b, c = (generate("sos", n=4, size=24, seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks)) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images[0], c.images[0])

    # bundle training on CPU: same seed -> bit-identical weights; another seed -> different weights
    cohort = tmp_path / "sos"
    make_cohort("sos", n=20, size=24, seed=0, out_dir=cohort, progress=False)
    w1, w2, w3 = (_train(tmp_path / f"run{i}", cohort, seed) for i, seed in enumerate((0, 0, 1)))
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1 if w1[k].is_floating_point())

    # features, cross-validation and report tables: same seed -> identical files
    nets = {}
    for name, seed in (("ref", 0), ("same", 1), ("other", 2)):
        torch.manual_seed(seed)
        nets[name] = SmallCNN(3, 1, 5, width=4).eval()
    data = [
        {"image": torch.from_numpy(np.clip((img + 1000) / 3000, 0, 1)).float()[None, None], "id": f"s{i}", "subject": i}
        for i, img in enumerate(generate("sos", n=12, size=24, seed=1).images)
    ]
    outs = []
    for run in ("a", "b"):
        out = tmp_path / f"verify_{run}"
        run_verification(
            (nets["ref"], "res4"),
            {"same": (nets["same"], "res4", 1), "other": (nets["other"], "res4", 0)},
            data,
            out,
            n_splits=3,
            n_estimators=20,
            seed=0,
            progress=False,
        )
        outs.append(out)
    for name in ("features.csv", "predictions.csv", "summary.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    cv = [json.loads((o / "cv.json").read_text()) for o in outs]
    assert cv[0] == cv[1]
