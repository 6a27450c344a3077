"""The MONAI Application Package description of ``examples/deploy_dicom_app`` (what ``monai-deploy package`` reads:
``app.yaml``, ``requirements.txt``, the ``__main__.py`` entry point, the model layout under ``/opt/holoscan/models``),
checked without docker, and the packaged entry point run on a DICOM study as the container would run it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _dicom_study import ct_series
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "deploy_dicom_app"
TINY = {"network_name": "small_cnn", "networks#small_cnn#width": 4, "roi_size": [16, 16, 16], "pixdim": [2.5] * 3}
#: the Holoscan CLI's app.yaml keys (holoscan.cli packager: ApplicationConfiguration)
APPLICATION_KEYS = {"title": str, "version": (str, int, float), "inputFormats": list, "outputFormats": list}
RESOURCE_KEYS = {"cpu": (int, float), "gpu": (int, float), "memory": str, "gpuMemory": str}
_MEMORY = re.compile(r"^\d+(\.\d+)?(Mi|Gi)$")


def test_app_yaml_is_a_valid_package_description():
    text = (APP / "app.yaml").read_text()
    assert text.startswith("%YAML 1.2")
    config = yaml.safe_load(text.split("---", 1)[1])
    assert set(config) == {"application", "resources"}
    for key, kind in APPLICATION_KEYS.items():
        assert isinstance(config["application"][key], kind), key
    assert set(config["application"]["inputFormats"]) <= {"file", "network"}
    assert set(config["application"]["outputFormats"]) <= {"file", "screen", "network"}
    for key, kind in RESOURCE_KEYS.items():
        assert isinstance(config["resources"][key], kind), key
    assert _MEMORY.match(config["resources"]["memory"]) and _MEMORY.match(config["resources"]["gpuMemory"])
    assert config["resources"]["cpu"] >= 1 and config["resources"]["gpu"] >= 0
    version = str(config["application"]["version"])
    import monai_gamverify

    assert version == monai_gamverify.__version__


def test_requirements_and_entry_point():
    reqs = [Requirement(line) for line in (APP / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    by_name = {r.name: r for r in reqs}
    assert str(by_name["torch"].specifier) == "==2.13.0"
    assert "dicom" in by_name["monai-gamverify"].extras and "monai-deploy-app-sdk" in by_name
    compile((APP / "__main__.py").read_text(), "__main__.py", "exec")
    assert (
        "folder_main" in (APP / "__main__.py").read_text()
        and "from app import main" in (APP / "__main__.py").read_text()
    )


def _package_layout(tmp_path) -> Path:
    """``-m models/``: what the packager copies to /opt/holoscan/models (one folder per bundle)."""
    from test_serve import _tiny_bundle

    models = tmp_path / "opt" / "holoscan" / "models"
    _tiny_bundle(models / "sos_staging")
    return models


def _run_entry(python: str, tmp_path: Path, models: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    study = tmp_path / "input"
    study.mkdir()
    for i, ds in enumerate(ct_series(n=8, rows=16, cols=16)):
        ds.save_as(str(study / f"IM{i:03d}.dcm"), enforce_file_format=True)
    paths = {"HOLOSCAN_INPUT_PATH": study, "HOLOSCAN_OUTPUT_PATH": tmp_path / "output", "HOLOSCAN_MODEL_PATH": models}
    env = {**os.environ, **(env or {}), **{k: str(v) for k, v in paths.items()}, "OMP_NUM_THREADS": "1"}
    return subprocess.run([python, str(APP), "--overrides", json.dumps(TINY), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip


def test_packaged_entry_point_runs(tmp_path):
    """``python <app folder>`` with the HOLOSCAN_* paths the container sets, this interpreter (no SDK here: the
    SDK-free route; with the SDK installed it would run the Holoscan application)."""
    from monai_gamverify.apps.integrations.deploy import sdk_available

    if sdk_available():
        pytest.skip("the SDK is installed: the entry point runs the Holoscan app (tests/test_serve.py)")
    proc = _run_entry(sys.executable, tmp_path, _package_layout(tmp_path), {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "judged" and summary["objects"]["Secondary Capture Image Storage"] == 8
    assert all(Path(f).is_file() for f in summary["files"])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GAMVERIFY_CLEAN_VENV_TESTS") != "1",
    reason="installs torch and the package into a fresh venv (3-4 min, network): set GAMVERIFY_CLEAN_VENV_TESTS=1",
)
def test_packaged_entry_point_in_a_clean_venv(tmp_path):
    """A fresh virtual environment with the app's requirements (this checkout for monai-gamverify, no SDK), then the
    entry point: the package description is enough to run the app. Needs the package registry (skipped without)
    and ``GAMVERIFY_CLEAN_VENV_TESTS=1`` (it downloads and installs torch: 3 min 38 s here, passed)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    first = subprocess.run([*pip, "torch==2.13.0"], capture_output=True, text=True, timeout=1200)
    if first.returncode != 0:
        pytest.skip(f"no package registry answer: {first.stderr.strip().splitlines()[-1:]}")
    reqs = [line for line in (APP / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#") and "monai-deploy-app-sdk" not in line]  # fmt: skip
    reqs = [f"{REPO}[dicom]" if line.startswith("monai-gamverify") else line for line in reqs]
    subprocess.run([*pip, *reqs], check=True, timeout=1800)
    models = _package_layout(tmp_path)
    shutil.rmtree(tmp_path / "input", ignore_errors=True)
    proc = _run_entry(str(venv / "bin" / "python"), tmp_path, models, {"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "judged"
