from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.transforms import Activationsd, Compose, Spacingd, SpatialPadd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from monai_gamverify.handlers import (
    Accuracy,
    CAMImageHandler,
    CAMWriter,
    ClassificationMetric,
    LearningRateLogger,
    MacroF1,
    OutputNamer,
    PredictionCSVWriter,
    batch_items,
    cam_overlay_rgb,
)
from monai_gamverify.networks.nets import convnext_attn_pico
from monai_gamverify.visualize.registry import make_cam

CASES = [(2, (16, 16)), (3, (16, 16, 16))]


def _net(dims):
    torch.manual_seed(0)
    return convnext_attn_pico(spatial_dims=dims, in_channels=1, out_channels=3, widths=(4, 8, 8))


def _items(shape, n=4, tag="img"):
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        affine = torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0]))
        affine[:3, 3] = torch.tensor([-10.0 + i, 2.0, 3.0])
        img = MetaTensor(
            torch.rand(1, *shape, generator=g), affine=affine, meta={"filename_or_obj": f"/d/{tag}{i}.nii.gz"}
        )
        items.append({"image": img, "label": i % 3})
    return items


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _trainer(net, shape, handlers):
    loader = DataLoader(Dataset(_items(shape)), batch_size=2, shuffle=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
    )


# ------------------------------------------------------------------ metrics
@pytest.mark.parametrize("name, ref", [("accuracy", accuracy_score), ("f1", None), ("balanced_accuracy", None)])
def test_classification_metric_matches_sklearn(name, ref):
    rng = np.random.default_rng(0)
    for k in (2, 5):
        logits = torch.as_tensor(rng.normal(size=(37, k)), dtype=torch.float32)
        y = torch.as_tensor(rng.integers(0, k, size=37))
        m = ClassificationMetric(name)
        m(list(logits[:20]), list(y[:20]))  # decollated items, as in workflows
        m(logits[20:], torch.nn.functional.one_hot(y[20:], k))  # batched, one-hot labels
        pred = logits.argmax(1).numpy()
        if name == "accuracy":
            expected = accuracy_score(y.numpy(), pred)
        elif name == "f1":
            expected = f1_score(y.numpy(), pred, average="macro")
        else:
            expected = balanced_accuracy_score(y.numpy(), pred)
        assert float(m.aggregate()) == pytest.approx(expected, abs=1e-6)


def test_classification_metric_errors():
    with pytest.raises(ValueError, match="metric_name"):
        ClassificationMetric("auc")
    m = ClassificationMetric("accuracy")
    with pytest.raises(ValueError, match="no predictions"):
        m.aggregate()
    with pytest.raises(ValueError, match="labels"):
        m(torch.rand(3, 2), torch.tensor([0, 1]))


def test_accuracy_and_f1_handlers_in_evaluator():
    net = _net(2).eval()
    items = _items((16, 16), n=6)
    ev = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items), batch_size=4),
        network=net,
        postprocessing=Activationsd("pred", softmax=True),
        key_val_metric={"acc": Accuracy()},
        additional_metrics={"f1": MacroF1()},
    )
    ev.run()
    with torch.no_grad():
        pred = net(torch.stack([it["image"].as_tensor() for it in items])).argmax(1).numpy()
    y = np.array([it["label"] for it in items])
    assert ev.state.metrics["acc"] == pytest.approx(accuracy_score(y, pred))
    assert ev.state.metrics["f1"] == pytest.approx(f1_score(y, pred, average="macro"))


# ------------------------------------------------------------------ overlays and CAM images
@pytest.mark.parametrize("dims, shape", CASES)
def test_cam_overlay_rgb(dims, shape):
    img = torch.rand(1, *shape)
    cam = torch.zeros(1, *shape)
    cam[(0,) + (5,) * dims] = 1.0
    rgb = cam_overlay_rgb(img, cam)
    assert rgb.shape[2] == 3 and rgb.dtype == np.float32
    assert rgb.shape == ((shape[0], shape[1], 3) if dims == 2 else (16, 48, 3))
    assert rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(ValueError, match="differs"):
        cam_overlay_rgb(img, torch.rand(1, *[s + 1 for s in shape]))


@pytest.mark.slow
@pytest.mark.parametrize("dims, shape", CASES)
def test_cam_image_handler_logs_and_does_not_disturb_training(tmp_path, dims, shape):
    # reference run without the handler
    torch.manual_seed(0)
    net_a = _net(dims)
    _trainer(net_a, shape, []).run()
    # same run with the CAM handler and the LR logger
    net_b = _net(dims)
    handler = CAMImageHandler("stages.2", log_dir=tmp_path / "tb", interval=1, max_images=2, tag="cam")
    lr = LearningRateLogger(log_dir=tmp_path / "tb")
    torch.manual_seed(0)
    trainer = _trainer(net_b, shape, [handler, lr])
    trainer.run()
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    assert net_b.training and all(p.requires_grad for p in net_b.parameters())
    acc = _events(tmp_path / "tb")
    assert sorted(acc.Tags()["images"]) == ["cam/0", "cam/1"]
    assert [e.step for e in acc.Images("cam/0")] == [1, 2]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.1, 0.1])


def test_cam_image_handler_needs_network_and_layer():
    with pytest.raises(ValueError, match="unknown layer"):
        CAMImageHandler("nope", network=_net(2))
    with pytest.raises(ValueError, match="interval"):
        CAMImageHandler("stages.2", interval=0)


def test_batch_items_collated_and_decollated():
    batch = {"image": torch.zeros(3, 1, 4, 4), "label": torch.tensor([0, 1, 2]), "name": ["a", "b", "c"]}
    items = batch_items(batch)
    assert len(items) == 3 and items[1]["name"] == "b" and int(items[2]["label"]) == 2
    assert batch_items([{"a": 1}, 3]) == [{"a": 1}]
    assert batch_items(None) == []


# ------------------------------------------------------------------ CAM NIfTI and CSV writers
@pytest.mark.parametrize("dims, shape", [CASES[0], pytest.param(*CASES[1], marks=pytest.mark.slow)])
def test_cam_writer_and_prediction_csv(tmp_path, dims, shape):
    net = _net(dims).eval()
    items = _items(shape, n=3, tag=f"case{dims}d_")
    writer = CAMWriter("stages.2", tmp_path / "cams", overlay=True)
    csv = PredictionCSVWriter(tmp_path, class_names=["a", "b", "c"])
    ev = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items), batch_size=2),
        network=net,
        postprocessing=Activationsd("pred", softmax=True),
        val_handlers=[writer, csv],
    )
    ev.run()
    assert len(writer.written) == 3
    for i, it in enumerate(items):
        path = tmp_path / "cams" / f"case{dims}d_{i}_cam.nii.gz"
        assert path.is_file() and (tmp_path / "cams" / f"case{dims}d_{i}_cam.png").is_file()
        nii = nib.load(str(path))
        assert nii.shape == shape
        ref = it["image"].affine.numpy()
        if dims == 3:
            assert np.allclose(nii.affine, ref)
        data = nii.get_fdata()
        assert data.min() >= 0 and data.max() == pytest.approx(1.0)
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert list(table["id"]) == [f"case{dims}d_{i}" for i in range(3)]
    assert list(table["label"]) == [0, 1, 2]
    probs = table[["prob_a", "prob_b", "prob_c"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert list(table["prediction"]) == list(probs.argmax(1))
    assert set(table["prediction_name"]) <= {"a", "b", "c"}


def _written_inverse(tmp_path, pre, shape):
    """(map written by CAMWriter on the input grid, its affine, the CAM on the preprocessed grid)."""
    img = MetaTensor(torch.rand(1, *shape), affine=torch.eye(4), meta={"filename_or_obj": "/d/orig.nii.gz"})
    item = pre({"image": img, "label": 0})
    assert tuple(item["image"].shape[1:]) != shape
    net = _net(3).eval()
    writer = CAMWriter("stages.2", tmp_path, invert_transform=pre, postfix="map")
    ev = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset([item]), batch_size=1),
        network=net,
        val_handlers=[writer],
    )
    ev.run()
    cam = make_cam(net, "stages.2", "gradcam")(item["image"].as_tensor()[None])[0, 0].numpy()
    nii = nib.load(str(tmp_path / "orig_map.nii.gz"))
    return nii.get_fdata(), nii.affine, cam


def test_cam_writer_inverts_padding_exactly(tmp_path):
    # analytic inverse: symmetric zero padding 12x14x16 -> 20^3 is undone by cropping [4:16, 3:17, 2:18]
    data, affine, cam = _written_inverse(tmp_path, Compose([SpatialPadd("image", (20, 20, 20))]), (12, 14, 16))
    assert data.shape == (12, 14, 16)
    assert np.allclose(affine, np.eye(4), atol=1e-5)
    assert np.allclose(data, cam[4:16, 3:17, 2:18], atol=1e-6)
    assert data.max() > 0.1  # not an all-zero map that would match anything


def test_cam_writer_inverts_resampling_on_grid_points(tmp_path):
    # 1 mm -> 0.5 mm: input voxel i lies on preprocessed voxel 2i, where the (bilinear) inverse samples exactly
    shape = (12, 14, 16)
    data, affine, cam = _written_inverse(tmp_path, Compose([Spacingd("image", pixdim=(0.5, 0.5, 0.5))]), shape)
    assert data.shape == shape
    assert np.allclose(affine, np.eye(4), atol=1e-5)
    assert np.allclose(data, cam[::2, ::2, ::2][: shape[0], : shape[1], : shape[2]], atol=1e-5)
    assert data.max() > 0.1


def _same_stem_items(root, shape=(16, 16)):
    g = torch.Generator().manual_seed(3)
    return [
        {
            "image": MetaTensor(
                torch.rand(1, *shape, generator=g),
                meta={"filename_or_obj": str(root / f"case_{i:05d}" / "imaging.nii.gz")},
            ),
            "label": i % 3,
        }
        for i in range(3)
    ]


@pytest.mark.parametrize("root", [False, True])
def test_writers_give_same_stem_images_distinct_names(tmp_path, root):
    # case_00000/imaging.nii.gz, case_00001/imaging.nii.gz, ... once all went to one imaging_cam.nii.gz
    items = _same_stem_items(tmp_path / "data")
    writer = CAMWriter("stages.2", tmp_path / "cams", data_root_dir=tmp_path / "data" if root else None)
    csv = PredictionCSVWriter(tmp_path, data_root_dir=tmp_path / "data" if root else None)
    SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items), batch_size=2),
        network=_net(2).eval(),
        postprocessing=Activationsd("pred", softmax=True),
        val_handlers=[writer, csv],
    ).run()
    files = sorted((tmp_path / "cams").rglob("*.nii.gz"))
    assert len(files) == 3 and len(set(writer.written)) == 3 and sorted(writer.written) == files
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert table["id"].is_unique and len(table) == 3
    if root:
        assert [f.relative_to(tmp_path / "cams").as_posix() for f in files] == [
            f"case_{i:05d}/imaging_cam.nii.gz" for i in range(3)
        ]
        assert list(table["id"]) == [f"case_{i:05d}/imaging" for i in range(3)]
    # each file holds its own image's map
    net = _net(2).eval()
    for it, path in zip(items, writer.written):
        expected = make_cam(net, "stages.2", "gradcam")(it["image"].as_tensor()[None])[0, 0].numpy()
        assert np.allclose(np.squeeze(nib.load(str(path)).get_fdata()), expected, atol=1e-5)


def test_output_namer_rules(tmp_path):
    namer = OutputNamer()
    assert namer("/a/x/img.nii.gz") == "img" and namer("/a/x/img.nii.gz") == "img"  # same path, same name
    other = namer("/a/y/img.nii.gz")
    assert other.startswith("img_") and other != "img"
    assert OutputNamer(always_suffix=True)("/a/y/img.nii.gz") == other  # multi-process: always the hash
    rooted = OutputNamer(tmp_path)
    assert rooted(tmp_path / "p" / "q.nii") == "p/q"
    with pytest.raises(ValueError, match="not under data_root_dir"):
        rooted("/elsewhere/q.nii")


def _ddp_writers(rank, world, store, out, root):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        items = _same_stem_items(Path(root))[rank::world] + ([] if rank else _same_stem_items(Path(root) / "b")[:1])
        writer = CAMWriter("stages.2", Path(out) / "cams")
        csv = PredictionCSVWriter(out)
        SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=DataLoader(Dataset(items), batch_size=2),
            network=_net(2).eval(),
            postprocessing=Activationsd("pred", softmax=True),
            val_handlers=[writer, csv],
        ).run()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_prediction_csv_gathers_all_ranks_and_cam_names_do_not_collide(tmp_path):
    # two gloo ranks with unequal item counts (rank 0: 3 items, rank 1: 1): one CSV written by rank 0 with all rows
    import torch.multiprocessing as mp

    root = tmp_path / "data"
    mp.spawn(_ddp_writers, args=(2, str(tmp_path / "store"), str(tmp_path), str(root)), nprocs=2, join=True)
    table = pd.read_csv(tmp_path / "predictions.csv")
    images = sorted(table["image"])
    expected = sorted(
        [str(root / f"case_{i:05d}" / "imaging.nii.gz") for i in range(3)]
        + [str(root / "b" / "case_00000" / "imaging.nii.gz")]
    )
    assert images == expected and table["id"].is_unique
    assert len(list((tmp_path / "cams").glob("*.nii.gz"))) == 4


def test_writers_need_a_network(tmp_path):
    class _Engine:
        class state:  # noqa: N801
            batch = [{"image": torch.zeros(1, 8, 8)}]
            iteration = 1
            epoch = 1

    with pytest.raises(ValueError, match="needs a network"):
        CAMWriter("stages.2", tmp_path)(_Engine())
    with pytest.raises(ValueError, match="needs a network"):
        CAMImageHandler("stages.2")(_Engine())
    assert not any(Path(tmp_path).iterdir())
