"""THE single-image engine: every caller (``gamverify cam``, cohort runs, :class:`SuitabilityPipeline` and through it
MONAI Label and MONAI Deploy, the demo) explains an image here, so a step changes in one place.

:meth:`ImagePipeline.observe` is the ONE producer of per-image evidence (an :class:`Observation`: logits, the raw
and normalised maps on the network's grid and on the input's, the pooled early features and head input recorded
during the same forward pass, the image and its meta data); the screen, the verifier, the cohort, ``gamverify cam``,
MONAI Label and Deploy all use it. A classifier on its whole input, a 2D network slice by slice on a volume and a
segmentation bundle (Seg-Grad-CAM through its inferer) are its three strategies.

One image goes through these steps, each a method of :class:`ImagePipeline`:

1. :meth:`~ImagePipeline.load`: read the file (a DICOM series directory too) with the preprocessing's own loading
   transforms, then the rest of the preprocessing (a bundle's inference ``preprocessing``, or for a network given by
   name: channel first, checks, optional intensity window);
2. :meth:`~ImagePipeline.observe`: ONE forward (+ backward) pass giving the logits, the raw CAM of the explained
   class or label and the features recorded on the way (a 2D network on a volume: slice by slice,
   ``SliceAggregateInferer`` / ``SliceCAMd``; a segmentation bundle: one no-grad pass through its inferer, then
   Seg-Grad-CAM); :meth:`~ImagePipeline.explain` / :meth:`~ImagePipeline.result` add the attribution energy, the
   normalised map, the K+1 garbage rejection (``RejectGarbaged``'s rule) and, with a ``screen``, its answer on that
   observation (``screen.score(observation)``: statistics only, no second pass);
3. :meth:`~ImagePipeline.verify`: the similarity features of a batch of maps against the reference map in one
   ``similarity_metrics`` call, the verifier's P(suitable) in one forest call, and the verdicts;
4. :meth:`~ImagePipeline.on_input_grid` / :meth:`~ImagePipeline.write`: the map back on the input's grid (the one
   inverse, ``io.grid.to_input_grid``) written as NIfTI with the input's affine, a PNG overlay and a JSON summary.

Names (one word per thing): ``network`` is the ``torch.nn.Module``; ``target_layers`` is the CAM layer as in MONAI's
CAM classes (``network.named_modules()`` names); the engine explains exactly one layer, so it is one string and every
map is a tensor of shape (1, *spatial) (never a dict); files and JSON summaries call it ``layer``.

Verdicts, in order of precedence: ``"out of distribution"`` (the screen rejects the image), ``"rejected"`` (the K+1
garbage class), ``"suitable"`` / ``"not suitable"`` (the verifier's P(suitable) against ``threshold``),
``"unverified"`` (no verifier).

Example:
    >>> pipe = ImagePipeline.from_bundle("bundles/sos_staging")
    >>> result = pipe.run("case_001.nii.gz", out_dir="out", name="case_001_gradcam")
    >>> result.prediction_name, result.energy, result.files["map"]
    ('stage3', 1234.5, 'out/case_001_gradcam.nii.gz')
    >>> obs = pipe.observe("case_001.nii.gz")  # the evidence alone: obs.logits, obs.cam, obs.cam_input, obs.features
"""

from __future__ import annotations

from monai_gamverify.apps.pipeline.engine import ImagePipeline
from monai_gamverify.apps.pipeline.observation import Observation, preprocessing_hash, reader_policy
from monai_gamverify.apps.pipeline.result import (
    VERDICTS,
    ImageResult,
    PreprocessingError,
    decide_verdict,
    error_message,
    image_stem,
    is_out_of_memory,
    is_regression,
    simple_preprocessing,
)

__all__ = [
    "ImagePipeline",
    "ImageResult",
    "Observation",
    "PreprocessingError",
    "VERDICTS",
    "decide_verdict",
    "error_message",
    "image_stem",
    "is_out_of_memory",
    "is_regression",
    "preprocessing_hash",
    "reader_policy",
    "simple_preprocessing",
]
