"""This package installs beside MONAI Label 0.8.5: ``pip install --dry-run`` of torch 2.13.0 (first, as the README
says), ``monailabel==0.8.5`` (with the ``pydicom==2.4.5`` its pydicom-seg needs) and this checkout, in a throwaway
virtual environment, resolves (no ``ResolutionImpossible``: the package no longer requires ``jsonschema>=4``, which
monailabel's pydicom-seg caps below 4). Slow (about 2 minutes the first time: pip reads ~160 packages' metadata; 30 s
with pip's cache); skipped when the registry does not answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_runtime_requirements_leave_jsonschema_out():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in project["dependencies"]]
    assert "jsonschema" not in names and "highdicom" not in names  # MONAI Label's env: jsonschema<4, pydicom 2.4
    assert any(d.startswith("jsonschema") for d in project["optional-dependencies"]["dev"])


@pytest.mark.slow
def test_resolves_beside_monailabel(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    probe = subprocess.run([*pip, "download", "--no-deps", "-q", "-d", str(tmp_path / "probe"), "monailabel==0.8.5"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"no package registry answer: {probe.stderr.strip().splitlines()[-1:]}")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", str(report), "torch==2.13.0", "monailabel==0.8.5",
         "pydicom==2.4.5", str(REPO)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text(encoding="utf-8"))["install"]
    }
    assert got["monailabel"] == "0.8.5" and got["monai-gamverify"] and got["torch"].startswith("2.13.0")
    assert got["pydicom"] == "2.4.5" and int(got.get("jsonschema", "3").split(".")[0]) < 4
