"""Segmentation bundles through the engine: Seg-Grad-CAM of one label (the sum of its logits over a region), through
the bundle's own inferer (``SlidingWindowInferer``: one CAM per window, stitched by the inferer), on the input grid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.apps.pipeline.engine import ImagePipeline
from monai_gamverify.apps.pipeline.result import decide_verdict, image_stem
from monai_gamverify.io import save_map, write_json
from monai_gamverify.visualize.plots import overlay_png

__all__ = ["explain_segmentation"]


def explain_segmentation(
    pipe: ImagePipeline,
    image: str | os.PathLike,
    out_dir: str | os.PathLike,
    label: int | str | None = None,
    *,
    box: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Explain one label of a segmentation bundle on one image and write the map on the input's grid.

    The engine observes the image (:meth:`ImagePipeline.observe`: read, preprocessing, one no-grad pass through the
    bundle's inferer, then the Seg-Grad-CAM of the label: the sum of its logits over its predicted mask, or ``box``);
    the map goes back on the input grid with the one inverse (``io.grid.to_input_grid``).

    Args:
        pipe: an engine made by :meth:`ImagePipeline.from_bundle` for a segmentation bundle.
        image: a file, a DICOM file or a DICOM series directory.
        out_dir: output directory.
        label: label name (the bundle's ``channel_def``) or output channel index (default: the first foreground
            channel, :func:`~monai_gamverify.visualize.segcam.default_segmentation_label`: 1 for a softmax output, 0
            for a sigmoid or single-channel one).
        box: ``[[lo, hi], ...]`` per spatial axis of the preprocessed grid restricting the region.
        name: file stem (default ``<image stem>_<method>_<label>``).

    Returns:
        Summary dict: image, label, label index, layer, method, predicted voxels of the label, written files; with
        the engine's screen (a segmentation screen) also ``in_distribution``, ``p_value``, ``reasons``, ``verdict``.

    Example:
        >>> pipe = ImagePipeline.from_bundle("spleen_ct_segmentation")
        >>> explain_segmentation(pipe, "CT_series_dir", "cam_out", "spleen")["map"]
        'cam_out/CT_series_dir_gradcam_spleen.nii.gz'
    """
    bm = pipe.bundle
    if bm is None:
        raise ValueError("segmentation explanations need an engine made from a bundle (ImagePipeline.from_bundle)")
    pipe.check_screen("segmentation")
    obs = pipe.observe(image, class_idx=label, box=box)
    raw, x = obs.raw_image, obs.input
    idx = obs.explained_class
    label_name = next(iter(obs.raw_maps))
    cam = obs.cam
    cam_in, ref = obs.on_input_grid() if pipe.invert else (cam, x)
    stem = name or f"{image_stem(image)}_{pipe.method}_{label_name}"
    out = Path(out_dir)
    files = {"map": str(save_map(cam_in, out / f"{stem}.nii.gz", reference=ref))}
    on_input = raw is not None and tuple(raw.shape[1:]) == tuple(cam_in.shape[1:])
    base, shown = (raw, cam_in) if on_input else (x, cam)
    title = f"{pipe.method} {pipe.target_layers}: {image_stem(image)}, label {label_name}"
    files["overlay"] = str(
        overlay_png(torch.as_tensor(base)[0], torch.as_tensor(shown)[0], out / f"{stem}.png", title=title)
    )
    summary = {
        "image": str(image),
        "label": label_name,
        "label_index": idx,
        "layer": pipe.target_layers,
        "method": pipe.method,
        "predicted_voxels": obs.predicted_voxels[label_name],
        **files,
    }
    if pipe.screen is not None:
        answer = pipe.screen.score(obs)
        ok = bool(answer["in_distribution"])
        summary.update(in_distribution=ok, p_value=answer.get("p_value"), reasons=list(answer.get("reasons", [])))
        summary["verdict"] = decide_verdict(ok, None, None, pipe.threshold)
    summary["summary"] = str(write_json(summary, out / f"{stem}.json"))
    return summary
