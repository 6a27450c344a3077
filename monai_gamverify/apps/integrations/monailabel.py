"""MONAI Label: check that a bundle works with ``BundleInferTask``, and an infer task that adds CAM and verdict.

MONAI Label (0.8.5 pins ``numpy<2`` and imports ``torchvision``) is an optional, separately installed server; nothing
here imports it unless :class:`SuitabilityInferTask` is asked for.

- :func:`check_bundle_for_monailabel` reads a bundle the way ``monailabel.tasks.infer.bundle.BundleInferTask`` does
  (``configs/inference.json``, ``network_def``, ``preprocessing``/``pre_transforms`` with a ``LoadImaged``,
  ``postprocessing``/``post_transforms``, ``inferer``, the first ``network_data_format`` input and output, labels from
  the output's ``channel_def``, dimension from the input's ``spatial_shape``) and says what would go wrong.
- :class:`SuitabilityInfer` is the task's logic without MONAI Label: ``request -> (result file, result json)``, with
  the CAM NIfTI (aligned with the input) as result file and label, probabilities, garbage rejection and suitability
  verdict in the json.
- ``SuitabilityInferTask`` is that logic as a ``monailabel.tasks.infer.basic_infer.BasicInferTask`` subclass, built
  on first access (``from monai_gamverify.apps.integrations.monailabel import SuitabilityInferTask``).

Example:
    >>> report = check_bundle_for_monailabel("bundles/sos_staging")
    >>> report["ok"], report["labels"]
    (True, {'stage1_open': 0, 'stage2': 1, ...})
    >>> task = SuitabilityInfer("bundles/sos_staging", reference="ref.nii.gz", verifier="verifier.skops")
    >>> cam_file, result = task({"image": "case.nii.gz"})
    >>> result["label"], result["suitability"]["verdict"]
    ('stage3', 'suitable')
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.apps.integrations import SuitabilityPipeline

__all__ = ["check_bundle_for_monailabel", "SuitabilityInfer", "infer_type_from_name", "MONAILABEL_CONFIGS"]

#: infer configs ``BundleConstants.configs()`` looks for, in order
MONAILABEL_CONFIGS = ("inference.json", "inference.yaml")
_PRE_KEYS = ("preprocessing", "pre_transforms")
_POST_KEYS = ("postprocessing", "post_transforms")


def infer_type_from_name(name: str) -> str:
    """The infer type ``BundleInferTask._get_type`` gives a bundle directory when the app passes no ``type``.

    Example:
        >>> infer_type_from_name("sos_staging"), infer_type_from_name("sos_classification")
        ('segmentation', 'classification')
    """
    name = (name or "").lower()
    for key in ("deepedit", "deepgrow", "detection", "segmentation", "classification"):
        if key in name:
            return key
    return "segmentation"


def _recommended_type(pred: Mapping[str, Any]) -> str:
    fmt, kind = str(pred.get("format", "")).lower(), str(pred.get("type", "")).lower()
    if fmt in ("classes", "regression") or kind in ("probabilities", "scores", "logits"):
        return "classification"
    return "segmentation"


def check_bundle_for_monailabel(
    bundle_root: str | os.PathLike, *, instantiate: bool = True, strict: bool = False
) -> dict[str, Any]:
    """Check a bundle against what MONAI Label's ``BundleInferTask`` reads, without MONAI Label.

    Args:
        bundle_root: bundle directory.
        instantiate: also build ``network_def``, the transforms and the inferer, and run the network once on zeros of
            the declared input shape (its output width must match the labels).
        strict: raise ``ValueError`` listing the problems instead of returning them.

    Returns:
        Dict with ``ok`` (no problem), ``problems`` (what makes ``BundleInferTask`` fail or ignore the bundle),
        ``warnings`` (what works but needs care), ``config`` (file used), ``key_image``/``key_pred`` (first
        ``network_data_format`` input/output), ``labels`` (``{name: index}`` as MONAI Label builds them),
        ``dimension``, ``pre_keys``/``post_keys``/``inferer`` (config keys found), ``type_from_name`` (what the stock
        ``monaibundle`` app makes of the directory name), ``recommended_type`` and ``has_weights``.

    Example:
        >>> check_bundle_for_monailabel("bundles/ceph_class3")["dimension"]
        2
    """
    root = Path(bundle_root)
    problems: list[str] = []
    warnings: list[str] = []
    report: dict[str, Any] = {"bundle": str(root), "problems": problems, "warnings": warnings}
    configs = [c for c in MONAILABEL_CONFIGS if (root / "configs" / c).is_file()]
    if not configs:
        problems.append(f"no infer config: none of {list(MONAILABEL_CONFIGS)} in {root / 'configs'}")
    report["config"] = str(root / "configs" / configs[0]) if configs else None

    meta_path = root / "configs" / "metadata.json"
    metadata: dict[str, Any] = {}
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        problems.append(f"{meta_path} is missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{meta_path} is not valid JSON: {err}")
    ndf = metadata.get("network_data_format", {}) if isinstance(metadata, dict) else {}
    inputs, outputs = ndf.get("inputs") or {}, ndf.get("outputs") or {}
    if metadata and not (isinstance(inputs, dict) and inputs):
        problems.append(f"{meta_path}: network_data_format.inputs is missing or empty")
    if metadata and not (isinstance(outputs, dict) and outputs):
        problems.append(f"{meta_path}: network_data_format.outputs is missing or empty")
    labels: dict[str, int] = {}
    pred: dict[str, Any] = {}
    if isinstance(inputs, dict) and inputs and isinstance(outputs, dict) and outputs:
        report["key_image"], image = next(iter(inputs.items()))
        report["key_pred"], pred = next(iter(outputs.items()))
        channel_def = pred.get("channel_def") or {}
        if not channel_def:
            problems.append(
                f"{meta_path}: outputs.{report['key_pred']}.channel_def is empty: MONAI Label gets no labels"
            )
        for k, v in channel_def.items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                problems.append(f"{meta_path}: channel_def key {k!r} is not an integer")
                continue
            if str(v).lower() != "background":
                labels[str(v).lower()] = idx
        if len(labels) != len({str(v).lower() for v in channel_def.values()}):
            warnings.append("channel_def names repeat (case-insensitively): MONAI Label keeps the last index")
        num = pred.get("num_channels")
        if num is not None and channel_def and int(num) != len(channel_def):
            problems.append(
                f"{meta_path}: outputs.{report['key_pred']} has num_channels {num} but {len(channel_def)} names"
            )
        shape = image.get("spatial_shape")
        report["dimension"] = len(shape) if shape else 3
        report["input_shape"] = [int(image.get("num_channels", 1)), *(shape or [])]
    report["labels"] = labels
    report["type_from_name"] = infer_type_from_name(root.resolve().name)
    report["recommended_type"] = _recommended_type(pred)
    if report["recommended_type"] != report["type_from_name"]:
        warnings.append(
            f"the stock monaibundle app treats {root.resolve().name!r} as {report['type_from_name']!r} (from the "
            f"directory name); this bundle (output format {pred.get('format', '?')!r}) needs "
            f"type={report['recommended_type']!r} and "
            "add_post_restore=False (register SuitabilityInferTask or BundleInferTask(..., type=..., "
            "add_post_restore=False) in a custom app)"
        )
    report["has_weights"] = any((root / "models" / f).is_file() for f in ("model.pt", "model.ts"))
    if not report["has_weights"]:
        warnings.append("no models/model.pt or models/model.ts: BundleInferTask ignores the bundle until it is trained")

    if report["config"] is not None:
        _check_config(Path(report["config"]), root, report, instantiate)
    report["ok"] = not problems
    if strict and problems:
        raise ValueError(f"bundle {root} does not work with MONAI Label's BundleInferTask: " + "; ".join(problems))
    return report


def _check_config(cfg: Path, root: Path, report: dict[str, Any], instantiate: bool) -> None:
    """The config keys ``BundleInferTask`` parses (network, pre/post transforms, inferer), parsed as it does."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, LoadImaged

    problems, warnings = report["problems"], report["warnings"]
    parser = ConfigParser()
    try:
        parser.read_config(str(cfg))
    except Exception as err:
        problems.append(f"{cfg} cannot be read: {err}")
        return
    parser.config.update({"bundle_root": str(root)})  # as BundleInferTask._load_bundle_config does
    if "network_def" not in parser:
        problems.append(f"{cfg} defines no 'network_def'")
    report["pre_keys"] = [k for k in _PRE_KEYS if parser.get(k)]
    report["post_keys"] = [k for k in _POST_KEYS if parser.get(k)]
    report["inferer"] = "inferer" if parser.get("inferer") else None
    if not report["pre_keys"]:
        problems.append(f"{cfg} defines none of {list(_PRE_KEYS)}: MONAI Label would feed the raw request")
    if not report["post_keys"]:
        warnings.append(f"{cfg} defines none of {list(_POST_KEYS)}: the prediction stays raw logits")
    if "device" not in parser:
        warnings.append(f"{cfg} has no 'device' key: MONAI Label cannot move the bundle to the requested device")
    if not instantiate:
        return

    def parsed(key: str) -> Any:
        try:
            return parser.get_parsed_content(key, instantiate=True)
        except Exception as err:
            problems.append(f"{cfg}: {key!r} cannot be instantiated: {type(err).__name__}: {err}")
            return None

    network = parsed("network_def") if "network_def" in parser else None
    for key in report["pre_keys"][-1:]:  # BundleInferTask keeps the last key found
        pre = parsed(key)
        if pre is None:
            continue
        transforms = list(pre.transforms) if isinstance(pre, Compose) else list(pre) if isinstance(pre, list) else []
        if not any(isinstance(t, LoadImaged) for t in transforms):
            problems.append(f"{cfg}: {key!r} has no LoadImaged: MONAI Label passes the image as a file path")
        elif not isinstance(transforms[0], LoadImaged):
            warnings.append(f"{cfg}: {key!r} does not start with LoadImaged")
    for key in report["post_keys"][-1:]:
        parsed(key)
    if report["inferer"]:
        parsed("inferer")
    if isinstance(network, torch.nn.Module) and report.get("input_shape") and report["labels"]:
        shape = report["input_shape"]
        try:
            with torch.no_grad():
                out = network.eval()(torch.zeros(1, *shape))
        except Exception as err:
            problems.append(f"network_def does not run on the declared input (1, {shape}): {type(err).__name__}: {err}")
            return
        width = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim >= 2 else None
        n = len(report["labels"])
        if width is not None and width != n and report["recommended_type"] == "classification":
            problems.append(f"network_def gives {width} outputs for {n} labels in channel_def")


# ----------------------------------------------------------------------------------------------------------------------
# the infer task, without MONAI Label
# ----------------------------------------------------------------------------------------------------------------------
class SuitabilityInfer:
    """MONAI Label infer logic: label, probabilities, CAM NIfTI and suitability verdict for one request.

    Args:
        bundle_root: bundle directory.
        reference: reference map for the similarity features (``None``: no features).
        verifier: fitted ``SuitabilityVerifier`` (``None``: verdict ``"unverified"``).
        output_dir: where result files go (default: a new temporary directory; MONAI Label moves or deletes the
            result file after answering).
        description: text shown by MONAI Label (default: the bundle's ``description``).
        kwargs: further :class:`~monai_gamverify.apps.integrations.SuitabilityPipeline` arguments (``overrides``,
            ``checkpoint``, ``layer``, ``method``, ``threshold``, ``garbage_threshold``, ``device`` ...).

    Example:
        >>> infer = SuitabilityInfer("bundles/sos_staging")
        >>> cam_file, result = infer({"image": "case.nii.gz"})
        >>> result["label"], result["probabilities"]["stage3"], result["suitability"]["verdict"]
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        *,
        reference: str | os.PathLike | None = None,
        verifier: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        description: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.pipeline = SuitabilityPipeline(bundle_root, reference=reference, verifier=verifier, **kwargs)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        meta = self.pipeline.bundle.metadata
        self.description = description or str(meta.get("description") or meta.get("name") or "gamverify bundle")
        self.labels = self.pipeline.label_map()
        self.dimension = self.pipeline.spatial_dims or 3
        self.version = meta.get("version")

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run one request.

        Args:
            request: MONAI Label request; ``image`` is the image file path (the datastore's path); an optional
                ``result_name`` sets the file stem of the map.

        Returns:
            ``(cam NIfTI path, result json)``; the json has ``label`` (class name), ``label_index``,
            ``probabilities``, ``cam`` (path), ``garbage`` (``None`` without a garbage class), ``suitability``
            (``verdict``, ``p_suitable``, ``features``, ``threshold``) and ``latencies`` (seconds).
        """
        if not isinstance(request, Mapping):
            raise TypeError(f"request must be a dict, got {type(request).__name__}")
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"request['image'] must be an image file path, got {type(image).__name__}")
        start = time.perf_counter()
        out_dir = self.output_dir or Path(tempfile.mkdtemp(prefix="gamverify_infer_"))
        res = self.pipeline.run(image, out_dir, name=request.get("result_name"))
        result = {
            "label": res["prediction_name"],
            "label_index": res["prediction"],
            "probabilities": res.get("probabilities"),
            "outputs": res.get("outputs"),
            "cam": res["cam"],
            "cam_layer": res["cam_layer"],
            "cam_method": res["cam_method"],
            "garbage": res["garbage"],
            "suitability": {
                "verdict": res["verdict"],
                "p_suitable": res["p_suitable"],
                "features": res["features"],
                "threshold": self.pipeline.threshold,
            },
            "latencies": {"total": round(time.perf_counter() - start, 3)},
        }
        return res["cam"], {k: v for k, v in result.items() if not (k == "outputs" and v is None)}

    def info(self) -> dict[str, Any]:
        """What MONAI Label shows for the task."""
        return {
            "type": "classification",
            "labels": self.labels,
            "dimension": self.dimension,
            "description": self.description,
            "version": self.version,
            "config": self.pipeline.describe(),
        }


# ----------------------------------------------------------------------------------------------------------------------
# the MONAI Label subclass, built only when monailabel imports
# ----------------------------------------------------------------------------------------------------------------------
_TASK_CLASS: type | None = None


def _build_task_class() -> type:
    try:
        from monailabel.interfaces.tasks.infer_v2 import InferType
        from monailabel.tasks.infer.basic_infer import BasicInferTask
    except ImportError as err:
        raise ImportError(
            "SuitabilityInferTask needs MONAI Label (pip install monailabel, in its own environment: it pins "
            f"numpy<2); the core logic without it is SuitabilityInfer. ({err})"
        ) from err

    class SuitabilityInferTask(BasicInferTask):
        """MONAI Label infer task: bundle prediction + Grad-CAM NIfTI (result file) + suitability verdict (json).

        Args:
            path: bundle directory.
            conf: the app's ``conf`` (``--conf`` options); ``gamverify_reference``, ``gamverify_verifier`` and
                ``gamverify_threshold`` are read from it when the arguments are not given.
            reference: reference map file.
            verifier: fitted verifier (``.skops``).
            kwargs: further :class:`SuitabilityInfer` arguments.

        Example:
            >>> infers["sos_staging_gamverify"] = SuitabilityInferTask(bundle_dir, self.conf,
            ...                                                     verifier="verify/verifier.skops",
            ...                                                     reference="verify/reference_map.nii.gz")
        """

        def __init__(
            self,
            path: str | os.PathLike,
            conf: Mapping[str, Any] | None = None,
            reference: str | os.PathLike | None = None,
            verifier: str | os.PathLike | None = None,
            **kwargs: Any,
        ) -> None:
            conf = dict(conf or {})
            reference = reference or conf.get("gamverify_reference") or None
            verifier = verifier or conf.get("gamverify_verifier") or None
            if "gamverify_threshold" in conf and "threshold" not in kwargs:
                kwargs["threshold"] = float(conf["gamverify_threshold"])
            self.core = SuitabilityInfer(path, reference=reference, verifier=verifier, **kwargs)
            model = Path(path) / "models" / "model.pt"
            super().__init__(
                path=str(model) if model.is_file() else None,
                network=self.core.pipeline.bundle.network,
                type=InferType.CLASSIFICATION,
                labels=self.core.labels,
                dimension=self.core.dimension,
                description=self.core.description,
                config={"gamverify": self.core.pipeline.describe()},
            )

        def is_valid(self) -> bool:
            return True

        def pre_transforms(self, data: Any = None) -> list:
            pre = self.core.pipeline.preprocessing
            return list(getattr(pre, "transforms", [pre]))

        def post_transforms(self, data: Any = None) -> list:
            return []

        def info(self) -> dict[str, Any]:
            i = super().info()
            i["version"] = self.core.version
            return i

        def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str, dict[str, Any]]:
            req = dict(request)
            device = req.get("device")
            if isinstance(device, str) and device:
                dev = torch.device("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
                self.core.pipeline.bundle.network.to(dev)
                if self.core.pipeline.reference is not None:
                    self.core.pipeline.reference = self.core.pipeline.reference.to(dev)
            result_file, result_json = self.core(req)
            result_json["label_names"] = self.labels
            return result_file, result_json

    return SuitabilityInferTask


def __getattr__(name: str) -> Any:
    global _TASK_CLASS
    if name == "SuitabilityInferTask":
        if _TASK_CLASS is None:
            _TASK_CLASS = _build_task_class()
        return _TASK_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
