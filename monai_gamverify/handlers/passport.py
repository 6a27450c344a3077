"""The bundle passport: what a bundle was trained with, written next to its weights when training ends, so that
every consumer (``gamverify cam``, ``cohort``, ``screen``, ``verify``, MONAI Label, Deploy) loads it without the
training overrides repeated by hand, and so that a model made with these bundles can be checked later on anyone's
data (its validation confidences for label-free accuracy estimates, its in-distribution screen).

``models/passport.json``::

    {"format": "monai-gamverify/passport/1",
     "settings": {"network_name": "small_cnn", "num_classes": 5, "class_names": [...], "hu_window": [...], ...},
     "cam_layer": "res4", "feature_layers": ["stem", "res2"],
     "val_conf": {"max_prob": [...], "correct": [...]},  "val_accuracy": 0.9,
     "screen": "screen"}                                  # models/screen, when fitted

:func:`monai_gamverify.bundle.load_bundle` applies ``settings`` to the inference config (before the caller's own
overrides) and updates nothing else. The handler also rewrites ``configs/metadata.json`` so that its
``network_data_format`` outputs (number and names of classes) and ``gamverify`` section (network, layers) describe the
trained network.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.bundle import PASSPORT_FORMAT, load_checkpoint, passport_path
from monai_gamverify.io import write_json

__all__ = ["BundlePassport", "validation_confidences", "write_passport"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def validation_confidences(network: torch.nn.Module, loader: Any, device: Any = None) -> dict[str, list]:
    """Maximum softmax probability and correctness of every validation image (what ATC needs).

    Args:
        network: the trained classifier (left in the mode it was in).
        loader: batches ``{"image": (B, C, *spatial), "label": (B,) or (B, 1)}``.
        device: where to run (default: the network's device).

    Returns:
        ``{"max_prob": [...], "correct": [0/1, ...]}``.
    """
    device = device or next(network.parameters()).device
    was_training = network.training
    network.eval()
    conf, correct = [], []
    try:
        for batch in loader:
            x = torch.as_tensor(batch["image"]).to(device)
            y = torch.as_tensor(batch["label"]).view(-1).long().cpu()
            probs = network(x).float().softmax(1).cpu()
            conf += [round(float(v), 6) for v in probs.max(1).values]
            correct += [int(v) for v in probs.argmax(1) == y]
    finally:
        network.train(was_training)
    return {"max_prob": conf, "correct": correct}


def _update_metadata(meta_path: Path, settings: Mapping[str, Any], cam_layer: Any, feature_layers: Any) -> None:
    meta = json.loads(meta_path.read_text())
    outputs = (meta.setdefault("network_data_format", {})).setdefault("outputs", {})
    pred = outputs.setdefault("pred", {}) if not outputs else next(iter(outputs.values()))
    names = settings.get("class_names")
    k = settings.get("num_classes")
    if k is not None:
        pred["num_channels"] = int(k)
        pred["spatial_shape"] = [int(k)]
        if not names or len(names) != int(k):
            names = [str(i) for i in range(int(k))]
        pred["channel_def"] = {str(i): str(n) for i, n in enumerate(names)}
    info = meta.setdefault("gamverify", {})
    if settings.get("network_name") is not None:
        info["network_name"] = settings["network_name"]
    if cam_layer:
        info["target_layer"] = cam_layer
    if feature_layers:
        info["feature_layers"] = list(feature_layers)
    write_json(meta, meta_path)


def write_passport(
    bundle_root: str | Path,
    settings: Mapping[str, Any],
    cam_layer: str | None = None,
    feature_layers: Sequence[str] | None = None,
    val_conf: Mapping[str, Sequence] | None = None,
    screen: str | None = None,
    update_metadata: bool = True,
    checkpoint: str | Path | None = None,
) -> Path:
    """Write ``models/passport.json`` (and update ``configs/metadata.json``) for a trained bundle.

    Args:
        bundle_root: the bundle directory.
        settings: the config values training ran with (network_name, num_classes, class_names, windows, ...).
        cam_layer: the CAM layer of the trained network.
        feature_layers: its early layers (Method 2, screen).
        val_conf: validation confidences (:func:`validation_confidences`).
        screen: the screen's folder, relative to ``models/``.
        update_metadata: rewrite ``configs/metadata.json`` to describe the trained network (only for the bundle's
            own weights, ``model.pt``).
        checkpoint: the weights the passport describes (default ``models/model.pt``); another checkpoint of the
            same bundle gets its own passport (:func:`~monai_gamverify.bundle.passport_path`).

    Returns:
        The passport's path.
    """
    root = Path(bundle_root)
    doc: dict[str, Any] = {"format": PASSPORT_FORMAT, "settings": dict(settings)}
    if cam_layer:
        doc["cam_layer"] = str(cam_layer)
    if feature_layers:
        doc["feature_layers"] = [str(s) for s in feature_layers]
    if val_conf:
        doc["val_conf"] = {k: list(v) for k, v in val_conf.items()}
        n = len(doc["val_conf"].get("correct", []))
        doc["val_accuracy"] = sum(doc["val_conf"]["correct"]) / n if n else None
    if screen:
        doc["screen"] = str(screen)
    path = write_json(doc, passport_path(root, checkpoint))
    meta_path = root / "configs" / "metadata.json"
    own_weights = path.name == passport_path(root).name
    if update_metadata and own_weights and meta_path.is_file():
        _update_metadata(meta_path, doc["settings"], cam_layer, feature_layers)
    return path


class BundlePassport:
    """Ignite handler: when training completes, write the bundle's passport from the best checkpoint.

    Attach it to the trainer (``train#handlers`` of ``train.json``). On ``COMPLETED`` it loads the best weights
    (``checkpoint``, the ``CheckpointSaver``'s key-metric file) into a copy of the network, records the validation
    confidences on the validator's data, writes ``models/passport.json`` and updates ``metadata.json``; with
    ``fit_screen=True`` it also fits the model's in-distribution screen (:func:`monai_gamverify.screening.fit_screen`)
    into ``models/screen``.

    Args:
        bundle_root: the bundle directory.
        settings: config values to record (``{"network_name": "@network_name", "num_classes": "@num_classes", ...}``
            in the config: the values after every command-line override).
        cam_layer: the trained network's CAM layer.
        feature_layers: its early layers.
        validator: the validation evaluator (its data loader gives the validation confidences), or None.
        checkpoint: the best weights file (default ``models/model.pt``).
        fit_screen: a screen-fitting function ``f(bundle_root, dataset_dir, out, datalist=...)`` (the config passes
            ``"$monai_gamverify.apps.screening.fit_screen"``: a handler does not import the apps layer), or
            ``None`` / ``False`` to skip the screen.
        dataset_dir: the dataset the screen is fitted on (the training datalist's folder).
        datalist: the datalist (default ``dataset_dir/datalist.json``).

    Example (train.json)::

        {"_target_": "monai_gamverify.handlers.BundlePassport", "bundle_root": "@bundle_root",
         "settings": {"network_name": "@network_name", "num_classes": "@num_classes"},
         "cam_layer": "@cam_layer", "validator": "@validate#evaluator"}
    """

    def __init__(
        self,
        bundle_root: str,
        settings: Mapping[str, Any],
        cam_layer: str | None = None,
        feature_layers: Sequence[str] | None = None,
        validator: Any = None,
        checkpoint: str | None = None,
        fit_screen: Callable[..., Any] | bool | None = None,
        dataset_dir: str | None = None,
        datalist: str | None = None,
    ) -> None:
        self.bundle_root = bundle_root
        self.settings = settings
        self.cam_layer = cam_layer
        self.feature_layers = feature_layers
        self.validator = validator
        self.checkpoint = checkpoint
        self.fit_screen = fit_screen
        self.dataset_dir = dataset_dir
        self.datalist = datalist

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # one writer under torchrun: rank 0 (the checkpoint saver's rank)
        root = Path(self.bundle_root)
        ckpt = Path(self.checkpoint) if self.checkpoint else root / "models" / "model.pt"
        network = getattr(engine.network, "module", engine.network)  # DistributedDataParallel wraps the network
        val_conf = None
        if self.validator is not None and getattr(self.validator, "data_loader", None) is not None:
            best = copy.deepcopy(network)
            if ckpt.is_file():
                load_checkpoint(best, ckpt)
            val_conf = validation_confidences(best, self.validator.data_loader)
        path = write_passport(root, self.settings, self.cam_layer, self.feature_layers, val_conf, checkpoint=ckpt)
        logger.info("bundle passport written: %s", path)
        if self.fit_screen:
            fit_screen = self.fit_screen
            if not callable(fit_screen):
                raise TypeError("BundlePassport(fit_screen=...) takes the screen-fitting function, not a flag")
            if not self.dataset_dir:
                raise ValueError("BundlePassport(fit_screen=True) needs dataset_dir")
            screen_dir = "screen" if ckpt.stem == "model" else f"screen_{ckpt.stem}"
            out = root / "models" / screen_dir
            try:
                fit_screen(root, self.dataset_dir, out, datalist=self.datalist, checkpoint=ckpt)
            except Exception as err:  # e.g. too few calibration images: the weights are saved, say why no screen
                logger.warning("no screen fitted for %s: %s: %s", ckpt, type(err).__name__, err)
                return
            write_passport(
                root, self.settings, self.cam_layer, self.feature_layers, val_conf, screen=screen_dir, checkpoint=ckpt
            )
            logger.info("screen fitted: %s", root / "models" / screen_dir)
