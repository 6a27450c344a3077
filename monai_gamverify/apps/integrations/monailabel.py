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

# long module: the MONAI Label bundle check, app writer and task options: one optional front end
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.apps.integrations.infer import SuitabilityInfer
from monai_gamverify.bundle import load_checkpoint

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
