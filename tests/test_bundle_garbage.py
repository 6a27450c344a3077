"""K+1 garbage class in the sos_staging bundle (train_garbage.json / inference_garbage.json) and its library helpers.

The library side (widening keeps old logits, RejectGarbaged, RejectionCounter, baselines) is in test_garbage.py; this
file tests what the bundle adds: mixing garbage cohorts from directories, loading a K-class checkpoint into a K+1
network, the per-item decisions CSV, and the two configs end to end on a tiny cohort (16^3, 1 epoch, small_cnn).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine
from monai.networks.nets import UNet
from torch import nn

from monai_gamverify.data.config import exit_on_error
from monai_gamverify.data.datalist import DataError
from monai_gamverify.data.synthetic import make_cohort
from monai_gamverify.kplus1 import (
    RejectGarbaged,
    RejectionCounter,
    init_from_checkpoint,
    mix_garbage,
    mix_garbage_dirs,
    widen_classifier,
)
from monai_gamverify.networks.nets import SmallCNN

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sos_staging"
TINY = {"roi_size": [16, 16, 16], "pixdim": [2.5, 2.5, 2.5], "batch_size": 4, "network_name": "small_cnn"}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("garbage_cohorts")
    make_cohort("sos", n=20, size=24, seed=0, out_dir=root / "sos", progress=False)
    make_cohort("chin", n=12, size=24, seed=0, out_dir=root / "chin", progress=False)
    return {"sos": root / "sos", "chin": root / "chin"}


# ------------------------------------------------------------------ library helpers the bundle uses
def test_mix_garbage_keys_make_items_collatable():
    real = [{"image": "a", "mask": "ma", "id": "a", "label": 1}, {"image": "b", "mask": "mb", "id": "b", "label": 0}]
    garbage = {"chin": [{"image": "c", "mask": "mc", "id": "c", "label": 1}]}
    mixed = mix_garbage(real, garbage, num_classes=5, keys=("image",), shuffle=False)
    assert mixed == [
        {"image": "a", "label": 1, "source": "real"},
        {"image": "b", "label": 0, "source": "real"},
        {"image": "c", "label": 5, "source": "chin"},
    ]
    from monai.data import list_data_collate

    batch = list_data_collate(mixed)  # same fields everywhere -> one batch
    assert batch["label"].tolist() == [1, 0, 5]


def test_mix_garbage_dirs_reads_cohort_and_names_source(cohorts):
    from monai_gamverify.data.datalist import load_datalist

    real = load_datalist(cohorts["sos"] / "datalist.json", "training", num_classes=6, check="exists")
    mixed = mix_garbage_dirs(real, cohorts["chin"], num_classes=5, ratio=0.5, seed=0, check="exists")
    garbage = [d for d in mixed if d["label"] == 5]
    assert len(garbage) == round(0.5 * len(real)) and {d["source"] for d in garbage} == {"chin"}  # cohort.json kind
    assert all(set(d) == {"image", "label", "source"} for d in mixed)
    chin_train = {e["image"] for e in load_datalist(cohorts["chin"] / "datalist.json", "training", check="exists")}
    assert {d["image"] for d in garbage} <= chin_train  # only the garbage cohort's training split
    assert sorted(d["label"] for d in mixed if d["source"] == "real") == sorted(d["label"] for d in real)
    named = mix_garbage_dirs(real, {"g": cohorts["chin"]}, num_classes=5, check="none")
    assert {d["source"] for d in named if d["label"] == 5} == {"g"} and len(named) == len(real) + len(chin_train)


def test_mix_garbage_dirs_bad_input(cohorts, tmp_path):
    real = [{"image": "a.nii.gz", "label": 0}]
    with pytest.raises(DataError, match="garbage directory not found: .*nowhere.*gamverify synth --kind chin"):
        mix_garbage_dirs(real, tmp_path / "nowhere", num_classes=5)
    with pytest.raises(SystemExit, match="ERROR: garbage directory not found"):  # what bundle configs call
        exit_on_error(mix_garbage_dirs, real, tmp_path / "nowhere", num_classes=5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="datalist not found"):
        mix_garbage_dirs(real, tmp_path / "empty", num_classes=5)
    # a real label equal to K collides with the garbage label
    with pytest.raises(DataError, match="collides with the garbage label 5"):
        mix_garbage_dirs([{"image": "x", "label": 5}], cohorts["chin"], num_classes=5, check="none")


def test_init_from_checkpoint_widens_and_keeps_logits(tmp_path):
    torch.manual_seed(0)
    net5 = SmallCNN(3, 1, 5, width=4).eval()
    x = torch.rand(3, 1, 16, 16, 16)
    torch.save(net5.state_dict(), tmp_path / "model.pt")
    torch.save({"model": net5.state_dict()}, tmp_path / "wrapped.pt")
    for name in ("model.pt", "wrapped.pt"):
        net6 = init_from_checkpoint(SmallCNN(3, 1, 6, width=4), tmp_path / name).eval()
        with torch.no_grad():
            out6, out5 = net6(x), net5(x)
        assert out6.shape == (3, 6) and torch.equal(out6[:, :5], out5)  # the 5 stages unchanged, bit-exact
        ref = widen_classifier(net5, init="mean")  # same garbage row as widening the model directly
        assert torch.equal(net6.head.weight, ref.head.weight) and torch.equal(net6.head.bias, ref.head.bias)
    # a K+1 checkpoint loads as is
    torch.save(net6.state_dict(), tmp_path / "six.pt")
    again = init_from_checkpoint(SmallCNN(3, 1, 6, width=4), tmp_path / "six.pt")
    assert torch.equal(again.head.weight, net6.head.weight)


def test_init_from_checkpoint_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="init checkpoint not found"):
        init_from_checkpoint(SmallCNN(3, 1, 6, width=4), tmp_path / "none.pt")
    torch.save(SmallCNN(3, 1, 6, width=4).state_dict(), tmp_path / "six.pt")
    with pytest.raises(ValueError, match="has 6 classes but the model only 5"):
        init_from_checkpoint(SmallCNN(3, 1, 5, width=4), tmp_path / "six.pt")
    torch.save(SmallCNN(3, 1, 5, width=8).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="does not fit SmallCNN"):
        init_from_checkpoint(SmallCNN(3, 1, 6, width=4), tmp_path / "wide.pt")
    # K+1 on a model without a linear head
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        init_from_checkpoint(unet, tmp_path / "unet.pt")


def test_rejection_counter_decisions_csv(tmp_path):
    logits = [torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]), torch.tensor([[0.0, 3.0, 1.0]])]
    post = RejectGarbaged(keys="pred", threshold=0.1)

    def step(engine, b):
        return [post({"pred": p, "image": f"img{b}_{j}"}) for j, p in enumerate(logits[b])]

    counter = RejectionCounter(csv_path=tmp_path / "rej.csv", decisions_csv_path=tmp_path / "all.csv")
    engine = Engine(step)
    counter.attach(engine)
    engine.run([0, 1], max_epochs=1)
    table = pd.read_csv(tmp_path / "all.csv")
    assert table["id"].tolist() == ["img0_0", "img0_1", "img1_0"]
    # independent reference: softmax by hand
    probs = torch.cat(logits).softmax(1).numpy()
    assert np.allclose(table["garbage_prob"], probs[:, 2], atol=1e-6)
    assert table["rejected"].tolist() == [False, True, True]  # argmax garbage, then p(garbage) = 0.11 >= 0.1
    assert table["best_real_class"].tolist() == [0, 0, 1]
    assert np.allclose(table["best_real_prob"], probs[:, :2].max(1), atol=1e-6)
    assert pd.read_csv(tmp_path / "rej.csv")["id"].tolist() == ["img0_1", "img1_0"]
    with pytest.raises(ValueError, match="output_transform"):
        RejectionCounter(output_transform=lambda o: o, decisions_csv_path=tmp_path / "x.csv")


# ------------------------------------------------------------------ the bundle configs end to end
def _run(root: Path, configs: list[str], **overrides) -> None:
    from monai.bundle import run

    run(
        config_file=[str(root / "configs" / c) for c in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **TINY,
        **overrides,
    )


def test_bundle_train_and_infer_with_garbage(cohorts, tmp_path, one_thread):
    root = tmp_path / "sos_staging"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    for name in ("train_garbage", "inference_garbage"):
        json.loads((root / "configs" / f"{name}.json").read_text())
    # a "trained" 5-class checkpoint to widen (initialisation path of the config)
    torch.manual_seed(0)
    net5 = SmallCNN(3, 1, 5)
    torch.save(net5.state_dict(), root / "models" / "model.pt")
    _run(
        root,
        ["train.json", "train_garbage.json"],
        dataset_dir=str(cohorts["sos"]),
        garbage_dir=str(cohorts["chin"]),
        garbage_ratio=0.5,
        init_checkpoint=str(root / "models" / "model.pt"),
        num_epochs=1,
        val_interval=1,
        cam_interval=100,
    )
    state = torch.load(root / "models" / "model_garbage.pt", weights_only=True)
    assert state["head.weight"].shape[0] == 6  # a 6-class model, saved beside the untouched 5-class one
    assert torch.load(root / "models" / "model.pt", weights_only=True)["head.weight"].shape[0] == 5

    inputs = (
        sorted((cohorts["chin"] / "images").glob("*.nii.gz"))[:3]
        + sorted((cohorts["sos"] / "images").glob("*.nii.gz"))[:3]
    )
    _run(
        root,
        ["inference.json", "inference_garbage.json"],
        dataset_dir=str(cohorts["sos"]),
        input_files=[str(p) for p in inputs],
        garbage_threshold=0.0,  # every image rejected: the flags must reach the counter and the CSVs
    )
    eval_dir = root / "eval"
    preds = pd.read_csv(eval_dir / "predictions_garbage.csv")
    assert len(preds) == 6 and "prob_garbage" in preds.columns
    probs = preds[[c for c in preds.columns if c.startswith("prob_")]].to_numpy()
    assert probs.shape[1] == 6 and np.allclose(probs.sum(1), 1, atol=1e-5)
    decisions = pd.read_csv(eval_dir / "rejections.csv")
    assert [Path(i).name for i in decisions["id"]] == [p.name for p in inputs]
    assert decisions["rejected"].all()
    assert np.allclose(decisions["garbage_prob"], preds["prob_garbage"], atol=1e-6)
    real = preds[[f"prob_{n}" for n in ("stage1_open", "stage2", "stage3", "stage4", "stage5_fused")]].to_numpy()
    assert decisions["best_real_class"].tolist() == real.argmax(1).tolist()
    assert len(pd.read_csv(eval_dir / "rejected.csv")) == 6

    # default threshold (argmax only): the decisions follow the 6-way argmax of the written probabilities
    _run(root, ["inference.json", "inference_garbage.json"], input_files=[str(p) for p in inputs])
    preds = pd.read_csv(eval_dir / "predictions_garbage.csv")
    decisions = pd.read_csv(eval_dir / "rejections.csv")
    assert decisions["rejected"].tolist() == (preds["prediction"] == 5).tolist()
    assert len(pd.read_csv(eval_dir / "rejected.csv")) == int((preds["prediction"] == 5).sum())


def test_bundle_garbage_label_collision_stops_run(cohorts, tmp_path):
    data = tmp_path / "sos"
    shutil.copytree(cohorts["sos"], data)
    dl = json.loads((data / "datalist.json").read_text())
    dl["training"][0]["label"] = 5  # a real item labelled with the garbage index
    (data / "datalist.json").write_text(json.dumps(dl))
    root = tmp_path / "b"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    with pytest.raises(SystemExit, match="collides with the garbage label 5"):
        _run(
            root,
            ["train.json", "train_garbage.json"],
            dataset_dir=str(data),
            garbage_dir=str(cohorts["chin"]),
            num_epochs=1,
            check_data="exists",
        )


def test_bundle_missing_garbage_dir_stops_run(cohorts, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    with pytest.raises(SystemExit, match="garbage directory not found"):
        _run(
            root,
            ["train.json", "train_garbage.json"],
            dataset_dir=str(cohorts["sos"]),
            garbage_dir=str(tmp_path / "nochin"),
            num_epochs=1,
            check_data="exists",
        )


def test_widened_bundle_network_keeps_stage_logits():
    """The bundle's own network definition (small_cnn) widened: old logits unchanged (cf. test_garbage.py)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json")])
    parser.update({"network_name": "small_cnn", "bundle_root": str(BUNDLE)})
    net5 = parser.get_parsed_content("network_def").eval()
    x = torch.rand(2, 1, 16, 16, 16)
    net6 = widen_classifier(net5).eval()
    with torch.no_grad():
        assert torch.equal(net6(x)[:, :5], net5(x))
    assert isinstance(net6.head, nn.Linear) and net6.head.out_features == 6
