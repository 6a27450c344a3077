"""No leaks: repeated CAM calls keep memory flat, leave no hook and no autograd graph behind, also after an error."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from _model_state import hook_count
from torch import nn

from monai_gamverify import GradCAM, GradCAMpp, ScoreCAM

N_CALLS, WARMUP = 500, 50
PAGE = os.sysconf("SC_PAGE_SIZE")


pytestmark = pytest.mark.usefixtures("one_thread")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Probe(nn.Module):
    """Identity that keeps only a weak reference to what flowed through it (no hook involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: weakref.ref | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = weakref.ref(x)
        return x


class Net3D(nn.Module):
    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 4, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(4, 8, 3, padding=1),
            nn.BatchNorm3d(8),
            nn.ReLU(inplace=True),
            nn.Conv3d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.probe = Probe()
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3))
        self.fail_on_call, self.calls = fail_on_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.probe(self.features(x))
        if self.calls == self.fail_on_call:  # after the target layer: grad mode is already on inside the CAM
            raise RuntimeError("simulated failure inside forward")
        return self.head(h)


def flags(net: nn.Module):
    return (
        {n: m.training for n, m in net.named_modules()},
        {n: p.requires_grad for n, p in net.named_parameters()},
        {n: getattr(m, "inplace", None) for n, m in net.named_modules()},
    )


@pytest.mark.slow
def test_500_gradcam_calls_do_not_leak():
    torch.manual_seed(0)
    net = Net3D().train()  # a caller in training mode: must come back that way every time
    before = flags(net)
    cam = GradCAM(net, "features.5")
    x = torch.randn(2, 1, 16, 16, 16)
    rss = []
    for i in range(N_CALLS):
        maps = cam(x, class_idx=[0, 2], normalize=i % 2 == 0)
        if i + 1 == WARMUP:
            gc.collect()
            rss.append(rss_bytes())
    gc.collect()
    rss.append(rss_bytes())
    growth = (rss[1] - rss[0]) / rss[0]
    print(f"RSS after {WARMUP} calls {rss[0] / 2**20:.1f} MiB, after {N_CALLS} {rss[1] / 2**20:.1f} MiB: {growth:+.2%}")
    assert growth < 0.05, f"resident memory grew {growth:.1%} over {N_CALLS - WARMUP} GradCAM calls"
    assert hook_count(net) == 0
    assert flags(net) == before
    assert all(p.grad is None for p in net.parameters())
    # no autograd graph survives the call: the result is a plain tensor and the activation it came from is freed
    assert maps.grad_fn is None and not maps.requires_grad
    ref = weakref.ref(maps)
    del maps
    gc.collect()
    assert ref() is None
    assert net.probe.seen is not None and net.probe.seen() is None, "the activation (and its graph) is still alive"
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("cls", [GradCAM, GradCAMpp, ScoreCAM])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_exception_inside_forward_leaves_model_clean(cls, grad_mode):
    torch.manual_seed(0)
    # GradCAM/GradCAMpp: the 2nd forward is the second CAM call; ScoreCAM: the 2nd forward is a masked pass
    net = Net3D(fail_on_call=2).train()
    net.features[3].weight.requires_grad_(False)  # mixed flags must come back exactly
    before, state = flags(net), {k: v.clone() for k, v in net.state_dict().items()}
    cam = cls(net, "features.5", batch_size=4) if cls is ScoreCAM else cls(net, "features.5")
    x = torch.randn(1, 1, 12, 12, 12)
    with torch.set_grad_enabled(grad_mode):
        if cls is not ScoreCAM:
            cam(x)  # 1st call succeeds
        with pytest.raises(RuntimeError, match="simulated failure"):
            cam(x)
        assert torch.is_grad_enabled() == grad_mode  # the CAM's internal switch to grad mode did not escape
    assert hook_count(net) == 0
    assert flags(net) == before
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in net.parameters())
    gc.collect()
    assert net.probe.seen() is None, "the failed call's activation is still referenced"
    # the object is still usable afterwards
    maps = cam(x)
    assert maps.shape == (1, 1, 12, 12, 12) and hook_count(net) == 0 and flags(net) == before
