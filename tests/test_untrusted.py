"""Untrusted files: checkpoints and verifiers never run code, bad images and datalists fail naming the file."""

from __future__ import annotations

import gzip
import json
import os
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from monai_gamverify.bundle import load_checkpoint
from monai_gamverify.data.config import exit_on_error
from monai_gamverify.data.datalist import DataError, load_datalist
from monai_gamverify.io import load_image
from monai_gamverify.metrics.similarity import DEFAULT_METRICS
from monai_gamverify.verification.verifier import SuitabilityVerifier


class Payload:
    """An arbitrary class instance: unpickling it needs this module, i.e. code outside torch."""

    def __init__(self) -> None:
        self.value = 1


class Exploit:
    """Unpickling this calls ``os.mkdir(marker)``: the classic pickle attack."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


# ----------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "make",
    [
        lambda sd, m: {**sd, "extra": Payload()},  # a class instance next to the weights
        lambda sd, m: {"model": sd, "hook": _net},  # a (module-level) function
        lambda sd, m: {"model": sd, "meta": Exploit(m)},  # code that runs on unpickling
        lambda sd, m: Exploit(m),  # nothing but code
        lambda sd, m: {"model": sd, "cls": Payload},  # a class object
    ],
    ids=["instance", "function", "reduce_exploit", "only_exploit", "class"],
)
def test_checkpoint_with_code_is_refused(tmp_path, make):
    net = _net()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(make(net.state_dict(), str(marker)), path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot load checkpoint .*evil\.pt safely \(weights_only=True\)"):
        load_checkpoint(_net(), path)
    assert not marker.exists(), "unpickling ran code"
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "model_key"])
def test_checkpoint_plain_state_dict_is_accepted(tmp_path, wrap):
    src = _net()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)  # differs from a fresh network
    path = tmp_path / "ok.pt"
    torch.save({"model": src.state_dict(), "epoch": 3} if wrap else src.state_dict(), path)
    dst = load_checkpoint(_net(), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize(
    "write,match",
    [
        (lambda p, sd: p.write_text("just text\n"), r"cannot load checkpoint .*bad\.pt"),
        (lambda p, sd: (torch.save(sd, p), p.write_bytes(p.read_bytes()[:60])), r"cannot load checkpoint .*bad\.pt"),
        (lambda p, sd: torch.save([1, 2], p), r"checkpoint .*bad\.pt does not hold a state dict"),
        (lambda p, sd: torch.save({"0.weight": torch.zeros(5)}, p), r"checkpoint .*bad\.pt does not fit the network"),
    ],
    ids=["text", "truncated", "not_a_dict", "wrong_shapes"],
)
def test_checkpoint_bad_files(tmp_path, write, match):
    path = tmp_path / "bad.pt"
    write(path, _net().state_dict())
    with pytest.raises(ValueError, match=match):
        load_checkpoint(_net(), path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(_net(), tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------------- verifiers
def _fitted_verifier_file(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    table = {f: rng.random(n) for f in DEFAULT_METRICS}
    import pandas as pd

    label = np.arange(n) % 2
    df = pd.DataFrame({"sample_id": np.arange(n), "subject_id": np.arange(n), "model": "m", "label": label, **table})
    df["iou"] += label  # something to learn
    ver = SuitabilityVerifier(n_estimators=5, random_state=0).fit(df)
    return ver, ver.save(tmp_path / "v.skops"), df


def _schema(path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    return json.loads(members["schema.json"]), members


def _write(path, schema, members) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for n, content in members.items():
            z.writestr(n, json.dumps(schema) if n == "schema.json" else content)


def test_tampered_verifier_with_added_type_is_refused(tmp_path):
    import skops.io as sio

    ver, path, df = _fitted_verifier_file(tmp_path)
    np.testing.assert_array_equal(SuitabilityVerifier.load(path).predict_proba(df), ver.predict_proba(df))
    # splice a node of an unexpected type (a callable, os.system) into the genuine file's top-level dict
    sio.dump({"hook": os.system}, tmp_path / "donor.skops")
    donor, _ = _schema(tmp_path / "donor.skops")
    schema, members = _schema(path)
    schema["content"]["hook"] = donor["content"]["hook"]
    schema["key_types"]["content"].append(donor["key_types"]["content"][0])
    bad = tmp_path / "tampered.skops"
    _write(bad, schema, members)
    assert "posix.system" in sio.get_untrusted_types(file=bad) or "nt.system" in sio.get_untrusted_types(file=bad)
    with pytest.raises(ValueError, match=r"refusing to load .*tampered\.skops: .*unexpected type.*system"):
        SuitabilityVerifier.load(bad)


@pytest.mark.parametrize("extra", [os.system, Payload, np.random.default_rng], ids=["function", "class", "factory"])
def test_verifier_file_written_with_foreign_objects_is_refused(tmp_path, extra):
    import skops.io as sio

    ver, path, _ = _fitted_verifier_file(tmp_path)
    payload = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    payload["extra"] = extra  # an attacker with skops can write any object next to the genuine forest
    bad = tmp_path / "foreign.skops"
    sio.dump(payload, bad)
    with pytest.raises(ValueError, match=r"refusing to load .*foreign\.skops: it contains unexpected type"):
        SuitabilityVerifier.load(bad)


# ---------------------------------------------------------------------------------------------------------- images
def _nifti(tmp_path, name="img.nii.gz", shape=(24, 24, 24)):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4)), str(path))
    return path


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _text(path):
    path.write_text("patient,label\n1,0\n")


def _garbage_gz(path):
    path.write_bytes(gzip.compress(b"\x00" * 400))  # valid gzip, not a NIfTI header


@pytest.mark.parametrize(
    "name,damage",
    [
        ("vol.nii.gz", _truncate),
        ("vol.nii.gz", lambda p: _truncate(p, 0.02)),  # cut inside the header
        ("vol.nii", _truncate),
        ("notes.nii.gz", _text),
        ("notes.txt", _text),
        ("zeros.nii.gz", _garbage_gz),
        ("empty.nii.gz", lambda p: p.write_bytes(b"")),
    ],
    ids=["truncated_gz", "truncated_header", "truncated_nii", "text_as_nifti", "text_file", "gz_no_header", "empty"],
)
def test_load_image_bad_file_names_it(tmp_path, name, damage):
    if name.endswith((".nii", ".nii.gz")):
        path = _nifti(tmp_path, name)
        assert load_image(path).shape == (1, 24, 24, 24)  # readable before the damage
    else:
        path = tmp_path / name
    damage(path)
    with pytest.raises(ValueError, match=rf"cannot read image .*{name.replace('.', '[.]')}"):
        load_image(path)


# -------------------------------------------------------------------------------------------------------- datalists
@pytest.mark.parametrize(
    "content,key,match",
    [
        (b'{"training": [{"image": "a.nii.gz", "label": 0},', "training", "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "training", "is not valid JSON"),
        (b"", "training", "is not valid JSON"),
        (b'{"training": [{"image": "a.nii.gz", "label": 0}]}', "validation", "has no entries under 'validation'"),
        (b'{"training": []}', "training", "has no entries under 'training'"),
        (b'[{"image": "a.nii.gz"}]', "training", "must be a JSON object"),
        (b'{"training": {"image": "a.nii.gz"}}', "training", "'training' must be a list"),
        (b'{"training": [{"label": 0}]}', "training", r"training\[0\]: each entry needs an 'image' path"),
        (b'{"training": [{"image": "a.nii.gz"}]}', "training", r"training\[0\] .*a.nii.gz.*: no 'label'"),
        (b'{"training": [{"image": "a.nii.gz", "label": "0"}]}', "training", "label '0' is not a class index"),
    ],
    ids=[
        "truncated_json",
        "binary",
        "empty_file",
        "missing_key",
        "empty_list",
        "not_an_object",
        "not_a_list",
        "no_image",
        "no_label",
        "label_string",
    ],
)
def test_bad_datalist_names_the_file(tmp_path, content, key, match):
    path = tmp_path / "my_datalist.json"
    path.write_bytes(content)
    kwargs = {"key": key, "check": "none", "num_classes": 2}
    with pytest.raises(DataError, match=rf"datalist .*my_datalist\.json.*{match}"):
        load_datalist(path, **kwargs)
    with pytest.raises(SystemExit, match=rf"^ERROR: datalist .*my_datalist\.json.*{match}"):
        exit_on_error(load_datalist, path, **kwargs)


def test_datalist_with_a_truncated_image_names_the_image(tmp_path):
    image = _nifti(tmp_path, "case_7.nii.gz")
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": image.name, "label": 1}]}))
    assert load_datalist(path, num_classes=2)[0]["image"] == str(image.resolve())
    _truncate(image)
    with pytest.raises(DataError, match=r"cannot use image .*case_7\.nii\.gz"):
        load_datalist(path, num_classes=2)


def test_the_exploit_is_real(tmp_path):
    """Guard for the refusal test above: a plain ``torch.load`` of the same file does run the attacker's code."""
    marker = tmp_path / "pwned"
    torch.save({"model": _net().state_dict(), "meta": Exploit(str(marker))}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.is_dir()


def test_check_image_lets_out_of_memory_through(tmp_path, monkeypatch):
    # a reader error becomes a DataError naming the file; running out of memory is not a bad file
    import monai_gamverify.data.datalist as dl

    image = _nifti(tmp_path, "case_1.nii.gz")

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dl, "load_image", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        dl.check_image(image)
    monkeypatch.setattr(dl, "load_image", lambda *a, **k: (_ for _ in ()).throw(OSError("truncated")))
    with pytest.raises(DataError, match="case_1.nii.gz"):
        dl.check_image(image)
