"""Score-CAM at size: a measured memory budget sets the chunk size; top-k channels approximate the full method."""

from __future__ import annotations

import copy

import pytest
import torch
from _model_state import assert_same_state, snapshot
from monai.networks.nets import resnet10

from monai_gamverify import ScoreCAM
from monai_gamverify.visualize.cam import normalize_maps, upsample_maps

CASES = [(2, (2, 1, 32, 32), "layer2"), (3, (2, 1, 16, 16, 16), "layer1")]


def tiny_resnet(dims: int) -> torch.nn.Module:
    torch.manual_seed(1)
    return resnet10(spatial_dims=dims, n_input_channels=1, num_classes=4, widen_factor=0.25)


def _masked_forward_peak(net: torch.nn.Module, x: torch.Tensor, channel: torch.Tensor) -> int:
    """Independent measurement of one masked forward's peak allocation (CPU profiler events)."""
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        mask = normalize_maps(upsample_maps(channel[None, None].float(), x.shape[2:]))
        net(x * mask)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def _acts(net: torch.nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """An eval-mode copy of ``net``, the layer's activations for ``x`` and the predicted classes (independently)."""
    ev = copy.deepcopy(net).eval()
    store = {}
    h = dict(ev.named_modules())[layer].register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        logits = ev(x)
    h.remove()
    return ev, store["a"], logits.argmax(1)


@pytest.mark.parametrize("dims, shape, layer", CASES)
def test_budget_sets_chunk_from_measured_cost(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    before = snapshot(net)
    exact = ScoreCAM(net, layer, batch_size=4)(x, normalize=False)
    assert_same_state(net, before)
    probe = ScoreCAM(net, layer, max_memory_mb=1e-3)  # far below one masked forward: chunks of one
    one = probe(x, normalize=False)
    assert_same_state(net, before)
    cost = probe.last_probe_bytes
    assert probe.last_chunk_size == 1 and cost > 0
    # the probe's figure is a real measurement: close to an independent one of the same masked forward
    ev, acts, _ = _acts(net, layer, x[:1])
    independent = _masked_forward_peak(ev, x[:1], acts[0, 0])
    assert 0.5 * independent <= cost <= 2 * independent
    for chunks in (3, 7):
        budget = chunks * cost / 2**20
        cam = ScoreCAM(net, layer, max_memory_mb=budget)
        got = cam(x, normalize=False)
        # chunk = budget / measured per-sample cost (re-measured in every call, so allow its noise either way)
        assert cam.last_chunk_size == max(1, int(budget * 2**20 // cam.last_probe_bytes))
        assert cam.last_chunk_size * cam.last_probe_bytes <= budget * 2**20
        assert abs(cam.last_chunk_size - chunks) <= 1
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one, exact, rtol=1e-4, atol=1e-6)
    capped = ScoreCAM(net, layer, max_memory_mb=1e6, batch_size=5)
    capped(x)
    assert capped.last_chunk_size == 5  # batch_size caps a generous budget
    assert_same_state(net, before)


@pytest.mark.parametrize("rank_by", ["variance", "gradient"])
@pytest.mark.parametrize("dims, shape, layer", CASES)
def test_top_k_all_channels_equals_full(dims, shape, layer, rank_by):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    before = snapshot(net)
    full = ScoreCAM(net, layer, batch_size=8)(x, normalize=False)
    n_channels = _acts(net, layer, x)[1].shape[1]
    for k in (n_channels, n_channels + 5):
        top = ScoreCAM(net, layer, batch_size=8, top_k=k, rank_by=rank_by)(x, normalize=False)
        torch.testing.assert_close(top, full, rtol=0, atol=0)
    assert_same_state(net, before)


@pytest.mark.parametrize("dims, shape, layer", CASES)
def test_top_k_scores_only_the_ranked_channels(dims, shape, layer):
    net = tiny_resnet(dims)
    x = torch.randn(shape)
    before = snapshot(net)
    ev, acts, idx = _acts(net, layer, x)
    k = 3
    cam = ScoreCAM(net, layer, batch_size=2, top_k=k)
    chosen = cam.selected_channels(acts)
    variance = acts.flatten(2).double().var(dim=2, unbiased=False)
    for i in range(x.shape[0]):  # the k highest-variance channels, independently ranked
        assert set(chosen[i].tolist()) == set(variance[i].argsort(descending=True)[:k].tolist())
    # the top-k map is the full method's weights restricted to those channels
    weights = ScoreCAM(ev, layer, batch_size=2)._weights_for(layer, acts, None, x, idx, None)
    restricted = torch.zeros_like(weights)
    for i in range(x.shape[0]):
        restricted[i, chosen[i]] = weights[i, chosen[i]]
    expect = torch.relu((restricted.view(*restricted.shape, *([1] * dims)) * acts).sum(1, keepdim=True))
    expect = upsample_maps(expect, x.shape[2:])
    got = cam(x, normalize=False)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-6)
    assert_same_state(net, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_memory_mb": 0}, "max_memory_mb"),
        ({"max_memory_mb": -5.0}, "max_memory_mb"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"rank_by": "random"}, "rank_by"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoreCAM(tiny_resnet(2), "layer2", **kwargs)
