"""Shared test helpers: snapshot a network's state and check a call left it exactly as it was."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(net: nn.Module):
    return (
        {k: v.clone() for k, v in net.state_dict().items()},
        {n: m.training for n, m in net.named_modules()},
        {n: p.requires_grad for n, p in net.named_parameters()},
        {n: getattr(m, "inplace", None) for n, m in net.named_modules()},
    )


def hook_count(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in net.modules()
    )


def assert_same_state(net: nn.Module, before) -> None:
    after = snapshot(net)
    assert before[0].keys() == after[0].keys()
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), f"{k} changed"
    assert before[1:] == after[1:]
    assert hook_count(net) == 0
    assert all(p.grad is None for p in net.parameters())
