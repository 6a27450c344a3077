"""Volumetric Grad-CAM, Grad-CAM++ and Score-CAM for 2D and 3D MONAI/torch networks.

One base class runs the forward pass and the backward pass; each method only says how channel weights are made.
Unlike ``monai.visualize.GradCAM``, the backward pass is taken with respect to the target activations only: the
forward pass runs without autograd up to the first target layer, parameters are frozen for the call, nothing is
written to ``.grad``, the model's flags are restored exactly and no hook outlives a call.
"""

# long module: Grad-CAM, Grad-CAM++ and Score-CAM are small subclasses of the one BaseCAM they share
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn

from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.hooks import LayerHooks, preserved_state, resolve_layers

__all__ = ["BaseCAM", "GradCAM", "GradCAMpp", "ScoreCAM", "CAMResult", "normalize_maps", "upsample_maps"]

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CAMResult:
    """What one CAM call produced.

    Attributes:
        maps: (B, 1, *spatial) maps, or a dict layer name -> maps when several layers were asked for.
        logits: the model's (detached) output for the clean input, shape (B, N).
        class_idx: (B,) the output column explained for each sample (``None`` when ``score_fn`` was used).
    """

    maps: torch.Tensor | dict[str, torch.Tensor]
    logits: torch.Tensor
    class_idx: torch.Tensor | None


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Rescale each map of a (B, 1, *spatial) batch to [0, 1]; a constant map becomes zeros (never NaN)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat))
    return out.view_as(maps)


def upsample_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (2D) / trilinear (3D) upsampling with ``align_corners=False``, as MONAI and captum do."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


def _first_conv(model: nn.Module) -> nn.modules.conv._ConvNd | None:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module
    return None


class BaseCAM:
    """Class-activation maps from one or several layers; subclasses define :meth:`channel_weights`.

    Args:
        nn_module: the network (2D or 3D; classification, regression or any output reduced by ``score_fn``).
        target_layers: a layer name as in ``nn_module.named_modules()`` or a list of names (then calls return a
            dict name -> maps computed from one forward and one backward pass).

    Example:
        >>> cam = GradCAM(net, target_layers="layer4")
        >>> maps = cam(x)                       # (B, 1, *x.shape[2:]) in [0, 1]
        >>> raw = cam(x, class_idx=[0, 3], normalize=False)
        >>> with GradCAM(net, ["layer3", "layer4"]) as cam:
        ...     by_layer = cam(x)               # {"layer3": ..., "layer4": ...}
    """

    needs_gradients = True

    def __init__(self, nn_module: nn.Module, target_layers: str | Sequence[str]) -> None:
        if not isinstance(nn_module, nn.Module):
            raise TypeError(f"nn_module must be a torch.nn.Module, got {type(nn_module).__name__}")
        self.nn_module = nn_module
        self.multi_layer = not isinstance(target_layers, str)
        self.target_layers = list(resolve_layers(nn_module, target_layers))
        self._hooks: LayerHooks | None = None

    # context-manager use: hooks live only inside a call, so exit just guarantees nothing is left behind
    def __enter__(self) -> BaseCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove any hook this object may hold (calls already clean up after themselves)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        """(B, C) weights of the activation channels (B, C, *feature_spatial)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor of shape (B, C, H, W) or (B, C, D, H, W), got {type(x)}")
        if x.ndim not in (4, 5):
            raise ValueError(
                f"input must have shape (B, C, H, W) or (B, C, D, H, W); got {x.ndim} dimensions {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("empty batch: the input has batch size 0")
        if not x.is_floating_point():
            x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")
        conv = _first_conv(self.nn_module)
        if conv is not None:
            dims = conv.weight.ndim - 2
            if x.ndim - 2 != dims:
                raise ValueError(
                    f"input has {x.ndim - 2} spatial dimensions {tuple(x.shape)} but the network's first convolution "
                    f"is {dims}D"
                )
            if x.shape[1] != conv.in_channels:
                raise ValueError(f"input has {x.shape[1]} channels but the network expects {conv.in_channels}")
        param = next(self.nn_module.parameters(), None)
        if param is not None and param.device != x.device:
            raise ValueError(f"input is on {x.device} but the network is on {param.device}; move one of them")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("CAMs need autograd: call them outside torch.inference_mode()")
        return x

    @staticmethod
    def _as_logits(out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network returned {type(out).__name__}; CAMs need a tensor output (or use score_fn)")
        return out.unsqueeze(1) if out.ndim == 1 else out

    @staticmethod
    def _targets(logits: torch.Tensor, class_idx: Any) -> torch.Tensor:
        if logits.ndim != 2:
            raise ValueError(
                f"the network output has shape {tuple(logits.shape)}; give score_fn(output) -> (B,) to say what to "
                "explain"
            )
        b, n = logits.shape
        if class_idx is None:
            idx = logits.argmax(dim=1)
        elif isinstance(class_idx, (int,)) and not isinstance(class_idx, bool):
            idx = torch.full((b,), int(class_idx), dtype=torch.long, device=logits.device)
        else:
            idx = torch.as_tensor(class_idx, device=logits.device)
            if idx.ndim == 0:
                idx = idx.expand(b)
            if idx.ndim != 1 or idx.shape[0] != b:
                raise ValueError(f"class_idx must be an int or have one entry per sample ({b}); got {tuple(idx.shape)}")
            if idx.is_floating_point() or idx.dtype == torch.bool:
                raise TypeError(f"class_idx must hold integers, got {idx.dtype}")
            idx = idx.long()
        if bool(((idx < 0) | (idx >= n)).any()):
            raise ValueError(f"class_idx {idx.tolist()} out of range for a network with {n} output(s)")
        return idx

    @staticmethod
    def _scores(out: torch.Tensor, idx: torch.Tensor | None, score_fn: ScoreFn | None) -> torch.Tensor:
        if score_fn is not None:
            scores = score_fn(out)
            if not isinstance(scores, torch.Tensor) or scores.shape != (out.shape[0],):
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(f"score_fn must return a tensor of shape ({out.shape[0]},), got {got}")
            return scores
        logits = BaseCAM._as_logits(out)
        return logits.gather(1, idx.view(-1, 1)).squeeze(1)

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        x: torch.Tensor,
        class_idx: int | Sequence[int] | torch.Tensor | None = None,
        normalize: bool = True,
        score_fn: ScoreFn | None = None,
        upsample: bool = True,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Maps for ``x``.

        Args:
            x: (B, C, H, W) or (B, C, D, H, W) input.
            class_idx: ``None`` (argmax per sample), an int, or one index per sample (for regression: the column).
            normalize: rescale each map to [0, 1] (high = attended); ``False`` keeps the raw ReLU'd values.
            score_fn: optional ``f(output) -> (B,)`` to explain instead of a class score (overrides ``class_idx``).
            upsample: resize maps to the input's spatial size; ``False`` keeps the feature resolution.

        Returns:
            (B, 1, *spatial) float32 maps on ``x``'s device, or a dict layer -> maps for several target layers.
        """
        return self.explain(x, class_idx=class_idx, normalize=normalize, score_fn=score_fn, upsample=upsample).maps

    def explain(
        self,
        x: torch.Tensor,
        class_idx: int | Sequence[int] | torch.Tensor | None = None,
        normalize: bool = True,
        score_fn: ScoreFn | None = None,
        upsample: bool = True,
    ) -> CAMResult:
        """Like calling the object, but also returns the logits and the explained classes (one forward pass)."""
        x_in = x
        x = self._check_input(x)
        plain = plain_tensor(x)
        with preserved_state(self.nn_module):
            acts, grads, logits, idx = self._activations_and_gradients(plain, class_idx, score_fn)
            maps: dict[str, torch.Tensor] = {}
            for name in self.target_layers:
                a = acts[name]
                if a.ndim < 3:
                    raise ValueError(
                        f"layer {name!r} output has shape {tuple(a.shape)} with no spatial axes; choose a convolutional"
                        " layer"
                    )
                w = self._weights_for(name, a, grads.get(name), plain, idx, score_fn)
                cam = F.relu((w.view(*w.shape, *([1] * (a.ndim - 2))) * a.float()).sum(dim=1, keepdim=True))
                if upsample:
                    cam = upsample_maps(cam, plain.shape[2:])
                if normalize:
                    cam = normalize_maps(cam)
                maps[name] = self._like_input(cam.detach().float(), x_in)
        out = maps if self.multi_layer else maps[self.target_layers[0]]
        return CAMResult(out, logits.detach(), idx)

    @staticmethod
    def _like_input(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # keep the affine of a MONAI MetaTensor so maps can be written aligned with their image
        if isinstance(x, MetaTensor) and cam.shape[2:] == x.shape[2:]:
            return MetaTensor(cam).copy_meta_from(x, copy_attr=False)
        return cam

    def _weights_for(
        self, name: str, acts: torch.Tensor, grads: torch.Tensor | None, x: torch.Tensor, idx: Any, score_fn: Any
    ) -> torch.Tensor:
        if self.needs_gradients and grads is None:
            raise ValueError(f"the explained output does not depend on layer {name!r}")
        return self.channel_weights(acts.float(), None if grads is None else grads.float())

    def _activations_and_gradients(
        self, x: torch.Tensor, class_idx: Any, score_fn: ScoreFn | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        leaves: dict[str, torch.Tensor] = {}

        def to_leaf(name: str, out: torch.Tensor) -> torch.Tensor:
            # first target reached: start autograd here, so nothing before it is recorded; later targets already
            # depend on it. The clone shields the recorded activation from in-place ops downstream.
            if not torch.is_grad_enabled():
                out = out.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            leaves[name] = out
            return out.clone()

        self._hooks = LayerHooks(self.nn_module, self.target_layers, transform=to_leaf)
        try:
            with torch.no_grad(), self._hooks:
                out = self._hooks.run(x)
                # the score is computed while grad mode is still on (it was switched on inside the forward)
                logits = self._as_logits(out) if score_fn is None else out
                idx = None if score_fn is not None else self._targets(logits, class_idx)
                scores = self._scores(out, idx, score_fn)
                total = scores.sum()  # summed here: outside, a caller's no_grad() would detach it
        finally:
            self.release()
        missing = [n for n in self.target_layers if n not in leaves]
        if missing:
            raise ValueError(f"target layer(s) {missing} were not executed in the forward pass")
        grads: dict[str, torch.Tensor] = {}
        if total.requires_grad:
            names = list(leaves)
            got = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
            grads = {n: g for n, g in zip(names, got) if g is not None}
        acts = {n: t.detach() for n, t in leaves.items()}
        out_logits = logits.detach() if isinstance(logits, torch.Tensor) else logits
        return acts, grads, out_logits, idx


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al., 2017): channel weights are the spatial mean of the gradients.

    Equals ``captum.attr.LayerGradCam(..., relu_attributions=True)`` upsampled with the same interpolation.

    Example:
        >>> maps = GradCAM(net, "layer4")(x, class_idx=[0, 2])
    """

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        return gradients.flatten(2).mean(dim=2)


class GradCAMpp(BaseCAM):
    """Grad-CAM++ (Chattopadhay et al., 2018), closed form with the exponential-score assumption.

    ``alpha = g^2 / (2 g^2 + sum(A) g^3)`` (0 where the denominator vanishes), weights ``sum(alpha * relu(g))``.

    Example:
        >>> maps = GradCAMpp(net, "layer4")(x)
    """

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        g = gradients.flatten(2).double()
        a_sum = activations.flatten(2).double().sum(dim=2, keepdim=True)
        g2 = g * g
        denom = 2 * g2 + a_sum * g2 * g
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
        return (alpha * F.relu(g)).sum(dim=2).float()


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al., 2020): each channel, upsampled and min-max scaled, masks the input; its weight is the
    increase of the class score over a zero-input baseline. Masked inputs run in chunks, so memory grows with
    ``chunk x input`` rather than ``channels x input``.

    Chunk size: ``batch_size`` masked inputs per forward pass, or, with ``max_memory_mb``, as many as fit the budget
    at the memory one masked input was *measured* to take: the first masked forward of each call (channel 0 of the
    first sample, whose score is used) is a probe whose peak memory is read from the allocator (CUDA:
    ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, so the device's peak statistic
    restarts there; CPU: the allocation/free events of ``torch.profiler`` with ``profile_memory=True``, summed in
    time order), mask and masked input included. Chunk = ``max_memory_mb / probe peak`` (at least 1), capped by
    ``batch_size`` when that is given too. The budget covers the masked forwards only, not the maps, the network's
    weights or the caller's tensors; the probe's peak includes fixed costs, so the estimate errs on the safe side.

    Top-k ("Faster Score-CAM"): ``top_k=k`` scores only the ``k`` channels ranked highest and gives the others
    weight 0 -- an approximation that costs ``k`` instead of ``C`` masked forwards. ``rank_by="variance"`` ranks by
    the spatial variance of each activation map (no extra pass); ``rank_by="gradient"`` by each channel's Grad-CAM
    contribution, mean gradient x mean activation (one backward pass from the target layer). With ``k >= C`` the
    result equals full Score-CAM exactly. Measured agreement with the full method: ``docs/scale.md``.

    Args:
        nn_module: the network.
        target_layers: layer name(s).
        batch_size: masked inputs per forward pass (default 16 without a budget; with ``max_memory_mb`` an upper
            bound, none by default).
        softmax: score with softmax probabilities (classification) or the raw output (regression); ``None`` picks
            softmax when the network has more than one output column.
        progress: show a progress bar over the masked forward passes.
        max_memory_mb: memory budget (MiB) of one chunk of masked forward passes; sets the chunk size from the
            probe (see above). ``None``: use ``batch_size``.
        top_k: score only this many channels per sample and layer (``None``: all channels, the exact method).
        rank_by: ``"variance"`` or ``"gradient"``: how channels are ranked for ``top_k``.

    Example:
        >>> maps = ScoreCAM(net, "layer4", batch_size=16)(x)
        >>> fast = ScoreCAM(net, "layer4", max_memory_mb=2048, top_k=32)(x)   # 32 masked forwards per sample
    """

    needs_gradients = False

    def __init__(
        self,
        nn_module: nn.Module,
        target_layers: str | Sequence[str],
        batch_size: int | None = None,
        softmax: bool | None = None,
        progress: bool = False,
        *,
        max_memory_mb: float | None = None,
        top_k: int | None = None,
        rank_by: str = "variance",
    ) -> None:
        super().__init__(nn_module, target_layers)
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_memory_mb is not None and (isinstance(max_memory_mb, bool) or not float(max_memory_mb) > 0):
            raise ValueError(f"max_memory_mb must be a positive number of MiB, got {max_memory_mb!r}")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or int(top_k) < 1):
            raise ValueError(f"top_k must be a positive int (or None for all channels), got {top_k!r}")
        if rank_by not in ("variance", "gradient"):
            raise ValueError(f"rank_by must be 'variance' or 'gradient', got {rank_by!r}")
        self.batch_size = 16 if batch_size is None and max_memory_mb is None else batch_size
        self.batch_size = None if self.batch_size is None else int(self.batch_size)
        self.max_memory_mb = None if max_memory_mb is None else float(max_memory_mb)
        self.top_k = None if top_k is None else int(top_k)
        self.rank_by = rank_by
        self.softmax = softmax
        self.progress = progress
        self.last_chunk_size: int | None = None  # chunk size the last call used (the budget's choice)
        self.last_probe_bytes: int | None = None  # measured peak bytes of one masked forward (budget only)

    def _activations_and_gradients(self, x, class_idx, score_fn):
        self.last_probe_bytes = None  # one probe per call: the input size may differ from the last call's
        if self.top_k is not None and self.rank_by == "gradient":
            # one forward + backward from the target layers: activations and the gradients that rank channels
            return BaseCAM._activations_and_gradients(self, x, class_idx, score_fn)
        hooks = LayerHooks(self.nn_module, self.target_layers, keep_copy=True)
        self._hooks = hooks
        try:
            with torch.no_grad(), hooks:
                out = hooks.run(x)
        finally:
            self.release()
        missing = [n for n in self.target_layers if n not in hooks.outputs]
        if missing:
            raise ValueError(f"target layer(s) {missing} were not executed in the forward pass")
        logits = self._as_logits(out) if score_fn is None else out
        idx = None if score_fn is not None else self._targets(logits, class_idx)
        return dict(hooks.outputs), {}, logits, idx

    def _score_of(self, out: torch.Tensor, idx: torch.Tensor | None, score_fn: ScoreFn | None) -> torch.Tensor:
        if score_fn is not None:
            return self._scores(out, None, score_fn)
        logits = self._as_logits(out)
        use_softmax = self.softmax if self.softmax is not None else logits.shape[1] > 1
        values = logits.softmax(dim=1) if use_softmax else logits
        return values.gather(1, idx.view(-1, 1)).squeeze(1)

    def selected_channels(self, acts: torch.Tensor, grads: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k) indices (ascending) of the channels scored for each sample: all of them without ``top_k``.

        Args:
            acts: (B, C, *spatial) activations of the target layer.
            grads: their gradients (needed for ``rank_by="gradient"``).

        Returns:
            long tensor (B, min(k, C)) of channel indices, sorted ascending.
        """
        b, c = acts.shape[:2]
        if self.top_k is None or self.top_k >= c:
            return torch.arange(c, device=acts.device).expand(b, c)
        flat = acts.flatten(2).double()
        if self.rank_by == "variance":
            rank = flat.var(dim=2, unbiased=False)
        else:
            if grads is None:
                raise ValueError("rank_by='gradient' needs the gradients of the target layer")
            rank = grads.flatten(2).double().mean(dim=2) * flat.mean(dim=2)
        return rank.topk(self.top_k, dim=1).indices.sort(dim=1).values

    def _masked_scores(
        self, x: torch.Tensor, chunk: torch.Tensor, spatial: Sequence[int], target: Any, score_fn: Any
    ) -> torch.Tensor:
        masks = normalize_maps(upsample_maps(chunk.unsqueeze(1).float(), spatial))
        out = self.nn_module(x * masks.to(x.dtype))
        tgt = None if target is None else target.expand(masks.shape[0])
        return self._score_of(out, tgt, score_fn)

    def _probe(self, x, chunk, spatial, target, score_fn) -> tuple[torch.Tensor, int]:
        """Scores of a one-channel chunk and the peak bytes it allocated (the budget's measured per-sample cost)."""
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            before = torch.cuda.memory_allocated(x.device)
            scores = self._masked_scores(x, chunk, spatial, target, score_fn)
            torch.cuda.synchronize(x.device)
            return scores, max(1, torch.cuda.max_memory_allocated(x.device) - before)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            scores = self._masked_scores(x, chunk, spatial, target, score_fn)
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        return scores, max(1, peak)

    def _weights_for(self, name, acts, grads, x, idx, score_fn):
        from tqdm.auto import tqdm

        b, c = acts.shape[:2]
        spatial = x.shape[2:]
        channels = self.selected_channels(acts, grads)
        weights = torch.zeros(b, c, dtype=torch.float32, device=x.device)
        size = self.batch_size
        with torch.no_grad():
            base_in = torch.zeros_like(x[:1])
            base_out = self.nn_module(base_in)
            bar = tqdm(total=channels.numel(), desc=f"Score-CAM {name}", disable=not self.progress, leave=False)
            for i in range(b):
                target = None if idx is None else idx[i : i + 1]
                base = self._score_of(base_out, target, score_fn)
                sel = channels[i]
                start = 0
                if self.max_memory_mb is not None and self.last_probe_bytes is None:
                    scores, cost = self._probe(x[i : i + 1], acts[i, sel[:1]], spatial, target, score_fn)
                    weights[i, sel[:1]] = (scores - base).float()
                    self.last_probe_bytes = cost
                    budget = int(self.max_memory_mb * 2**20 // cost)
                    size = max(1, budget if self.batch_size is None else min(budget, self.batch_size))
                    bar.update(1)
                    start = 1
                for s0 in range(start, sel.numel(), size):
                    part = sel[s0 : s0 + size]
                    scores = self._masked_scores(x[i : i + 1], acts[i, part], spatial, target, score_fn)
                    weights[i, part] = (scores - base).float()
                    bar.update(part.numel())
            bar.close()
        self.last_chunk_size = size
        return weights
