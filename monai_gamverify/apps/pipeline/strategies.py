"""How the engine observes one image with a given kind of network: the strategies behind
:meth:`~monai_gamverify.apps.pipeline.ImagePipeline.observe` (one each, no copies elsewhere).

- :class:`WholeInput`: a classifier or regressor taking the whole input; the CAM's own forward pass gives the logits
  and the recorded features, its backward the map.
- :class:`SliceWise`: a 2D network on a volume (e.g. ``cbct_quality``); outputs and recorded features averaged over
  the slices (``SliceAggregateInferer``), maps stacked back into a volume (``SliceCAMd``).
- :class:`SegmentationThroughInferer`: a segmentation bundle; one no-grad pass through its inferer (logits, predicted
  masks, features averaged over the inferer's windows), then each label's Seg-Grad-CAM (the sum of its logits over
  its mask or a box) through the same inferer.

Each fills an :class:`~monai_gamverify.apps.pipeline.observation.Observation` in place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_gamverify.apps.pipeline.observation import Observation
from monai_gamverify.apps.pipeline.result import plain
from monai_gamverify.energy.workflow import SliceAggregateInferer
from monai_gamverify.inferers import is_sliding_window
from monai_gamverify.screening.recorder import PENULTIMATE
from monai_gamverify.visualize.hooks import preserved_state
from monai_gamverify.visualize.segcam import (
    box_mask,
    bundle_activation,
    default_segmentation_label,
    label_index,
    predicted_mask,
    segmentation_cam,
)

__all__ = ["WholeInput", "SliceWise", "SegmentationThroughInferer", "choose_strategy", "pooled_features"]

logger = logging.getLogger(__name__)


def pooled_features(acts: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Recorded activations (``FeatureRecorder(pool=True)``) as 1D float64 arrays: each pooled early layer (2C,),
    the head's input ``"penultimate"`` (D,)."""
    out = {}
    for k, v in acts.items():
        t = torch.as_tensor(v).detach().double().cpu()
        out[k] = t.reshape(1, -1)[0].numpy() if k == PENULTIMATE else t.reshape(-1).numpy()
    return out


class WholeInput:
    """A network taking the whole input (see the module docstring)."""

    def observe(self, engine: Any, obs: Observation, xb: torch.Tensor, class_idx: Any, box: Any, cam: bool) -> None:
        """Fill ``obs`` from one forward (+ backward) pass of the (1, C, *spatial) batch ``xb``."""
        if box is not None:
            raise ValueError("box= is for segmentation bundles")
        with torch.inference_mode(False), torch.enable_grad(), engine._recorder() as rec:
            if cam:
                res = engine.cam.explain(xb, class_idx=class_idx, normalize=False)
                raw_map, logits, explained = plain(res.maps), res.logits.float()[0], int(res.class_idx[0])
            else:
                with preserved_state(engine.network), torch.no_grad():
                    logits = plain(engine.network(plain(xb))).float()[0]
        obs.features = pooled_features(rec.activations)
        obs.logits = logits.detach().cpu()
        obs.class_names = engine.names_for(int(obs.logits.numel()))
        if cam:
            obs.explained = [explained]
            obs.raw_maps = {obs.class_names[explained]: raw_map[0].detach().cpu()}


class SliceWise:
    """A 2D network applied slice by slice to a volume (see the module docstring)."""

    def observe(self, engine: Any, obs: Observation, xb: torch.Tensor, class_idx: Any, box: Any, cam: bool) -> None:
        """Fill ``obs`` from the slice-wise pass over the (1, C, D, H, W) volume ``xb`` (and the slice-wise CAM)."""
        if box is not None:
            raise ValueError("box= is for segmentation bundles")
        net = engine.network
        with torch.inference_mode(False), engine._recorder("mean") as rec, preserved_state(net), torch.no_grad():
            logits = SliceAggregateInferer(spatial_dim=engine.slice_axis)(xb, net).float()[0]
        obs.features = pooled_features(rec.activations)
        obs.logits = logits.detach().cpu()
        obs.class_names = engine.names_for(int(obs.logits.numel()))
        if not cam:
            return
        explained = int(logits.argmax()) if class_idx is None else int(class_idx)
        if not 0 <= explained < logits.numel():
            raise ValueError(f"class_idx {class_idx} out of range for {logits.numel()} outputs")
        engine.slicer.column = explained
        with torch.inference_mode(False), torch.enable_grad():
            raw_map = engine.slicer.maps(xb[0])
        obs.explained = [explained]
        obs.raw_maps = {obs.class_names[explained]: raw_map.detach().cpu()}


class SegmentationThroughInferer:
    """A segmentation bundle explained through its own inferer (see the module docstring)."""

    def observe(
        self,
        engine: Any,
        obs: Observation,
        xb: torch.Tensor,
        labels: Any,
        box: Sequence[Sequence[int]] | None,
        cam: bool,
    ) -> None:
        """Fill ``obs``: logits (K, *spatial), features, and the map of each label (``labels``: one or a list)."""
        bm, net = engine.bundle, engine.network
        inferer = bm.inferer() if "inferer" in bm.parser else None
        act = bundle_activation(bm)
        names = list(bm.class_names)
        px = plain(xb)
        with torch.inference_mode(False), engine._recorder("mean") as rec, preserved_state(net), torch.no_grad():
            logits = plain(inferer(px, net) if is_sliding_window(inferer) or inferer is not None else net(px))
        obs.features = pooled_features(rec.activations)
        obs.logits = logits.detach().float().cpu()[0]
        obs.class_names = names
        todo = labels if isinstance(labels, (list, tuple)) else [labels]
        for lab in todo:
            idx = label_index(default_segmentation_label(bm) if lab is None else lab, names)
            if not 0 <= idx < logits.shape[1]:
                raise ValueError(f"label {idx} out of range for a network with {logits.shape[1]} output channels")
            label_name = names[idx] if idx < len(names) else str(idx)
            mask = predicted_mask(logits, idx, act)
            obs.predicted_voxels[label_name] = int(mask.sum())
            obs.explained.append(idx)
            if not cam:
                continue
            region = box_mask(tuple(xb.shape[2:]), box, 1).to(xb.device) if box is not None else mask
            if not bool(region.any()):
                logger.warning("label %s: %s: its map is zero", label_name,
                               "empty box" if box is not None else "not predicted anywhere")  # fmt: skip
            with torch.inference_mode(False), torch.enable_grad():
                maps, _ = segmentation_cam(
                    net, xb, engine.target_layers, idx, inferer=inferer, mask=region, normalize=False,
                    activation=act, class_names=names, cam=engine.cam,
                )  # fmt: skip
            obs.raw_maps[label_name] = plain(maps)[0].detach().float().cpu()


def choose_strategy(engine: Any, x: Any) -> WholeInput | SliceWise | SegmentationThroughInferer:
    """The strategy for a preprocessed (C, *spatial) image: a segmentation bundle (not slice-wise) through its
    inferer, a volume into a slice-wise engine slice by slice, anything else whole."""
    if engine.task == "segmentation":
        return SegmentationThroughInferer()
    if engine.slicer is not None and x.ndim == 4:  # (C, D, H, W) volume for a 2D network
        return SliceWise()
    return WholeInput()
