from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.networks.nets import DenseNet121, UNet, resnet10
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from monai_gamverify.kplus1 import (
    RejectGarbaged,
    RejectionCounter,
    class_weights,
    find_classifier_head,
    mix_garbage,
    widen_classifier,
)
from monai_gamverify.metrics.ood import (
    MahalanobisDetector,
    energy_score,
    extract_features,
    kplus1_score,
    msp_score,
    ood_metrics,
)
from monai_gamverify.networks.nets import convnext_attn_pico, convnext_pico

K = 5


def plain_classifier(dims):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, K))


# (name, builder, input shape, expected head name): MONAI, our ConvNeXt and plain torch, 2D and 3D in one list
MODELS = [
    ("resnet10-2d", lambda: resnet10(spatial_dims=2, n_input_channels=1, num_classes=K, widen_factor=0.25), 2, "fc"),
    ("resnet10-3d", lambda: resnet10(spatial_dims=3, n_input_channels=1, num_classes=K, widen_factor=0.25), 3, "fc"),
    (
        "densenet121-2d",
        lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=K, init_features=8, growth_rate=4),
        2,
        "class_layers.out",
    ),
    ("convnext-2d", lambda: convnext_pico(2, 1, K), 2, "head"),
    ("convnext-attn-3d", lambda: convnext_attn_pico(3, 1, K), 3, "head"),
    ("sequential-2d", lambda: plain_classifier(2), 2, "5"),
]


def build(builder, dims):
    torch.manual_seed(0)
    net = builder()
    x = torch.randn(2, 1, *([16] * dims)) if dims == 3 else torch.randn(2, 1, 32, 32)
    net.eval()(x)  # materialise lazy layers
    return net, x


# every model with the default init, the other inits on two of them (DenseNet is slow on 2 cores)
WIDEN_CASES = [(*m, "mean") for m in MODELS] + [(*m, init) for m in MODELS[::3] for init in ("zeros", "random")]
WIDEN_PARAMS = [
    pytest.param(*c, id=f"{c[0]}-{c[-1]}", marks=[pytest.mark.slow] if c[0].startswith("densenet") else [])
    for c in WIDEN_CASES
]


@pytest.mark.parametrize("name,builder,dims,head,init", WIDEN_PARAMS)
def test_widen_keeps_old_logits_exactly(name, builder, dims, head, init):
    net, x = build(builder, dims)
    assert find_classifier_head(net)[0] == head
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        old = net(x)
        wide = widen_classifier(net, init=init, seed=1)
        new = wide.eval()(x)
    assert new.shape == (2, K + 1)
    assert torch.equal(new[:, :K], old)  # bit-exact
    # the original model is an untouched, separate object
    assert wide is not net and net(x).shape == (2, K)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    w_old, lin = find_classifier_head(net)[1], find_classifier_head(wide)[1]
    assert lin.out_features == K + 1 and find_classifier_head(wide)[0] == head
    if init == "mean":
        torch.testing.assert_close(lin.weight[K], w_old.weight.mean(0))
        torch.testing.assert_close(new[:, K], old.mean(1), rtol=1e-5, atol=1e-5)
    elif init == "zeros":
        assert not lin.weight[K].any() and not lin.bias[K].any()
    else:
        again = find_classifier_head(widen_classifier(net, init="random", seed=1))[1]
        other = find_classifier_head(widen_classifier(net, init="random", seed=2))[1]
        assert torch.equal(again.weight, lin.weight) and not torch.equal(other.weight, lin.weight)
        bound = 1 / np.sqrt(lin.in_features)
        assert float(lin.weight[K].detach().abs().max()) <= bound


def test_widen_inplace_by_name_and_trainable():
    net = convnext_pico(2, 1, K)
    wide = widen_classifier(net, num_new=2, layer_name="head", inplace=True)
    assert wide is net and net.head.out_features == K + 2 and net.out_channels == K + 2
    assert net.head.weight.requires_grad
    loss = nn.functional.cross_entropy(net(torch.randn(2, 1, 32, 32)), torch.tensor([K, K + 1]))
    loss.backward()
    assert net.head.weight.grad[K:].abs().sum() > 0


@pytest.mark.parametrize(
    "model,kwargs,match",
    [
        (UNet(2, 1, 2, channels=(4, 8), strides=(2,)), {}, "no nn.Linear"),
        (nn.Sequential(nn.Conv2d(1, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), {}, "no nn.Linear"),
        (convnext_pico(2, 1, K), {"layer_name": "norm"}, "not an nn.Linear"),
        (convnext_pico(2, 1, K), {"layer_name": "hed"}, "no layer named"),
        (convnext_pico(2, 1, K), {"init": "ones"}, "init"),
        (convnext_pico(2, 1, K), {"num_new": 0}, "num_new"),
    ],
)
def test_widen_bad_input(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        widen_classifier(model, **kwargs)


# ---------------------------------------------------------------------------------------------------- data helpers
def real_list(n=20):
    return [{"image": f"real{i}.nii.gz", "label": i % K} for i in range(n)]


def test_mix_garbage_ratio_sources_and_seed():
    data = real_list(20)
    chin = [f"chin{i}.nii.gz" for i in range(3)]
    cvm = [{"image": f"cvm{i}.nii.gz", "label": 2} for i in range(10)]
    mixed = mix_garbage(data, {"chin": chin, "cvm": cvm}, num_classes=K, ratio=0.5, seed=7)
    assert len(mixed) == 30
    garbage = [d for d in mixed if d["label"] == K]
    assert len(garbage) == 10 and {d["source"] for d in garbage} == {"chin", "cvm"}
    chin_items = [d["image"] for d in garbage if d["source"] == "chin"]
    assert len(chin_items) == 5 and set(chin_items) == set(chin)  # small source repeated, every item used
    assert all(d["source_label"] == 2 for d in garbage if d["source"] == "cvm")
    assert sorted(d["image"] for d in mixed if d["source"] == "real") == sorted(d["image"] for d in data)
    assert all("source" not in d for d in data)  # input untouched
    assert mix_garbage(data, {"chin": chin, "cvm": cvm}, K, ratio=0.5, seed=7) == mixed
    assert mix_garbage(data, {"chin": chin, "cvm": cvm}, K, ratio=0.5, seed=8) != mixed
    everything = mix_garbage(data, {"chin": chin, "cvm": cvm}, K, shuffle=False)
    assert len(everything) == 33 and everything[:20] == [{**d, "source": "real"} for d in data]


@pytest.mark.parametrize(
    "data,sources,kwargs,match",
    [
        ([{"image": "a", "label": K}], {"chin": ["c"]}, {}, "collides with the garbage label"),
        ([{"image": "a", "label": torch.tensor(K)}], {"chin": ["c"]}, {}, "collides"),
        ([{"image": "a", "label": K + 3}], {"chin": ["c"]}, {}, "outside"),
        ([{"image": "a"}], {"chin": ["c"]}, {}, "'label' field"),
        ([{"image": "a", "label": 0.5}], {"chin": ["c"]}, {}, "integer"),
        ([], {"chin": ["c"]}, {}, "empty"),
        ([{"image": "a", "label": 0}], {}, {}, "non-empty"),
        ([{"image": "a", "label": 0}], {"chin": []}, {}, "empty"),
        ([{"image": "a", "label": 0}], {"chin": ["c"]}, {"ratio": -1}, "ratio"),
    ],
)
def test_mix_garbage_bad_input(data, sources, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mix_garbage(data, sources, num_classes=K, **kwargs)


def test_class_weights_match_sklearn():
    labels = np.random.default_rng(0).integers(0, K + 1, size=50)
    expected = compute_class_weight("balanced", classes=np.arange(K + 1), y=labels)
    got = class_weights(torch.as_tensor(labels), K + 1)
    assert got.dtype == torch.float32 and got.shape == (K + 1,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    nn.CrossEntropyLoss(weight=got)(torch.randn(4, K + 1), torch.tensor([0, 1, 2, K]))
    with pytest.raises(ValueError, match="no samples"):
        class_weights([0, 0, 1], 3)
    with pytest.raises(ValueError, match="0..2"):
        class_weights([0, 1, 2, 3], 3)


# ---------------------------------------------------------------------------------------------------- rejection
def reference_reject(logits, threshold=None):
    p = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    g = p.shape[-1] - 1
    best = p[..., :g].argmax(-1)
    rejected = (p.argmax(-1) == g) | ((p[..., g] >= threshold) if threshold is not None else False)
    return rejected, p[..., g], best, np.take_along_axis(p[..., :g], best[..., None], -1)[..., 0]


@pytest.mark.parametrize("shape", [(K + 1,), (7, K + 1)])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_reject_garbaged_single_and_batch(shape, threshold):
    logits = torch.randn(shape) * 2
    if len(shape) == 2:
        logits[0, K] = 10.0  # surely garbage
        logits[1, K] = -10.0  # surely real
    out = RejectGarbaged(keys="pred", threshold=threshold)({"pred": logits, "image": "x"})
    rejected, gp, best, best_p = reference_reject(logits.numpy(), threshold)
    assert out["rejected"].dtype == torch.bool and out["rejected"].shape == shape[:-1]
    np.testing.assert_array_equal(out["rejected"].numpy(), rejected)
    np.testing.assert_allclose(out["garbage_prob"].numpy(), gp, rtol=1e-5)
    np.testing.assert_array_equal(out["best_real_class"].numpy(), best)
    np.testing.assert_allclose(out["best_real_prob"].numpy(), best_p, rtol=1e-5)
    assert out["image"] == "x" and torch.equal(out["pred"], logits)
    if len(shape) == 2:
        assert bool(out["rejected"][0]) and not bool(out["rejected"][1])


def test_reject_garbaged_probabilities_index_and_keys():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    out = RejectGarbaged(keys="pred", garbage_index=0, logits=False)({"pred": probs})
    assert out["rejected"].tolist() == [True, False]
    assert out["best_real_class"].tolist() == [1, 1]
    torch.testing.assert_close(out["garbage_prob"], probs[:, 0])
    two = RejectGarbaged(keys=["a", "b"], logits=False)({"a": probs, "b": probs.flip(1)})
    assert two["a_rejected"].tolist() == [False, False] and two["b_rejected"].tolist() == [True, False]
    assert two["b_best_real_class"].tolist() == [1, 1]


def test_reject_garbaged_never_overwrites_the_callers_fields():
    logits = torch.tensor([0.0, 0.0, 5.0])
    mine = {"pred": logits, "rejected": "my QC flag", "garbage_prob": 0.0}
    with pytest.raises(KeyError, match=r"overwrite \['rejected', 'garbage_prob'\].*output_keys"):
        RejectGarbaged(keys="pred")(mine)
    assert mine["rejected"] == "my QC flag"  # the input is untouched
    renamed = RejectGarbaged(keys="pred", output_keys={"rejected": "k1_rejected", "garbage_prob": "k1_prob"})(mine)
    assert renamed["rejected"] == "my QC flag" and renamed["garbage_prob"] == 0.0
    assert bool(renamed["k1_rejected"]) and float(renamed["k1_prob"]) > 0.9
    assert "best_real_class" in renamed  # names not given keep their default
    prefixed = RejectGarbaged(keys="pred", prefix="kp1_")(mine)
    assert bool(prefixed["kp1_rejected"]) and prefixed["rejected"] == "my QC flag"
    forced = RejectGarbaged(keys="pred", allow_overwrite=True)(mine)
    assert bool(forced["rejected"]) is True
    with pytest.raises(ValueError, match="unknown"):
        RejectGarbaged(keys="pred", output_keys={"reject": "x"})
    with pytest.raises(ValueError, match="same key"):
        RejectGarbaged(keys="pred", output_keys={"rejected": "garbage_prob"})


@pytest.mark.parametrize(
    "pred,kwargs,match",
    [
        (torch.zeros(2, 3, 4), {}, "shape"),
        (torch.zeros(1), {}, "C >= 2"),
        (torch.tensor([0.5, 2.0]), {"logits": False}, "outside \\[0, 1\\]"),
        (torch.tensor([0.5, float("nan")]), {}, "NaN"),
        (torch.zeros(3), {"garbage_index": 3}, "garbage_index"),
    ],
)
def test_reject_garbaged_bad_input(pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RejectGarbaged(keys="pred", **kwargs)({"pred": pred})


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass


def test_rejection_counter_on_tiny_engine(tmp_path):
    # 2 epochs x 3 iterations of decollated outputs (a list of dicts per iteration), like MONAI engines produce
    flags = [[True, False], [False, False], [True, True]]
    post = RejectGarbaged(keys="pred")

    def step(engine, batch):
        return [
            post({"pred": torch.tensor([0.0, 0.0, 5.0 if f else -5.0]), "image": f"img_{batch}_{j}.nii"})
            for j, f in enumerate(flags[batch])
        ]

    writer, csv = RecordingWriter(), tmp_path / "out" / "rejected.csv"
    engine = Engine(step)
    counter = RejectionCounter(summary_writer=writer, csv_path=csv, tag="garbage")
    counter.attach(engine)
    engine.run([0, 1, 2], max_epochs=2)
    assert counter.total_rejected == 6 and counter.total_seen == 12
    assert counter.epoch_rejected == 3 and counter.iteration_rejected == 2
    assert engine.state.metrics["garbage_count"] == 3 and engine.state.metrics["garbage_rate"] == 0.5
    assert [s for s in writer.scalars if s[0] == "garbage/iteration"] == [
        ("garbage/iteration", c, i + 1) for i, c in enumerate([1, 0, 2, 1, 0, 2])
    ]
    assert ("garbage/epoch_rate", 0.5, 2) in writer.scalars
    table = pd.read_csv(csv)
    assert table["id"].tolist() == ["img_0_0.nii", "img_2_0.nii", "img_2_1.nii"] * 2
    assert table["epoch"].tolist() == [1, 1, 1, 2, 2, 2] and (table["garbage_prob"] > 0.9).all()


def test_rejection_counter_with_monai_evaluator(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():  # class 2 (garbage) wins exactly when the mean intensity is positive
        net[1].weight.zero_()
        net[1].bias.zero_()
        net[1].weight[2] = 1.0
    data = [{"image": torch.full((1, 4, 4), v), "label": 0} for v in (1.0, -1.0, -2.0, 3.0, -1.0)]
    loader = DataLoader(Dataset(data), batch_size=2)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=net, postprocessing=RejectGarbaged(keys="pred")
    )
    counter = RejectionCounter(csv_path=tmp_path / "rej.csv")
    counter.attach(evaluator)
    evaluator.run()
    assert counter.total_rejected == 2 and counter.total_seen == 5
    assert pd.read_csv(tmp_path / "rej.csv")["iteration"].tolist() == [1, 2]


def test_rejection_counter_output_transform_and_errors():
    engine = Engine(lambda e, b: {"flags": torch.tensor([True, b])})
    counter = RejectionCounter(output_transform=lambda out: (out["flags"], ["a", "b"]))
    counter.attach(engine)
    engine.run([False, True], max_epochs=1)
    assert counter.total_rejected == 3 and [r["id"] for r in counter.records] == ["a", "a", "b"]
    bad = Engine(lambda e, b: [{"pred": torch.zeros(3)}])
    RejectionCounter().attach(bad)
    with pytest.raises(ValueError, match="RejectGarbaged"):
        bad.run([0], max_epochs=1)


# ---------------------------------------------------------------------------------------------------- OOD baselines
def test_msp_energy_and_kplus1_scores():
    logits = torch.randn(6, K, dtype=torch.float64) * 3
    np.testing.assert_allclose(msp_score(logits).numpy(), softmax(logits.numpy(), axis=1).max(1), rtol=1e-12)
    np.testing.assert_allclose(energy_score(logits).numpy(), logsumexp(logits.numpy(), axis=1), rtol=1e-12)
    np.testing.assert_allclose(
        energy_score(logits, temperature=2.0).numpy(), 2.0 * logsumexp(logits.numpy() / 2.0, axis=1), rtol=1e-12
    )
    np.testing.assert_allclose(kplus1_score(logits).numpy(), 1 - softmax(logits.numpy(), axis=1)[:, -1], rtol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        energy_score(logits, temperature=0)
    with pytest.raises(ValueError, match="shape"):
        msp_score(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_ood_metrics_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(1.0, 1.0, 57), rng.normal(0.0, 1.0, 43)
    if ties:
        s_in, s_out = np.round(s_in), np.round(s_out)
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    scores = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    got = ood_metrics(torch.as_tensor(s_in), s_out.tolist())
    assert got["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert got["fpr_at_tpr"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")], abs=1e-12)
    flipped = ood_metrics(-s_in, -s_out, higher_is_in=False)
    assert flipped["auroc"] == pytest.approx(got["auroc"]) and flipped["fpr_at_tpr"] == got["fpr_at_tpr"]


def test_ood_metrics_extremes_and_errors():
    perfect = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0])
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_tpr"] == 0.0
    worst = ood_metrics([0.0, 1.0], [3.0, 4.0])
    assert worst["auroc"] == 0.0 and worst["fpr_at_tpr"] == 1.0
    with pytest.raises(ValueError, match="empty"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([1.0, float("nan")], [1.0])


def test_mahalanobis_matches_sklearn_and_detects_outliers():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (3, 4))
    y = np.repeat(np.arange(3), 40)
    x = means[y] + rng.normal(0, 1, (120, 4)) @ np.diag([1.0, 0.5, 2.0, 1.0])
    det = MahalanobisDetector(reg=0.0).fit(torch.as_tensor(x), torch.as_tensor(y))
    centred = x - np.stack([x[y == c].mean(0) for c in range(3)])[y]
    cov = EmpiricalCovariance(assume_centered=True).fit(centred)
    probe = rng.normal(0, 4, (9, 4))
    expected = np.stack([cov.mahalanobis(probe - x[y == c].mean(0)) for c in range(3)], 1)
    np.testing.assert_allclose(det.distances(probe).numpy(), expected, rtol=1e-8)
    np.testing.assert_allclose(det.score(probe).numpy(), -expected.min(1), rtol=1e-8)
    far = det.score(means + 30.0)
    assert (far < det.score(means)).all()
    assert det.get_params()["reg"] == 0.0 and det.set_params(reg=1e-3).reg == 1e-3
    with pytest.raises(RuntimeError, match="not fitted"):
        MahalanobisDetector().score(x)
    with pytest.raises(ValueError, match="labels"):
        MahalanobisDetector().fit(x, y[:-1])


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_mahalanobis_on_model_features(dims):
    torch.manual_seed(0)
    net = resnet10(spatial_dims=dims, n_input_channels=1, num_classes=3, widen_factor=0.25)
    size = (16,) * dims
    train = [{"image": torch.randn(3, 1, *size), "label": torch.tensor([0, 1, 2])} for _ in range(4)]
    # the head's input (default) is the flattened avgpool output, captured through record_activations
    f_head, labels = extract_features(net, train)
    f_pool, _ = extract_features(net, train, layer="avgpool")
    assert f_head.shape == (12, net.fc.in_features) and labels.tolist() == [0, 1, 2] * 4
    torch.testing.assert_close(f_head, f_pool)
    training_flag = net.training
    det = MahalanobisDetector(layer="layer4", reg=1e-3).fit_model(net, train)
    assert net.training == training_flag
    s_in = det.score_model(net, [b["image"] for b in train])
    s_out = det.score_model(net, torch.randn(6, 1, *size) * 20 + 10)
    assert s_in.shape == (12,) and ood_metrics(s_in, s_out)["auroc"] > 0.9
