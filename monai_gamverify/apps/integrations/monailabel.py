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

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from monai_gamverify.apps.integrations import SuitabilityPipeline
from monai_gamverify.bundle import load_checkpoint
from monai_gamverify.io import save_map, save_nifti
from monai_gamverify.visualize.segcam import bundle_activation

__all__ = [
    "check_bundle_for_monailabel",
    "SuitabilityInfer",
    "infer_type_from_name",
    "MONAILABEL_CONFIGS",
    "find_bundles",
    "task_options",
    "write_app",
    "APP_DIR",
]

logger = logging.getLogger(__name__)
#: the MONAI Label app shipped with the package (``main.py``); :func:`write_app` copies it
APP_DIR = Path(__file__).resolve().parent / "monailabel_app"

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
    bundle_root: str | os.PathLike,
    *,
    instantiate: bool = True,
    strict: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check a bundle against what MONAI Label's ``BundleInferTask`` reads, without MONAI Label.

    Args:
        bundle_root: bundle directory.
        instantiate: also build ``network_def``, the transforms and the inferer, and run the network once on zeros of
            the declared input shape (its output width must match the labels).
        strict: raise ``ValueError`` listing the problems instead of returning them.
        overrides: config overrides the server will apply (``--conf gamverify_overrides`` of the shipped app); with
            ``instantiate``, ``models/model.pt`` must load into ``network_def`` built with them (a bundle trained
            with ``--network_name small_cnn`` needs ``{"network_name": "small_cnn"}``).

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
        _check_config(Path(report["config"]), root, report, instantiate, dict(overrides or {}))
    report["ok"] = not problems
    if strict and problems:
        raise ValueError(f"bundle {root} does not work with MONAI Label's BundleInferTask: " + "; ".join(problems))
    return report


def _check_config(cfg: Path, root: Path, report: dict[str, Any], instantiate: bool, overrides: dict[str, Any]) -> None:
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
    if overrides:
        parser.update(overrides)
    report["overrides"] = overrides
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
    weights = root / "models" / "model.pt"
    if isinstance(network, torch.nn.Module) and weights.is_file():
        try:
            load_checkpoint(network, weights)
            report["weights_load"] = True
        except ValueError as err:
            report["weights_load"] = False
            hint = f" with overrides {overrides}" if overrides else " (no overrides given: was it trained with some?)"
            problems.append(f"{weights} does not load into network_def{hint}: {err}")
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
# the shipped app: which bundles, with which options
# ----------------------------------------------------------------------------------------------------------------------
def find_bundles(folder: str | os.PathLike, only: str | Sequence[str] | None = None) -> dict[str, Path]:
    """The bundles in ``folder`` (each subfolder with ``configs/inference.json``), by folder name; no download.

    Args:
        folder: the app's bundle folder (``--conf gamverify_bundles``, default ``<app>/model``).
        only: names to keep (MONAI Label's ``--conf models a,b``; ``"all"`` or ``None`` keeps every bundle).

    Returns:
        ``{name: bundle path}``, sorted by name.

    Raises:
        FileNotFoundError: the folder is missing, holds no bundle, or lacks a requested one (listing what it has).

    Example:
        >>> find_bundles("apps/gamverify/model")
        {'sos_staging': PosixPath('apps/gamverify/model/sos_staging')}
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"bundle folder {root} does not exist (set --conf gamverify_bundles DIR)")
    found = {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and any((p / "configs" / c).is_file() for c in MONAILABEL_CONFIGS)
    }
    if isinstance(only, str):
        only = [] if only.strip().lower() in ("", "all") else [n.strip() for n in only.split(",") if n.strip()]
    if only:
        missing = [n for n in only if n not in found]
        if missing:
            raise FileNotFoundError(f"bundle(s) {missing} not in {root}; it holds {sorted(found)}")
        found = {n: found[n] for n in only}
    if not found:
        raise FileNotFoundError(f"no bundle (configs/inference.json) under {root}")
    return found


def _conf_json(conf: Mapping[str, Any], key: str) -> Any:
    value = conf.get(key)
    if value is None or isinstance(value, (dict, list)):
        return value
    text = str(value).strip()
    if not text.startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--conf {key} is not valid JSON: {err}") from err


def task_options(conf: Mapping[str, Any], name: str, names: Sequence[str] = ()) -> dict[str, Any]:
    """:class:`SuitabilityInfer` arguments for bundle ``name`` from the app's ``--conf`` options.

    Each option is either one value for every bundle, or a JSON object ``{bundle name: value}``:

    - ``gamverify_overrides``: bundle config overrides, JSON (``{"network_name": "small_cnn"}`` for all, or
      ``{"sos_staging": {"network_name": "small_cnn"}}``);
    - ``gamverify_reference``, ``gamverify_verifier``: reference map and fitted verifier files;
    - ``gamverify_screen``: a saved in-distribution screen (``gamverify screen fit``): the answer's ``screen`` holds
      ``in_distribution``, ``p_value`` and ``reasons``, and the verdict is ``out of distribution`` first;
    - ``gamverify_threshold``, ``gamverify_garbage_threshold``: numbers;
    - ``gamverify_label``: segmentation bundles, the label whose Seg-Grad-CAM is computed (name or channel; default
      the first channel after the background; a request's ``label`` param overrides it);
    - ``gamverify_allow_random_weights``: ``true`` serves a bundle without ``models/model.pt`` (demo / test only).

    Args:
        conf: the app's ``conf``.
        name: the bundle's name.
        names: every served bundle's name (tells a per-bundle object from a plain overrides object).

    Returns:
        Keyword arguments (only those set).

    Example:
        >>> task_options({"gamverify_overrides": '{"network_name": "small_cnn"}'}, "sos_staging")
        {'overrides': {'network_name': 'small_cnn'}}
    """
    names = set(names) | {name}
    out: dict[str, Any] = {}
    over = _conf_json(conf, "gamverify_overrides")
    if over is not None:
        if not isinstance(over, dict):
            raise ValueError(f"--conf gamverify_overrides must be a JSON object, got {over!r}")
        if over and set(over) <= names:  # per bundle
            over = over.get(name)
        if over:
            out["overrides"] = dict(over)
    for key, arg, cast in (
        ("gamverify_reference", "reference", str),
        ("gamverify_verifier", "verifier", str),
        ("gamverify_screen", "screen", str),
        ("gamverify_threshold", "threshold", float),
        ("gamverify_garbage_threshold", "garbage_threshold", float),
        ("gamverify_label", "label", str),
    ):
        value = _conf_json(conf, key)
        if isinstance(value, dict):
            value = value.get(name)
        if value is None or value == "":
            continue
        try:
            out[arg] = cast(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--conf {key} must be a {cast.__name__}, got {value!r}") from err
    if str(conf.get("gamverify_allow_random_weights", "")).strip().lower() in ("1", "true", "yes"):
        out["require_weights"] = False
    return out


def write_app(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Copy the shipped MONAI Label app (``main.py``) to ``out`` and create its bundle folder ``out/model``.

    Args:
        out: the app folder to create (what ``monailabel start_server --app`` takes).
        overwrite: replace an existing ``main.py``.

    Returns:
        The app folder.

    Raises:
        FileExistsError: ``out/main.py`` exists and ``overwrite`` is off.

    Example:
        >>> write_app("apps/gamverify")  # then copy bundles into apps/gamverify/model/
    """
    dest = Path(out)
    target = dest / "main.py"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists: pass --overwrite to replace it")
    (dest / "model").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_DIR / "main.py", target)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_gamverify.apps.integrations.monailabel app --out DIR`` (writes the app) or
    ``check BUNDLE [--overrides JSON]`` (prints the :func:`check_bundle_for_monailabel` report as JSON).

    Returns:
        Exit status: 0, or 1 when ``check`` finds problems.
    """
    parser = argparse.ArgumentParser(prog="python -m monai_gamverify.apps.integrations.monailabel")
    sub = parser.add_subparsers(dest="cmd", required=True)
    app = sub.add_parser("app", help="write the MONAI Label app folder")
    app.add_argument("--out", required=True, help="app folder to create (e.g. apps/gamverify)")
    app.add_argument("--overwrite", action="store_true", help="replace an existing main.py")
    chk = sub.add_parser("check", help="check a bundle against what MONAI Label reads")
    chk.add_argument("bundle")
    chk.add_argument("--overrides", default=None, help="config overrides as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "app":
        dest = write_app(args.out, overwrite=args.overwrite)
        sys.stdout.write(
            f"wrote {dest / 'main.py'}; copy trained bundles into {dest / 'model'}/ and run:\n"
            f"  monailabel start_server --app {dest} --studies IMAGES_DIR --host 127.0.0.1\n"
        )
        return 0
    overrides = json.loads(args.overrides) if args.overrides else None
    report = check_bundle_for_monailabel(args.bundle, overrides=overrides)
    sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["ok"] else 1


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
        label: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.pipeline = SuitabilityPipeline(bundle_root, reference=reference, verifier=verifier, label=label, **kwargs)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        meta = self.pipeline.bundle.metadata
        self.description = description or str(meta.get("description") or meta.get("name") or "gamverify bundle")
        self.labels = self.pipeline.label_map()
        self.dimension = self.pipeline.spatial_dims or 3
        self.version = meta.get("version")
        self.task = self.pipeline.task
        self.label = self.pipeline.label
        if self.task == "segmentation":
            # MONAI Label's segmentation labels: name -> value in the label file, background (0) implied
            shift = 1 if bundle_activation(self.pipeline.bundle) == "sigmoid" else 0
            self.labels = {n: i + shift for i, n in enumerate(self.pipeline.bundle.class_names) if i + shift > 0}

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run one request.

        Args:
            request: MONAI Label request; ``image`` is the image file path (the datastore's path); an optional
                ``result_name`` sets the file stem of the map.

        Returns:
            ``(cam NIfTI path, result json)``. The file is MONAI Label's result file: the server sends it (the body
            of ``output=image``, the ``image`` part of the ``output=all`` multipart answer) and deletes it. Without
            ``output_dir`` it is a single temporary file (no folder is left behind). The json has ``label`` (class
            name), ``label_index``, ``probabilities``, ``cam`` (``in_response``, ``shape``, ``layer``, ``method``,
            and ``path`` only when ``output_dir`` was given: the server's temporary file is gone once answered),
            ``garbage`` (``None`` without a garbage class), ``screen`` (``in_distribution``, ``p_value``, ``reasons``;
            ``None`` values without a screen), ``suitability`` (``verdict``, ``p_suitable``,
            ``features``, ``threshold``) and ``latencies`` (seconds).

        Raises:
            TypeError: ``request`` is not a dict.
            ValueError: no image path, an image that is not a file, or one the bundle cannot read or take (e.g. 2D
                for a 3D network); the message names the problem.
        """
        image = self._image(request)
        if self.task == "segmentation":
            return self._segment(request, image, explain=True)
        start = time.perf_counter()
        try:
            if self.output_dir is not None:
                res = self.pipeline.run(image, self.output_dir, name=request.get("result_name"))
                cam_file = res["cam"]
                shape = list(nib.load(cam_file).shape)
            else:  # one temporary file, written in place (no folder, no sync): the server removes it after answering
                engine = self.pipeline.engine
                raw, x = engine.load(image)
                found = engine.explain(x, raw, source=str(image))
                # the map goes back on the input grid and is compressed (zlib releases the GIL) while the
                # similarity features and the forest run here
                writing = self._writer().submit(_write_answer_map, engine, found)
                errors = engine.verify([found])
                cam_file, shape = writing.result()
                if errors[0] is not None:
                    os.unlink(cam_file)
                    raise errors[0]
                res = self.pipeline.result_dict(found, cam_file)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        result = {
            "label": res["prediction_name"],
            "label_index": res["prediction"],
            "probabilities": res.get("probabilities"),
            "outputs": res.get("outputs"),
            "cam": {
                "in_response": True,
                "path": cam_file if self.output_dir is not None else None,
                "shape": shape,
                "layer": res["cam_layer"],
                "method": res["cam_method"],
            },
            "cam_layer": res["cam_layer"],
            "cam_method": res["cam_method"],
            "garbage": res["garbage"],
            "screen": {
                "in_distribution": res.get("in_distribution"),
                "p_value": res.get("p_value"),
                "reasons": res.get("reasons"),
            },
            "suitability": {
                "verdict": res["verdict"],
                "p_suitable": res["p_suitable"],
                "features": res["features"],
                "threshold": self.pipeline.threshold,
            },
            "latencies": {"total": round(time.perf_counter() - start, 3)},
        }
        return cam_file, {k: v for k, v in result.items() if not (k == "outputs" and v is None)}

    def _segment(self, request: Mapping[str, Any], image: str | os.PathLike, explain: bool) -> tuple[str, dict]:
        """A segmentation bundle's answer (:meth:`SuitabilityPipeline.segment`): the label map on the input grid as
        the result file (what MONAI Label clients display), or with the request param ``result="cam"`` the
        Seg-Grad-CAM of the request's ``label`` (default: the app's); the json has the labels, their voxel counts,
        the explained label, the screen's answer and the verdict."""
        start = time.perf_counter()
        want = str(request.get("result", "label")).lower()
        if want not in ("label", "cam"):
            raise ValueError(f"request param result must be 'label' or 'cam', got {request.get('result')!r}")
        if want == "cam" and not explain:
            raise ValueError("the label-only route returns no CAM: use the full route")
        try:
            seg = self.pipeline.segment(image, label=request.get("label"), explain=explain)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        result: dict[str, Any] = {k: seg[k] for k in ("task", "labels", "voxels")}
        result["result"] = want
        fd, out_file = tempfile.mkstemp(prefix="gamverify_", suffix=f"_{want}.nii.gz")
        os.close(fd)
        try:
            if want == "label":
                save_nifti(seg["label_map"].to(torch.uint8), out_file, reference=seg["reference"], dtype=np.uint8)
            else:
                cam, ref = seg["cam_map"]
                save_map(cam, out_file, reference=ref, durable=False)
        except BaseException:
            os.unlink(out_file)
            raise
        if explain:
            result["cam"] = {
                "in_response": want == "cam",
                "label": seg["cam_label"],
                "label_index": seg["cam_label_index"],
                "shape": [int(v) for v in seg["cam_map"][0].shape[1:]],
                "layer": seg["cam_layer"],
                "method": seg["cam_method"],
            }
            result["screen"] = {k: seg[k] for k in ("in_distribution", "p_value", "reasons")}
            result["suitability"] = {
                "verdict": seg["verdict"],
                "p_suitable": seg["p_suitable"],
                "features": seg["features"],
                "threshold": self.pipeline.threshold,
            }
        result["latencies"] = {"total": round(time.perf_counter() - start, 3)}
        return out_file, result

    def _writer(self) -> ThreadPoolExecutor:
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gamverify-map")
        return self._pool

    @staticmethod
    def _image(request: Mapping[str, Any]) -> str | os.PathLike:
        if not isinstance(request, Mapping):
            raise TypeError(f"request must be a dict, got {type(request).__name__}")
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not str(image):
            raise ValueError(f"request['image'] must be an image file path, got {image!r}")
        if not Path(image).is_file():
            raise ValueError(f"image {str(image)!r} not found: not a datastore image id nor an existing file")
        return image

    def predict(self, request: Mapping[str, Any]) -> tuple[None, dict[str, Any]]:
        """The plain prediction: the bundle's preprocessing and one forward pass, no map, no verdict.

        The baseline the full request is timed against, and a cheap label-only route.

        Args:
            request: as :meth:`__call__`.

        Returns:
            ``(None, json)`` with ``label``, ``label_index``, ``probabilities`` and ``latencies``.

        Example:
            >>> _, result = infer.predict({"image": "case.nii.gz"})
        """
        image = self._image(request)
        if self.task == "segmentation":  # the label map alone: the bundle's inferer, no CAM
            return self._segment(request, image, explain=False)
        start = time.perf_counter()
        engine = self.pipeline.engine
        _, img = engine.load(image)  # the engine's reading, preprocessing and geometry checks
        x = img.unsqueeze(0).to(engine.device)
        with torch.inference_mode():
            out = engine.network(x.as_tensor() if hasattr(x, "as_tensor") else x)
        logits = out.float()[0]
        names = engine.names_for(int(logits.numel()))
        pred = int(logits.argmax())
        result: dict[str, Any] = {"label": names[pred], "label_index": pred}
        if logits.numel() > 1:
            result["probabilities"] = {n: float(p) for n, p in zip(names, logits.softmax(0).tolist())}
        else:
            result["outputs"] = [float(v) for v in logits.tolist()]
        result["latencies"] = {"total": round(time.perf_counter() - start, 3)}
        return None, result

    def info(self) -> dict[str, Any]:
        """What MONAI Label shows for the task."""
        return {
            "type": self.task,
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


def _write_answer_map(engine: Any, found: Any) -> tuple[str, list[int]]:
    """The map of an engine result on the input grid in a new temporary ``.nii.gz`` (path, spatial shape)."""
    cam, ref = engine.on_input_grid(found)
    fd, cam_file = tempfile.mkstemp(prefix="gamverify_", suffix="_cam.nii.gz")
    os.close(fd)
    try:
        save_map(cam, cam_file, reference=ref, durable=False)
    except BaseException:
        os.unlink(cam_file)
        raise
    return cam_file, [int(v) for v in cam.shape[1:]]


def _build_task_class() -> type:
    try:
        from monailabel.interfaces.tasks.infer_v2 import InferType
        from monailabel.tasks.infer.basic_infer import BasicInferTask
    except ImportError as err:
        raise ImportError(
            "SuitabilityInferTask needs MONAI Label (pip install monailabel, in its own environment: it pins "
            f"numpy<2); the core logic without it is SuitabilityInfer. ({err})"
        ) from err

    error_cls = _request_error_class()

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
            *,
            predict_only: bool = False,
            core: SuitabilityInfer | None = None,
            **kwargs: Any,
        ) -> None:
            conf = dict(conf or {})

            def one(key: str) -> Any:  # a value for every bundle; per-bundle objects are task_options' business
                value = _conf_json(conf, key)
                return None if isinstance(value, dict) or value == "" else value

            reference = reference or one("gamverify_reference")
            verifier = verifier or one("gamverify_verifier")
            if one("gamverify_threshold") is not None and "threshold" not in kwargs:
                kwargs["threshold"] = float(one("gamverify_threshold"))
            self.predict_only = bool(predict_only)
            # a shared core: the predict route and the full route of one bundle hold one network
            self.core = core or SuitabilityInfer(path, reference=reference, verifier=verifier, **kwargs)
            model = Path(path) / "models" / "model.pt"
            super().__init__(
                path=str(model) if model.is_file() else None,
                network=self.core.pipeline.bundle.network,
                type=InferType.SEGMENTATION if self.core.task == "segmentation" else InferType.CLASSIFICATION,
                labels=self.core.labels,
                dimension=self.core.dimension,
                description=("label only: " if self.predict_only else "") + self.core.description,
                config={},
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
            i["gamverify"] = {**self.core.pipeline.describe(), "predict_only": self.predict_only}
            return i

        def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str, dict[str, Any]]:
            req = dict(request)
            device = req.get("device")
            if isinstance(device, str) and device:
                dev = torch.device("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
                self.core.pipeline.bundle.network.to(dev)
                if self.core.pipeline.reference is not None:
                    self.core.pipeline.reference = self.core.pipeline.reference.to(dev)
            try:
                result_file, result_json = self.core.predict(req) if self.predict_only else self.core(req)
            except (ValueError, TypeError, FileNotFoundError) as err:  # the request's fault: 4xx with the message
                status = 404 if "not found" in str(err) else 422
                raise error_cls(f"model {self.core.pipeline.root.name}: {err}", status_code=status) from err
            result_json["label_names"] = self.labels
            return result_file, result_json

    return SuitabilityInferTask


_ERROR_CLASS: type | None = None


def _request_error_class() -> type:
    """``GamverifyRequestError``: a ``MONAILabelException`` (``MONAILabelError.INVALID_INPUT``) that is also a
    FastAPI ``HTTPException``, so that MONAI Label's server answers it with its 4xx status and the message instead of
    "500 Internal Server Error" (the server registers no handler for ``MONAILabelException`` itself)."""
    global _ERROR_CLASS
    if _ERROR_CLASS is not None:
        return _ERROR_CLASS
    try:
        from fastapi import HTTPException  # what MONAI Label's server (FastAPI) answers with status and detail
        from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
    except ImportError as err:
        raise ImportError(f"GamverifyRequestError needs MONAI Label (pip install monailabel). ({err})") from err

    class GamverifyRequestError(MONAILabelException, HTTPException):
        """A bad request: MONAI Label's exception type, answered as HTTP ``status_code`` (4xx) with ``msg``.

        Args:
            msg: what is wrong with the request.
            status_code: 400 (malformed), 404 (unknown image or model) or 422 (an image the model cannot take).
            error: the ``MONAILabelError`` code.

        Example:
            >>> raise GamverifyRequestError("image 'x' is not in the datastore", status_code=404)
        """

        def __init__(self, msg: str, status_code: int = 400, error: Any = MONAILabelError.INVALID_INPUT) -> None:
            if not 400 <= int(status_code) < 500:
                raise ValueError(f"a request error needs a 4xx status, got {status_code}")
            MONAILabelException.__init__(self, error, msg)
            HTTPException.__init__(self, status_code=int(status_code), detail=msg)

        def __str__(self) -> str:
            return str(self.msg)

    _ERROR_CLASS = GamverifyRequestError
    return _ERROR_CLASS


def __getattr__(name: str) -> Any:
    global _TASK_CLASS
    if name == "SuitabilityInferTask":
        if _TASK_CLASS is None:
            _TASK_CLASS = _build_task_class()
        return _TASK_CLASS
    if name == "GamverifyRequestError":
        return _request_error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
