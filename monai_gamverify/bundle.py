"""Load any MONAI bundle (JSON or YAML configs, its own ``scripts/`` package, ``model.pt`` or ``model.ts``
weights), find a CAM layer when the bundle names none, and tell a user what a bundle lacks (:func:`check_bundle`).

Weights are read safely: ``torch.load(weights_only=True)`` for ``model.pt``; a TorchScript ``model.ts`` is read with
``torch.jit.load`` only for its tensors (its ``state_dict``), which are loaded into the bundle's ``network_def``,
because forward hooks (which every CAM needs) cannot be registered on a TorchScript module
(``RuntimeError: register_forward_hook is not supported on ScriptModules``, torch 2.13).
"""

# long module: loading any MONAI bundle (configs, metadata, weights, input, CAM layer) is one object
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_gamverify.visualize.hooks import preserved_state, resolve_layers
from monai_gamverify.visualize.segcam import label_index

__all__ = [
    "PASSPORT_FORMAT",
    "PASSPORT_NAME",
    "read_passport",
    "passport_path",
    "BundleModel",
    "BundleReport",
    "LayerTrace",
    "check_bundle",
    "check_geometry",
    "geometry_problems",
    "declared_input",
    "find_cam_layer",
    "find_config",
    "label_index",
    "load_bundle",
    "load_checkpoint",
    "network_from_name",
    "read_metadata",
    "trace_layers",
]

logger = logging.getLogger(__name__)

#: inference config names tried in this order when the caller names none
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
METADATA_NAMES = ("metadata.json", "metadata.yaml", "metadata.yml")
#: spatial size used for a declared ``"k*n"`` axis when tracing: the smallest multiple of k that is >= this
_TRACE_MIN = 32


def network_from_name(network: str, network_args: dict | str | None = None) -> nn.Module:
    """Build a network from a ``monai.networks.nets`` name or a dotted path, with keyword arguments.

    Args:
        network: e.g. ``"resnet18"`` or ``"monai_gamverify.networks.nets.SmallCNN"``.
        network_args: keyword arguments as a dict or a JSON string.

    Returns:
        The network (random weights).

    Example:
        >>> net = network_from_name("resnet10", {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 2})
    """
    from monai.bundle import ConfigParser

    args = json.loads(network_args) if isinstance(network_args, str) else dict(network_args or {})
    target = network if "." in network else f"monai.networks.nets.{network}"
    try:
        return ConfigParser({"net": {"_target_": target, **args}}).get_parsed_content("net")
    except Exception as err:
        raise ValueError(f"cannot build network {target!r} with {args}: {err}") from err


# ---------------------------------------------------------------------------------------------------------- files
def _needs_yaml(path: Path) -> None:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # noqa: F401  (optional dependency: MONAI reads YAML configs with PyYAML)
        except ImportError as err:
            raise ImportError(f"{path} is a YAML config: install PyYAML (pip install pyyaml) to read it") from err


def find_config(bundle_root: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """The inference config of a bundle: ``config`` if given (a name under ``configs/`` or a path), else the first of
    ``configs/inference.json``, ``inference.yaml``, ``inference.yml`` that exists.

    Args:
        bundle_root: the bundle directory.
        config: config file name or path; ``None`` picks as above.

    Returns:
        The config path.

    Raises:
        FileNotFoundError: naming what was looked for.

    Example:
        >>> find_config("spleen_ct_segmentation")
        PosixPath('spleen_ct_segmentation/configs/inference.json')
    """
    root = Path(bundle_root)
    if not root.is_dir():
        raise FileNotFoundError(f"bundle root {root} is not a directory")
    if config is not None:
        p = Path(config)
        cand = p if p.is_file() else root / "configs" / p
        if not cand.is_file():
            raise FileNotFoundError(f"not a MONAI bundle config: {cand} is missing")
        return cand
    for name in CONFIG_NAMES:
        cand = root / "configs" / name
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"not a MONAI bundle: none of {', '.join(CONFIG_NAMES)} under {root / 'configs'}")


def read_metadata(bundle_root: str | os.PathLike) -> tuple[dict, Path]:
    """``configs/metadata.json`` (or ``.yaml``) of a bundle as a dict, with its path.

    Example:
        >>> meta, path = read_metadata("bundles/sos_staging")
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    for name in METADATA_NAMES:
        p = root / "configs" / name
        if p.is_file():
            _needs_yaml(p)
            meta = ConfigParser.load_config_file(str(p))
            return dict(meta), p
    raise FileNotFoundError(f"not a MONAI bundle: {root / 'configs' / 'metadata.json'} is missing")


def _add_bundle_to_path(root: Path) -> None:
    """Make a bundle's own ``scripts`` package importable, as ``monai.bundle`` does (bundle root on ``sys.path``).

    A ``scripts`` package imported earlier from another bundle is dropped from ``sys.modules`` so this bundle's
    ``scripts`` is the one its config gets.
    """
    if not (root / "scripts").is_dir():
        return
    resolved = str(root.resolve())
    if resolved in sys.path:
        sys.path.remove(resolved)
    sys.path.insert(1, resolved)
    mod = sys.modules.get("scripts")
    if mod is not None:
        where = [str(Path(p).resolve()) for p in (getattr(mod, "__path__", None) or [])]
        if not any(w.startswith(resolved) for w in where):
            for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
                del sys.modules[name]


def declared_input(metadata: dict, parser: Any = None) -> tuple[int | None, list[int | str] | None]:
    """Channels and spatial shape of the input a bundle declares (``network_data_format.inputs.<first>``); the
    spatial shape falls back to the config's ``inferer#roi_size``.

    Returns:
        ``(num_channels, spatial_shape)``; either is ``None`` when not declared. Entries of the shape may be
        strings like ``"16*n"`` (any multiple of 16).
    """
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    first = next(iter(inputs.values()), {}) if inputs else {}
    channels = first.get("num_channels")
    shape = first.get("spatial_shape")
    if not shape and parser is not None:
        for key in ("inferer#roi_size", "roi_size", "patch_size"):
            try:
                if key in parser:
                    shape = list(parser.get_parsed_content(key))
                    break
            except Exception:  # a key whose expression needs something absent here: not a declaration
                continue
    return (int(channels) if channels is not None else None), (list(shape) if shape else None)


def _concrete_shape(shape: list[int | str]) -> list[int]:
    out = []
    for s in shape:
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            out.append(int(s))
            continue
        m = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*|\s*n\s*\*\s*(\d+)\s*", str(s))
        if not m:
            try:
                out.append(int(str(s)))
            except ValueError:
                raise ValueError(f"cannot read spatial_shape entry {s!r} (expected an int or 'k*n')") from None
            continue
        k = int(m.group(1) or m.group(2))
        out.append(k * max(2, math.ceil(_TRACE_MIN / k)))
    return out


# ---------------------------------------------------------------------------------------------------------- weights
def _state_from_file(p: Path, map_location: Any) -> dict:
    if p.suffix == ".ts":
        try:
            scripted = torch.jit.load(str(p), map_location=map_location)
        except Exception as err:
            raise ValueError(f"cannot read TorchScript file {p}: {type(err).__name__}: {err}") from None
        return {k: v for k, v in scripted.state_dict().items()}
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:
        # torch's message suggests weights_only=False: never show that advice; keep only what names the cause
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = f"{type(err).__name__}: {lines[0] if lines else ''}"
        cause = next((ln for ln in lines if "Unsupported global" in ln), first).split(" Please use")[0]
        cause = re.sub(r"\x1b\[[0-9;]*m", "", cause)
        raise ValueError(f"cannot load checkpoint {p} safely (weights_only=True): {cause}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {p} does not hold a state dict")
    return state


def load_checkpoint(network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load weights into ``network`` from a bundle's ``.pt`` file (plain state dict or ``{"model": ...}``) or from
    the tensors of a TorchScript ``.ts`` file.

    Only tensors and plain containers are accepted from ``.pt`` (``torch.load(weights_only=True)``); a file
    holding code is refused.

    Example:
        >>> load_checkpoint(net, "bundle/models/model.pt")
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    state = _state_from_file(p, map_location)
    # DataParallel / DDP checkpoints: keys prefixed "module."
    if (
        state
        and all(k.startswith("module.") for k in state)
        and not any(k.startswith("module.") for k in network.state_dict())
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {p} does not fit the network: {err}") from err
    return network


def _default_checkpoint(root: Path) -> Path | None:
    for name in ("model.pt", "model.ts"):
        if (root / "models" / name).is_file():
            return root / "models" / name
    return None


# ---------------------------------------------------------------------------------------------------------- layers
@dataclass
class LayerTrace:
    """One module's output in a traced forward pass.

    Attributes:
        name: as in ``named_modules()``.
        shape: output shape (``None`` when the output is not a tensor).
        order: completion order (a container completes after its children).
        calls: how many times the module ran (a module run twice cannot be a CAM layer).
    """

    name: str
    shape: tuple[int, ...] | None
    order: int
    calls: int = 1


def trace_layers(network: nn.Module, x: torch.Tensor) -> tuple[list[LayerTrace], Any]:
    """One no-grad forward of ``x`` with a hook on every module; returns the traces (completion order) and the
    network's output. The model's flags are restored and every hook removed.

    Example:
        >>> traces, out = trace_layers(net, torch.zeros(1, 1, 64, 64))
    """
    traces: dict[str, LayerTrace] = {}
    handles = []
    counter = [0]

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            counter[0] += 1
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            if name in traces:
                t = traces[name]
                t.calls, t.order, t.shape = t.calls + 1, counter[0], shape
            else:
                traces[name] = LayerTrace(name, shape, counter[0])

        return fn

    try:
        for name, module in network.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name)))
        with preserved_state(network), torch.no_grad():
            out = network(x)
    finally:
        for h in handles:
            h.remove()
    return sorted(traces.values(), key=lambda t: t.order), out


def find_cam_layer(
    network: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    *,
    prefer: str = "last",
    device: str | torch.device | None = None,
) -> tuple[str, dict]:
    """Choose a CAM layer by one traced forward of a dummy input of the declared shape.

    The rule: among modules other than the network itself that run exactly once and return a tensor
    (B, C, *spatial) with the input's number of spatial axes and more than one voxel on every axis, drop the
    output head (modules whose output has the shape of the network's output: for a segmentation network, the
    final convolution and its wrappers); take the last to complete (``prefer="last"``: for a classifier the last
    feature map before global pooling/flatten; for a segmentation network the last decoder features before the
    head), or the one with the fewest voxels, last among equals (``prefer="deepest"``: the bottleneck).

    Args:
        network: the network.
        input_shape: (C, *spatial) of one input.
        prefer: ``"last"`` or ``"deepest"``.
        device: where to run the dummy forward (default: the network's parameters' device).

    Returns:
        ``(layer_name, info)``; ``info`` holds ``task`` (``classification`` or ``segmentation``), ``shape`` (the
        layer's output shape), ``total_stride`` (input size / smallest feature size per axis) and ``output_shape``.

    Raises:
        ValueError: when no module qualifies (e.g. a transformer with token outputs), naming why.

    Example:
        >>> name, info = find_cam_layer(net, (1, 64, 64))
    """
    if prefer not in ("last", "deepest"):
        raise ValueError(f"prefer must be 'last' or 'deepest', got {prefer!r}")
    param = next(network.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    spatial = tuple(int(s) for s in input_shape[1:])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, int(input_shape[0]), *spatial), generator=gen).to(dev)
    traces, out = trace_layers(network, x)
    nd = len(spatial)
    out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    seg = out_shape is not None and len(out_shape) == nd + 2 and tuple(out_shape[2:]) == spatial
    cands = [
        t
        for t in traces
        if t.calls == 1 and t.shape is not None and len(t.shape) == nd + 2 and all(s > 1 for s in t.shape[2:])
    ]
    if seg:
        cands = [t for t in cands if t.shape != out_shape]
    if not cands:
        raise ValueError(
            f"no module of {type(network).__name__} returns a feature map with more than one voxel per axis for an "
            f"input of shape {tuple(x.shape)}; name a layer (cam_layer) explicitly"
        )
    if prefer == "last":
        chosen = cands[-1]
    else:
        smallest = min(math.prod(t.shape[2:]) for t in cands)
        chosen = [t for t in cands if math.prod(t.shape[2:]) == smallest][-1]
    # the total stride: input size / the smallest feature map on each axis, global pooling (1 voxel per axis) excluded
    spatial_feats = [
        t for t in traces if t.shape is not None and len(t.shape) == nd + 2 and any(s > 1 for s in t.shape[2:])
    ]
    stride = tuple(
        max([1] + [math.ceil(spatial[i] / max(1, t.shape[2 + i])) for t in spatial_feats]) for i in range(nd)
    )
    info = {
        "task": "segmentation" if seg else "classification",
        "shape": chosen.shape,
        "total_stride": stride,
        "output_shape": out_shape,
    }
    logger.info(
        "CAM layer %r chosen automatically (%s, output %s, rule %r)", chosen.name, info["task"], chosen.shape, prefer
    )
    return chosen.name, info


# ---------------------------------------------------------------------------------------------------------- bundle
#: the bundle passport (:mod:`monai_gamverify.handlers.passport`): what training recorded next to the weights
PASSPORT_NAME = "passport.json"
PASSPORT_FORMAT = "monai-gamverify/passport/1"


def passport_path(bundle_root: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """Where the passport of a bundle's checkpoint lives: ``models/passport.json`` for the bundle's own weights
    (``model.pt`` / ``model.ts`` or none given), ``models/passport_<stem>.json`` for another checkpoint of the same
    bundle (e.g. the K+1 model ``model_garbage.pt``), so that training one never rewrites the other's."""
    name = Path(checkpoint).name if checkpoint is not None else "model.pt"
    stem = Path(name).stem
    fname = PASSPORT_NAME if stem == "model" else f"passport_{stem}.json"
    return Path(bundle_root) / "models" / fname


def read_passport(bundle_root: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> dict:
    """The passport of a bundle's checkpoint (:func:`passport_path`; written when it was trained with this
    package's ``train.json``), or ``{}`` when there is none; an unreadable or foreign file raises ``ValueError``
    naming it."""
    path = passport_path(bundle_root, checkpoint)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"bundle passport {path} is not readable JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != PASSPORT_FORMAT:
        raise ValueError(f"{path} is not a monai-gamverify bundle passport (format {PASSPORT_FORMAT!r})")
    return doc


@dataclass
class BundleModel:
    """A network instantiated from a bundle, with what the package needs to explain it.

    Attributes:
        network: the ``network_def`` with weights loaded (eval mode).
        root: bundle root directory.
        metadata: ``configs/metadata.json`` content.
        target_layer: default CAM layer (config key ``cam_layer``, else metadata ``gamverify.target_layer``, else
            found automatically: :func:`find_cam_layer`).
        feature_layers: early layers for feature-map verification (config ``feature_layers``, else metadata).
        class_names: output names from ``network_data_format.outputs.pred.channel_def``.
        parser: the ``monai.bundle.ConfigParser`` holding the inference config.
        config_path: the inference config read.
        checkpoint: the weights file loaded (``None``: random initialisation).
        layer_source: ``"config"``, ``"metadata"``, ``"auto"`` or ``None`` (no layer).
        layer_error: why no layer was found automatically (``None`` otherwise).
        passport: ``models/passport.json`` (training settings, validation confidences, screen), ``{}`` if none.
    """

    network: nn.Module
    root: Path
    metadata: dict
    target_layer: str | None = None
    feature_layers: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    parser: Any = None
    config_path: Path | None = None
    checkpoint: Path | None = None
    layer_source: str | None = None
    layer_error: str | None = None
    passport: dict = field(default_factory=dict)
    _trace_info: dict | None = field(default=None, repr=False)

    def preprocessing(self) -> Any:
        """The bundle's inference ``preprocessing`` transform, or ``None`` when it defines none."""
        return self.parser.get_parsed_content("preprocessing") if "preprocessing" in self.parser else None

    def postprocessing(self) -> Any:
        """The bundle's ``postprocessing`` transform, or ``None``."""
        return self.parser.get_parsed_content("postprocessing") if "postprocessing" in self.parser else None

    def inferer(self) -> Any:
        """The bundle's ``inferer`` (e.g. ``SlidingWindowInferer``), or ``None``."""
        return self.parser.get_parsed_content("inferer") if "inferer" in self.parser else None

    def slice_axis(self, spatial_ndim: int) -> int | None:
        """The spatial axis along which a 2D network explains an image of ``spatial_ndim`` spatial axes slice by
        slice (metadata ``gamverify.spatial_dims`` = 2 on a volume, e.g. ``cbct_quality``), else ``None``."""
        info = self.metadata.get("gamverify", {}) if isinstance(self.metadata, dict) else {}
        if int(spatial_ndim) == 3 and int(info.get("spatial_dims", spatial_ndim)) == 2:
            return int(info.get("slice_axis", 2))
        return None

    def input_shape(self) -> tuple[int, ...] | None:
        """(C, *spatial) of a dummy input from the declared ``num_channels`` / ``spatial_shape`` (``"k*n"`` read as
        a multiple of k of at least 32), or ``None`` when the bundle declares no spatial shape."""
        channels, shape = declared_input(self.metadata, self.parser)
        if not shape:
            return None
        if channels is None:
            conv = next((m for m in self.network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
            channels = conv.in_channels if conv is not None else 1
        return (int(channels), *_concrete_shape(shape))

    def trace_info(self) -> dict:
        """Task, total stride and output shape from one traced forward of the declared input (cached)."""
        if self._trace_info is None:
            shape = self.input_shape()
            if shape is None:
                raise ValueError(
                    f"bundle {self.root} declares no input spatial_shape (metadata network_data_format.inputs) "
                    "and no inferer roi_size"
                )
            _, self._trace_info = find_cam_layer(self.network, shape)
        return self._trace_info

    @property
    def task(self) -> str:
        """``"segmentation"`` when the network's output keeps the input's spatial shape (from the traced forward of
        the declared input), else ``"classification"``. Without a declared input shape, from metadata: an output of
        ``type`` ``image`` / ``segmentation``, or an output ``spatial_shape`` equal to the input's (model-zoo
        metadata also writes e.g. ``[1, 2]`` for class scores, so that alone is not read as spatial)."""
        try:
            return str(self.trace_info()["task"])
        except ValueError:
            pass
        fmt = self.metadata.get("network_data_format") or {}
        out = next(iter((fmt.get("outputs") or {}).values()), {})
        _, in_shape = declared_input(self.metadata)
        if str(out.get("type", "")).lower() in ("image", "segmentation"):
            return "segmentation"
        if in_shape and list(out.get("spatial_shape") or []) == list(in_shape):
            return "segmentation"
        return "classification"

    def total_stride(self) -> tuple[int, ...]:
        """Input size / smallest feature-map size per spatial axis, from the traced forward."""
        return tuple(self.trace_info()["total_stride"])


def _class_names(metadata: dict) -> list[str]:
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    channel_def = next(iter(outputs.values()), {}).get("channel_def", {}) if outputs else {}
    try:
        return [str(channel_def[k]) for k in sorted(channel_def, key=lambda k: int(k))] if channel_def else []
    except (TypeError, ValueError):
        return [str(v) for v in channel_def.values()]


def load_bundle(
    bundle_root: str | os.PathLike,
    config: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    require_weights: bool = True,
    overrides: dict | None = None,
    auto_layer: bool = True,
    layer_rule: str = "last",
) -> BundleModel:
    """Instantiate a bundle's network (``network_def``) and load its trained weights.

    Args:
        bundle_root: the bundle directory (``configs/``, ``models/``, optionally ``scripts/``).
        config: config under ``configs/`` (or a path) that defines ``network_def``; ``None``: ``inference.json``,
            else ``inference.yaml`` / ``inference.yml``.
        checkpoint: weights file (default ``models/model.pt``, else ``models/model.ts``).
        device: where to put the network (default: CUDA when available, else CPU).
        require_weights: raise when no checkpoint exists (``False``: keep the random initialisation).
        overrides: config keys to override (e.g. ``{"dataset_dir": ...}``).
        auto_layer: when the bundle names no CAM layer, find one (:func:`find_cam_layer`) from the declared input
            shape; a failure is logged and kept in ``layer_error``.
        layer_rule: ``"last"`` or ``"deepest"`` (see :func:`find_cam_layer`).

    Returns:
        :class:`BundleModel`.

    Example:
        >>> bm = load_bundle("bundles/sos_staging")
        >>> maps = GradCAM(bm.network, bm.target_layer)(x)
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    cfg = find_config(root, config)
    metadata, meta_path = read_metadata(root)
    _needs_yaml(cfg)
    _add_bundle_to_path(root)
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser.read_meta(str(meta_path))
    parser["bundle_root"] = str(root)
    ckpt_arg = Path(checkpoint) if checkpoint is not None else _default_checkpoint(root)
    passport = read_passport(root, ckpt_arg)
    # what training ran with (network, classes, window), so nobody repeats the overrides; the caller's still win
    for key, value in (passport.get("settings") or {}).items():
        parent = key.rsplit("#", 1)[0] if "#" in key else None  # a network argument the config leaves at its default
        settable = key in parser or (parent is not None and parent in parser and isinstance(parser[parent], dict))
        if settable and key not in (overrides or {}):
            parser[key] = value
    for key, value in (overrides or {}).items():
        parser[key] = value
    if "network_def" not in parser:
        raise ValueError(f"{cfg} defines no 'network_def'")
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as err:
        raise ValueError(f"cannot build network_def of {cfg}: {type(err).__name__}: {err}") from err
    if not isinstance(network, nn.Module):
        raise ValueError(f"network_def of {cfg} is a {type(network).__name__}, not a torch.nn.Module")
    if isinstance(network, torch.jit.ScriptModule):
        raise ValueError(
            f"network_def of {cfg} is a TorchScript module: forward hooks (needed for CAMs) cannot be registered on "
            "it; define network_def as the Python network and keep model.ts for its weights"
        )
    ckpt = Path(checkpoint) if checkpoint is not None else _default_checkpoint(root)
    if ckpt is not None and ckpt.is_file():
        load_checkpoint(network, ckpt)
    elif require_weights:
        where = ckpt if ckpt is not None else root / "models" / "model.pt"
        raise FileNotFoundError(f"no trained weights at {where} (nor model.ts); train the bundle or pass checkpoint=")
    else:
        ckpt = None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = network.to(dev).eval()
    extra = dict(metadata.get("gamverify", {}))
    if passport.get("cam_layer"):
        extra["target_layer"] = passport["cam_layer"]
    if passport.get("feature_layers"):
        extra["feature_layers"] = passport["feature_layers"]
    source = "metadata" if extra.get("target_layer") else None
    # the config's keys follow a --network_name override; metadata describes the default network only
    if "cam_layer" in parser:
        extra["target_layer"] = parser.get_parsed_content("cam_layer")
        source = "config"
    if "feature_layers" in parser:
        extra["feature_layers"] = parser.get_parsed_content("feature_layers")
    bm = BundleModel(
        network=network,
        root=root,
        metadata=metadata,
        target_layer=extra.get("target_layer"),
        feature_layers=list(extra.get("feature_layers", [])),
        class_names=_class_names(metadata),
        parser=parser,
        config_path=cfg,
        checkpoint=ckpt,
        layer_source=source,
        passport=passport,
    )
    if bm.target_layer is None and auto_layer:
        shape = bm.input_shape()
        if shape is None:
            bm.layer_error = (
                "the bundle names no CAM layer and declares no input spatial_shape (metadata network_data_format."
                "inputs.<name>.spatial_shape) to find one; pass a layer"
            )
            logger.warning("%s: %s", root, bm.layer_error)
        else:
            try:
                bm.target_layer, bm._trace_info = find_cam_layer(network, shape, prefer=layer_rule)
                bm.layer_source = "auto"
                logger.warning(
                    "%s names no CAM layer: using %r (%s, output %s)",
                    root,
                    bm.target_layer,
                    bm._trace_info["task"],
                    bm._trace_info["shape"],
                )
            except Exception as err:  # a network the dummy input does not suit: report, do not fail the load
                bm.layer_error = f"no CAM layer found automatically: {err}"
                logger.warning("%s: %s", root, bm.layer_error)
    return bm


# ---------------------------------------------------------------------------------------------------------- checks
@dataclass
class BundleReport:
    """What :func:`check_bundle` found.

    Attributes:
        root: the bundle.
        problems: what stops the package from explaining the bundle (empty: usable).
        warnings: what works with a fallback (e.g. no preprocessing: the image is read as is).
        info: what was found (config, network class, weights, declared input, layer, task, inferer).
    """

    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"bundle {self.root}: {'usable' if self.ok else 'NOT usable'}"]
        lines += [f"  missing/problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {k}: {v}" for k, v in self.info.items()]
        return "\n".join(lines)


def check_bundle(
    bundle_root: str | os.PathLike,
    config: str | os.PathLike | None = None,
    *,
    layer: str | None = None,
    strict: bool = False,
) -> BundleReport:
    """Check that a bundle can be explained, and say what is missing.

    Checks, in order: the inference config (JSON or YAML; YAML needs PyYAML), ``metadata.json``, ``network_def``
    (built, its ``scripts/`` importable), weights (``models/model.pt`` or ``model.ts``, loadable into
    ``network_def``), ``preprocessing`` (a warning when absent), the declared input (``num_channels``,
    ``spatial_shape``), and a CAM layer (``layer``, the bundle's, or found automatically).

    Args:
        bundle_root: the bundle directory.
        config: inference config (default as in :func:`find_config`).
        layer: a layer to check instead of the bundle's.
        strict: raise ``ValueError`` with the report text when something is missing.

    Returns:
        :class:`BundleReport`.

    Example:
        >>> print(check_bundle("spleen_ct_segmentation"))
    """
    root = Path(bundle_root)
    rep = BundleReport(root)
    try:
        cfg = find_config(root, config)
        rep.info["config"] = str(cfg)
        _needs_yaml(cfg)
    except (FileNotFoundError, ImportError) as err:
        rep.problems.append(str(err))
        return _finish(rep, strict)
    try:
        metadata, _ = read_metadata(root)
    except (FileNotFoundError, ImportError) as err:
        rep.problems.append(str(err))
        return _finish(rep, strict)
    try:
        bm = load_bundle(root, config=cfg, device="cpu", require_weights=False, auto_layer=layer is None)
    except Exception as err:
        rep.problems.append(f"{type(err).__name__}: {err}")
        return _finish(rep, strict)
    rep.info["network"] = type(bm.network).__name__
    if bm.checkpoint is None:
        rep.problems.append(f"no weights: {root / 'models' / 'model.pt'} (or model.ts) is missing")
    else:
        rep.info["weights"] = str(bm.checkpoint)
    if "preprocessing" not in bm.parser:
        rep.warnings.append("no 'preprocessing' in the config: images are read as they are (no resampling/scaling)")
    else:
        try:
            bm.preprocessing()
        except Exception as err:
            rep.problems.append(f"preprocessing cannot be built: {type(err).__name__}: {err}")
    channels, shape = declared_input(metadata)
    if shape is None:
        rep.problems.append(
            "no declared input spatial_shape (metadata network_data_format.inputs.<name>.spatial_shape)"
        )
    if channels is None:
        rep.warnings.append("no declared input num_channels (taken from the first convolution)")
    rep.info["input"] = bm.input_shape()
    rep.info["inferer"] = type(bm.inferer()).__name__ if "inferer" in bm.parser else None
    rep.info["class_names"] = bm.class_names
    if layer is not None:
        try:
            resolve_layers(bm.network, layer)
            rep.info["layer"] = f"{layer} (given)"
        except ValueError as err:
            rep.problems.append(str(err))
    elif bm.target_layer is not None:
        try:
            resolve_layers(bm.network, bm.target_layer)
            rep.info["layer"] = f"{bm.target_layer} ({bm.layer_source})"
        except ValueError as err:
            rep.problems.append(f"the bundle's CAM layer: {err}")
    else:
        rep.problems.append(bm.layer_error or "no CAM layer")
    try:
        rep.info["task"] = bm.task
    except Exception as err:  # noqa: BLE001 - reported, not raised
        rep.warnings.append(f"task unknown: {err}")
    return _finish(rep, strict)


def _finish(rep: BundleReport, strict: bool) -> BundleReport:
    if strict and not rep.ok:
        raise ValueError(str(rep))
    return rep


# ---------------------------------------------------------------------------------------------------------- geometry
def _first_conv(network: nn.Module) -> nn.modules.conv._ConvNd | None:
    return next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def geometry_problems(image: Any, bundle: BundleModel | nn.Module) -> list[str]:
    """Why an image's geometry cannot suit a network (empty list: it can).

    Checks the image as the network will see it (after the bundle's preprocessing): number of spatial axes
    against the network's (a 2D bundle with ``gamverify.spatial_dims`` = 2 explains a volume slice by slice), one
    slice into a 3D network, fewer voxels along an axis than the network's total stride
    (:meth:`BundleModel.total_stride`, from the declared input shape), and the channel count.

    Args:
        image: (C, *spatial) tensor / ``MetaTensor`` (``load_image`` output or the preprocessed image).
        bundle: a :class:`BundleModel` (all checks) or a bare network (axes and channels only).

    Returns:
        One sentence per problem, naming it.

    Example:
        >>> geometry_problems(load_image("one_slice.dcm"), load_bundle("spleen_ct_segmentation"))
        ['the image has one slice along spatial axis 2 (shape (512, 512, 1)): a 3D network needs a volume']
    """
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        return [f"the image has shape {shape}: expected (C, *spatial) with 2 or 3 spatial axes"]
    channels, spatial = shape[0], shape[1:]
    network = bundle.network if isinstance(bundle, BundleModel) else bundle
    conv = _first_conv(network)
    problems: list[str] = []
    net_dims = conv.weight.ndim - 2 if conv is not None else None
    slice_axis = bundle.slice_axis(len(spatial)) if isinstance(bundle, BundleModel) else None
    if net_dims is not None and conv.in_channels != channels:
        problems.append(f"the image has {channels} channel(s) but the network expects {conv.in_channels}")
    checked = list(range(len(spatial)))
    if slice_axis is not None and net_dims == 2:
        checked.remove(slice_axis)
    elif net_dims is not None and net_dims != len(spatial):
        if net_dims == 3 and len(spatial) == 2:
            problems.append(f"the image is 2D {spatial} (one slice): a 3D network needs a volume")
        else:
            problems.append(f"the image has {len(spatial)} spatial axes {spatial} but the network is {net_dims}D")
        return problems
    if net_dims == 3:
        for i in checked:
            if spatial[i] == 1:
                problems.append(
                    f"the image has one slice along spatial axis {i} (shape {spatial}): a 3D network needs a volume"
                )
    stride = None
    if isinstance(bundle, BundleModel):
        try:
            stride = bundle.total_stride()
        except ValueError:
            stride = None  # no declared input shape: the stride is unknown
    if stride is not None and len(stride) == len(checked):
        # a 2D network on a volume: its two strides belong to the two in-plane axes, in order
        for j, i in enumerate(checked):
            s = stride[j] if slice_axis is not None else stride[i]
            if 1 < spatial[i] < s:
                problems.append(
                    f"spatial axis {i} has {spatial[i]} voxels, fewer than the network's total stride {s} along it "
                    f"(shape {spatial}): its deepest features have no extent there"
                )
    return problems


def check_geometry(image: Any, bundle: BundleModel | nn.Module) -> None:
    """Raise ``ValueError`` naming every reason the image's geometry cannot suit the network
    (see :func:`geometry_problems`).

    Example:
        >>> check_geometry(bm.preprocessing()({"image": "CT_dir"})["image"], bm)
    """
    problems = geometry_problems(image, bundle)
    if problems:
        raise ValueError("the image does not suit the network: " + "; ".join(problems))
