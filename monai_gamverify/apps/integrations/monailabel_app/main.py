"""MONAI Label app: every bundle in a folder served as classification with Grad-CAM and suitability verdict.

    python -m monai_gamverify.apps.integrations.monailabel app --out apps/gamverify
    cp -r bundles/sos_staging apps/gamverify/model/          # trained: models/model.pt
    monailabel start_server --app apps/gamverify --studies IMAGES --host 127.0.0.1 --port 8000 \
        [--conf models sos_staging] [--conf gamverify_overrides '{"network_name": "small_cnn"}'] \
        [--conf gamverify_reference verify/reference_map.nii.gz --conf gamverify_verifier verify/verifier.skops]

Each bundle under ``model/`` (or ``--conf gamverify_bundles DIR``) becomes the infer model ``<bundle name>``
(and ``<bundle name>_predict``: the label only, same network):
``POST /infer/<bundle>?image=<id>&output=all`` answers a multipart with the CAM NIfTI (part ``image``) and the json
(label, probabilities, garbage rejection, verdict). Nothing is downloaded: the bundles are read from the folder, and
no model-zoo index is fetched. A bad request (unknown image, unreadable or 2D image for a 3D model, unknown model)
answers HTTP 4xx with a message that names the problem. Options (``--conf``) are described in
:func:`monai_gamverify.apps.integrations.monailabel.task_options`.
"""

from __future__ import annotations

import logging
import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from monai_gamverify.apps.integrations.monailabel import (
    GamverifyRequestError,
    SuitabilityInferTask,
    find_bundles,
    task_options,
)

logger = logging.getLogger(__name__)


class GamverifyApp(MONAILabelApp):
    """Bundles in a folder -> one :class:`SuitabilityInferTask` each (label + CAM NIfTI + verdict)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        folder = conf.get("gamverify_bundles") or os.path.join(app_dir, "model")
        try:
            self.bundles = find_bundles(folder, only=conf.get("models"))
        except FileNotFoundError as err:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, str(err)) from err
        logger.info("gamverify: serving %s from %s", sorted(self.bundles), folder)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="gamverify",
            description="bundle prediction + Grad-CAM + suitability verdict (monai-gamverify)",
            version="1",
        )

    def init_infers(self) -> dict:
        infers = {}
        for name, path in self.bundles.items():
            try:
                task = SuitabilityInferTask(str(path), self.conf, **task_options(self.conf, name, self.bundles))
            except (ValueError, FileNotFoundError, TypeError) as err:
                raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"bundle {name}: {err}") from err
            infers[name] = task  # label + CAM NIfTI + verdict
            infers[f"{name}_predict"] = SuitabilityInferTask(str(path), self.conf, predict_only=True, core=task.core)
        return infers

    def infer(self, request: dict, datastore=None) -> dict:
        """MONAI Label's ``infer`` with 4xx answers naming the problem: no or unknown model (404 lists the models),
        an image id that is neither in the datastore nor an existing file (404)."""
        model = request.get("model")
        if not model:
            raise GamverifyRequestError("no model given: POST /infer/<model>", status_code=400)
        if model not in self._infers:
            raise GamverifyRequestError(f"unknown model {model!r}; this server has {sorted(self._infers)}", 404)
        image = request.get("image")
        if isinstance(image, str):
            store = datastore or self.datastore()
            if not image:
                raise GamverifyRequestError("no image given: ?image=<id> or a file upload", status_code=400)
            if not os.path.exists(image) and not store.get_image_uri(image):
                n = len(store.list_images())
                raise GamverifyRequestError(f"image {image!r} not found in the datastore ({n} images)", 404)
        return super().infer(request, datastore)

    def init_trainers(self) -> dict:
        return {}  # training: gamverify train / the bundle's train.json, not through this app
