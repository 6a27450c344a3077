"""Serving integrations: MONAI Label infer task and MONAI Deploy operator around one SDK-independent core.

:class:`SuitabilityPipeline` runs a bundle on one image the way both front ends need it, as a thin wrapper over the
single-image engine (:class:`monai_gamverify.apps.pipeline.ImagePipeline`): the bundle's own inference
``preprocessing``, one forward pass that gives the prediction and the CAM, the map back on the input's grid written as
NIfTI, the K+1 garbage rejection when the model has a garbage class, the optional in-distribution screen, and the
suitability verdict from a reference map and a fitted :class:`~monai_gamverify.verification.SuitabilityVerifier`
(``"unverified"`` without them). Neither ``monailabel`` nor ``monai-deploy-app-sdk`` is needed for it:

- :mod:`monai_gamverify.apps.integrations.monailabel`: ``check_bundle_for_monailabel`` and ``SuitabilityInferTask``
  (created only when ``monailabel`` imports);
- :mod:`monai_gamverify.apps.integrations.deploy`: ``GamverifyOperator`` (extra ``deploy``).

Example:
    >>> pipe = SuitabilityPipeline("bundles/sos_staging", reference="verify/reference_map.nii.gz",
    ...                            verifier="verify/verifier.skops")
    >>> result = pipe.run("case_001.nii.gz", out_dir="out")
    >>> result["prediction_name"], result["cam"], result["verdict"]
    ('stage3', 'out/case_001_cam.nii.gz', 'suitable')
"""

from __future__ import annotations

from monai_gamverify.apps.integrations.suitability import VERDICTS, SuitabilityPipeline, image_stem

__all__ = ["SuitabilityPipeline", "VERDICTS", "image_stem"]
