"""K+1 "garbage" class: widen a trained classifier, mix garbage data in, reject at inference, count rejections.

The post-hoc out-of-distribution baselines the garbage class is compared with (maximum softmax probability, energy
score, Mahalanobis distance, AUROC / FPR at 95 % TPR) are in :mod:`monai_gamverify.metrics.ood`.

Example:
    >>> model6 = widen_classifier(model5)  # 5 SOS stages -> 5 stages + garbage, a deep copy
    >>> train = mix_garbage(datalist, {"chin": chin_files}, num_classes=5, ratio=0.2, seed=0)
    >>> loss = torch.nn.CrossEntropyLoss(weight=class_weights([d["label"] for d in train], 6))
    >>> post = RejectGarbaged(keys="pred", threshold=0.5)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from ignite.engine import Events
from monai.transforms import MapTransform
from torch import nn

from monai_gamverify.data.datalist import DataError, load_datalist
from monai_gamverify.io.files import write_csv
from monai_gamverify.metrics.ood import as_scores
from monai_gamverify.networks.heads import find_classifier_head

__all__ = [
    "find_classifier_head",
    "widen_classifier",
    "init_from_checkpoint",
    "mix_garbage",
    "mix_garbage_dirs",
    "class_weights",
    "RejectGarbaged",
    "RejectGarbageD",
    "RejectGarbageDict",
    "RejectionCounter",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# widening the head
# ----------------------------------------------------------------------------------------------------------------------
def widen_classifier(
    model: nn.Module,
    num_new: int = 1,
    layer_name: str | None = None,
    init: str = "mean",
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Widen a trained K-class classifier's final linear layer to K + ``num_new`` outputs.

    The K existing rows of weight and bias are copied bit-exactly, so the old classes' logits do not change; the
    new rows are initialised by ``init``. Integer ``out_channels`` / ``num_classes`` attributes of the model equal to
    K are updated.

    Args:
        model: the trained classifier (any ``nn.Module`` whose last ``nn.Linear`` is the head, or give ``layer_name``).
        num_new: number of classes added (1 for one garbage class).
        layer_name: the head's name; ``None`` takes the last ``nn.Linear`` in module order.
        init: ``"mean"`` (mean of the existing rows: the new logit starts as the mean of the old ones), ``"zeros"``,
            or ``"random"`` (``nn.Linear``'s default uniform init, drawn with ``seed``).
        seed: seed of the ``"random"`` init.
        inplace: modify ``model`` itself; by default a deep copy is widened and ``model`` stays usable.

    Returns:
        The widened model (``model`` itself if ``inplace``).

    Example:
        >>> net6 = widen_classifier(net5, init="mean")
        >>> torch.equal(net6.eval()(x)[:, :5], net5.eval()(x))
        True
    """
    if int(num_new) != num_new or num_new < 1:
        raise ValueError(f"num_new must be a positive integer, got {num_new!r}")
    if init not in ("mean", "zeros", "random"):
        raise ValueError(f"init must be 'mean', 'zeros' or 'random', got {init!r}")
    name, _ = find_classifier_head(model, layer_name)  # validate before copying
    target = model if inplace else copy.deepcopy(model)
    old = target.get_submodule(name)
    k, d = old.out_features, old.in_features
    w, b = old.weight, old.bias
    new = nn.Linear(d, k + num_new, bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if init == "mean":
            new_w = w.mean(0, keepdim=True).expand(num_new, d)
            new_b = b.mean().expand(num_new) if b is not None else None
        elif init == "zeros":
            new_w, new_b = torch.zeros(num_new, d), torch.zeros(num_new)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / math.sqrt(d) if d > 0 else 0.0  # nn.Linear's default range
            new_w = torch.empty(num_new, d).uniform_(-bound, bound, generator=gen)
            new_b = torch.empty(num_new).uniform_(-bound, bound, generator=gen)
        new.weight[:k].copy_(w)
        new.weight[k:].copy_(new_w.to(w))
        if b is not None:
            new.bias[:k].copy_(b)
            new.bias[k:].copy_(new_b.to(b))
    new.weight.requires_grad_(w.requires_grad)
    if b is not None:
        new.bias.requires_grad_(b.requires_grad)
    new.train(old.training)
    parent_name, _, child = name.rpartition(".")
    setattr(target.get_submodule(parent_name) if parent_name else target, child, new)
    for attr in ("out_channels", "num_classes"):
        if isinstance(getattr(target, attr, None), int) and getattr(target, attr) == k:
            setattr(target, attr, k + num_new)
    return target


def init_from_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    layer_name: str | None = None,
    init: str = "mean",
    seed: int = 0,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a K-class checkpoint into a K+N-class ``model``, widening its head with :func:`widen_classifier`.

    The checkpoint (``torch.load(weights_only=True)``; a state dict, or a dict with a ``"model"`` state dict as MONAI's
    ``CheckpointSaver`` writes with several objects) must match ``model`` except for the head's number of rows. A
    checkpoint that already has the model's number of classes is loaded as is. The first K logits of the result equal
    the K-class model's exactly; the new rows are initialised by ``init``.

    Args:
        model: the K+N-class network (modified in place and returned; e.g. a bundle's ``network_def`` with 6 outputs).
        path: the K-class (or K+N-class) checkpoint.
        layer_name: the head's name; ``None`` takes the last ``nn.Linear``.
        init: initialisation of the new rows (see :func:`widen_classifier`).
        seed: seed of the ``"random"`` init.
        map_location: where tensors are loaded.

    Returns:
        ``model`` with the loaded (and widened) weights.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the checkpoint does not fit the model (other layers differ, or it has more classes than the model).

    Example:
        >>> net6 = init_from_checkpoint(SmallCNN(3, 1, 6), "models/model.pt")   # trained 5-stage model + garbage row
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    name, head = find_classifier_head(model, layer_name)
    weight_key = f"{name}.weight"
    if weight_key not in state:
        raise ValueError(f"{path} has no {weight_key!r}: it was not saved from a {type(model).__name__}")
    k, total = int(state[weight_key].shape[0]), head.out_features
    if k > total:
        raise ValueError(f"{path} has {k} classes but the model only {total}; cannot narrow a classifier")
    narrow = model
    if k < total:
        narrow = copy.deepcopy(model)
        parent_name, _, child = name.rpartition(".")
        small = nn.Linear(head.in_features, k, bias=head.bias is not None)
        setattr(narrow.get_submodule(parent_name) if parent_name else narrow, child, small)
    try:
        narrow.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {type(model).__name__} (apart from the head): {err}") from err
    if k < total:
        widen_classifier(narrow, num_new=total - k, layer_name=name, init=init, seed=seed, inplace=True)
        model.load_state_dict(narrow.state_dict(), strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------
def _as_int_label(value: Any, where: str) -> int:
    """A scalar integer class label from int / numpy / tensor / integral float, else TypeError."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if (value.size if isinstance(value, np.ndarray) else value.numel()) != 1:
            raise TypeError(f"{where}: label must be a scalar class index, got shape {tuple(value.shape)}")
        value = value.reshape(-1)[0].item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: label must be an integer class index, got {type(value).__name__} {value!r}")
    if float(value) != int(value):
        raise TypeError(f"{where}: label must be an integer class index, got {value!r}")
    return int(value)


def mix_garbage(
    datalist: Sequence[Mapping[str, Any]],
    garbage_sources: Mapping[str, Sequence[Any]],
    num_classes: int,
    ratio: float | None = None,
    seed: int = 0,
    label_key: str = "label",
    image_key: str = "image",
    source_key: str = "source",
    real_source: str = "real",
    shuffle: bool = True,
    keys: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Add garbage items with label ``num_classes`` (= K) to a K-class datalist.

    Args:
        datalist: the real items (dicts with ``label_key`` in ``0..K-1``); copied, never modified.
        garbage_sources: name -> items (dicts, or image paths turned into ``{image_key: path}``), e.g.
            ``{"chin": [...], "cvm": [...]}``. A garbage item's own label, if any, is kept as ``source_label``.
        num_classes: K, the number of real classes; garbage gets label K.
        ratio: garbage items per real item, split evenly over the sources (e.g. 0.2 adds 20 per 100 real items); a
            source smaller than its share is repeated (reshuffled each pass). ``None`` adds every garbage item once.
        seed: seed of the sampling and the shuffle.
        label_key: label field.
        image_key: image field for garbage given as paths.
        source_key: field naming where an item comes from (real items get ``real_source`` unless they have one).
        real_source: source name of the real items.
        shuffle: shuffle the mixed list.
        keys: keep only these fields (plus ``label_key`` and ``source_key``) in every item, so that real and
            garbage items have the same fields and collate into one batch (a garbage cohort's items carry other
            fields, e.g. ``source_label``); ``None`` keeps everything.

    Returns:
        New list of dicts.

    Raises:
        ValueError: a real label is K (it would collide with the garbage label) or outside ``0..K-1``; empty inputs.

    Example:
        >>> mix_garbage([{"image": "a.nii", "label": 0}], {"chin": ["c.nii"]}, num_classes=5, shuffle=False)
        [{'image': 'a.nii', 'label': 0, 'source': 'real'}, {'image': 'c.nii', 'label': 5, 'source': 'chin'}]
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if not isinstance(garbage_sources, Mapping) or not garbage_sources:
        raise ValueError("garbage_sources must be a non-empty dict name -> list of items")
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be a positive number or None, got {ratio!r}")
    if not datalist:
        raise ValueError("datalist is empty")
    real = []
    for i, item in enumerate(datalist):
        if not isinstance(item, Mapping) or label_key not in item:
            raise ValueError(f"datalist item {i} must be a dict with a {label_key!r} field, got {item!r}")
        label = _as_int_label(item[label_key], f"datalist item {i}")
        if label == num_classes:
            raise ValueError(
                f"datalist item {i} has label {label}, which collides with the garbage label {num_classes} "
                f"(num_classes={num_classes}); real labels must be 0..{num_classes - 1}"
            )
        if not 0 <= label < num_classes:
            raise ValueError(f"datalist item {i} has label {label}, outside 0..{num_classes - 1}")
        entry = dict(item)
        entry.setdefault(source_key, real_source)
        real.append(entry)

    rng = np.random.default_rng(seed)
    names = list(garbage_sources)
    counts = {name: len(garbage_sources[name]) for name in names}
    if ratio is not None:
        total = int(round(ratio * len(real)))
        base, extra = divmod(total, len(names))
        counts = {name: base + (j < extra) for j, name in enumerate(names)}
    garbage = []
    for name in names:
        items = list(garbage_sources[name])
        if not items:
            raise ValueError(f"garbage source {name!r} is empty")
        order: list[int] = []
        while len(order) < counts[name]:  # whole permutations, so a small source is used evenly
            order.extend(rng.permutation(len(items)).tolist())
        for idx in order[: counts[name]]:
            item = items[idx]
            entry = dict(item) if isinstance(item, Mapping) else {image_key: item}
            if label_key in entry:
                entry["source_label"] = entry[label_key]
            entry[label_key] = num_classes
            entry[source_key] = name
            garbage.append(entry)
    mixed = real + garbage
    if keys is not None:
        keep = {*keys, label_key, source_key}
        mixed = [{k: v for k, v in item.items() if k in keep} for item in mixed]
    if shuffle:
        mixed = [mixed[i] for i in rng.permutation(len(mixed))]
    return mixed


def mix_garbage_dirs(
    datalist: Sequence[Mapping[str, Any]],
    garbage_dirs: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    num_classes: int,
    split: str = "training",
    ratio: float | None = None,
    seed: int = 0,
    keys: Sequence[str] | None = ("image", "label", "source"),
    check: str | bool = "full",
    spatial_dims: int | None = 3,
) -> list[dict[str, Any]]:
    """:func:`mix_garbage` with the garbage read from cohort directories (``gamverify synth`` output), for configs.

    Each directory must hold a ``datalist.json``; its ``split`` list is the garbage source (labels there are
    ignored). The source name is the directory's ``cohort.json`` ``kind`` (``chin``, ``cvm``, ...) or, failing that,
    the directory name; give a dict name -> directory to choose the names.

    Args:
        datalist: the real K-class items.
        garbage_dirs: one directory, a list of them, or a dict source name -> directory.
        num_classes: K (garbage gets label K).
        split: the garbage datalist's list to read (``training``, ``validation``, ``test``).
        ratio: garbage items per real item (see :func:`mix_garbage`); ``None`` adds every garbage item once.
        seed: seed of the sampling and the shuffle.
        keys: fields kept in every item (``None``: all); the default keeps what the bundles load.
        check: image check of :func:`monai_gamverify.data.load_datalist` (``"full"``, ``"exists"``, ``"none"``).
        spatial_dims: expected dimensionality of the garbage images.

    Returns:
        The mixed list of dicts.

    Raises:
        DataError: a missing garbage directory, datalist or image (the message names it), a real label equal to K
            (collision with the garbage label) or outside ``0..K-1``. Bundle configs call this through
            :func:`monai_gamverify.data.exit_on_error`, which ends the run with that one line.

    Example:
        >>> train = load_datalist("data/sos/datalist.json", "training", num_classes=6)
        >>> mixed = mix_garbage_dirs(train, "data/chin", num_classes=5, ratio=0.2, seed=0)
    """
    try:
        if isinstance(garbage_dirs, Mapping):
            named = {str(k): v for k, v in garbage_dirs.items()}
        else:
            dirs = [garbage_dirs] if isinstance(garbage_dirs, (str, os.PathLike)) else list(garbage_dirs)
            named = {}
            for d in dirs:
                meta_file = Path(d) / "cohort.json"
                name = Path(d).resolve().name
                if meta_file.is_file():
                    try:
                        name = str(json.loads(meta_file.read_text()).get("kind", name))
                    except (OSError, ValueError):
                        pass
                while name in named:
                    name += "_"
                named[name] = d
        if not named:
            raise DataError("no garbage directory given (e.g. --garbage_dir data/chin)")
        sources = {}
        for name, d in named.items():
            if not Path(d).is_dir():
                raise DataError(
                    f"garbage directory not found: {d} (create one first, e.g. `gamverify synth --kind chin --out {d}`)"
                )
            sources[name] = load_datalist(
                Path(d) / "datalist.json",
                split,
                dataset_dir=d,
                spatial_dims=spatial_dims,
                require_label=False,
                num_classes=None,
                check=check,
            )
        return mix_garbage(datalist, sources, num_classes=num_classes, ratio=ratio, seed=seed, keys=keys)
    except DataError:
        raise
    except (ValueError, TypeError) as err:  # bad labels / arguments: one error type for the caller
        raise DataError(str(err)) from err


def class_weights(labels: Iterable[Any], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (num_classes * count_c)`` for a weighted ``CrossEntropyLoss``.

    Equal to scikit-learn's ``compute_class_weight("balanced", ...)``.

    Args:
        labels: integer class labels (a sequence, array or tensor).
        num_classes: number of classes (K + 1 with a garbage class).

    Returns:
        float32 tensor of shape (num_classes,).

    Raises:
        ValueError: a label outside ``0..num_classes-1`` or a class without any sample.

    Example:
        >>> class_weights([0, 0, 0, 1], 2)
        tensor([0.6667, 2.0000])
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().reshape(-1).tolist()
    elif isinstance(labels, np.ndarray):
        labels = labels.reshape(-1).tolist()
    ints = np.array([_as_int_label(v, f"label {i}") for i, v in enumerate(labels)], dtype=np.int64)
    if ints.size == 0:
        raise ValueError("no labels given")
    if ints.min() < 0 or ints.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got values {sorted(set(ints.tolist()))}")
    counts = np.bincount(ints, minlength=int(num_classes))
    if (counts == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no samples; their weight is undefined")
    return torch.as_tensor(ints.size / (num_classes * counts), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------------------------------
class RejectGarbaged(MapTransform):
    """Dictionary post-transform flagging predictions of the garbage class (K+1 models).

    For each key (the prediction: logits or probabilities, shape (C,) for one item or (B, C) for a batch) it adds

    - ``rejected`` (bool): argmax is the garbage class, or the garbage probability is ``>= threshold``;
    - ``garbage_prob``: softmax probability of the garbage class;
    - ``best_real_class``: argmax over the real classes only (the answer the model would give without garbage);
    - ``best_real_prob``: that class's probability (under the softmax over all C classes).

    Outputs are tensors of shape () for one item and (B,) for a batch, on the prediction's device. Their keys are the
    names above, renamed by ``output_keys`` (e.g. ``{"rejected": "garbage_rejected"}``) and prefixed by ``prefix``
    (default: none for one key, ``"{key}_"`` with several). An output key already in the data raises ``KeyError``
    (so a caller's field is never silently replaced) unless ``allow_overwrite=True``.

    Args:
        keys: prediction key(s).
        garbage_index: index of the garbage class; ``None`` = the last one (K).
        threshold: optional garbage-probability threshold that also rejects; ``None`` = argmax only.
        logits: apply softmax first (``False`` when the values are already probabilities).
        prefix: prefix of the output keys.
        allow_missing_keys: skip absent keys.
        output_keys: new names of some of the four outputs (``None``: the names above).
        allow_overwrite: replace existing fields of the data with the outputs instead of raising.

    Example:
        >>> RejectGarbaged(keys="pred")({"pred": torch.tensor([0.1, 0.2, 3.0])})["rejected"]
        tensor(True)
    """

    #: the outputs, in order
    OUTPUTS = ("rejected", "garbage_prob", "best_real_class", "best_real_prob")

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        garbage_index: int | None = None,
        threshold: float | None = None,
        logits: bool = True,
        prefix: str | None = None,
        allow_missing_keys: bool = False,
        output_keys: Mapping[str, str] | None = None,
        allow_overwrite: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] or None, got {threshold!r}")
        names = dict(zip(self.OUTPUTS, self.OUTPUTS))
        unknown = set(output_keys or {}) - set(names)
        if unknown:
            raise ValueError(f"output_keys may rename {list(self.OUTPUTS)}, got unknown {sorted(unknown)}")
        names.update(output_keys or {})
        if len(set(names.values())) != len(names):
            raise ValueError(f"output_keys give two outputs the same key: {names}")
        self.garbage_index = garbage_index
        self.threshold = threshold
        self.logits = logits
        self.prefix = prefix
        self.output_keys = names
        self.allow_overwrite = allow_overwrite

    def reject(self, pred: Any) -> dict[str, torch.Tensor]:
        """The four outputs for one prediction (C,) or a batch (B, C)."""
        pred = as_scores(pred, "prediction", min_classes=2)
        c = pred.shape[-1]
        g = c - 1 if self.garbage_index is None else self.garbage_index
        if not -c <= g < c:
            raise ValueError(f"garbage_index {self.garbage_index} out of range for predictions with {c} classes")
        g %= c
        if self.logits:
            probs = torch.softmax(pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred, dim=-1)
        else:
            if (pred < -1e-6).any() or (pred > 1 + 1e-6).any():
                raise ValueError("logits=False but the prediction has values outside [0, 1]; pass logits=True")
            probs = pred
        garbage_prob = probs[..., g]
        real = torch.cat([probs[..., :g], probs[..., g + 1 :]], dim=-1)
        best_prob, best = real.max(dim=-1)
        best = best + (best >= g).long()  # back to the original class indices
        rejected = probs.argmax(dim=-1) == g
        if self.threshold is not None:
            rejected = rejected | (garbage_prob >= self.threshold)
        return {
            "rejected": rejected,
            "garbage_prob": garbage_prob,
            "best_real_class": best,
            "best_real_prob": best_prob,
        }

    def output_key(self, key: Hashable, name: str) -> str:
        """Data key of output ``name`` for prediction ``key``."""
        prefix = self.prefix if self.prefix is not None else (f"{key}_" if len(self.keys) > 1 else "")
        return f"{prefix}{self.output_keys[name]}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        targets = [self.output_key(key, name) for key in keys for name in self.OUTPUTS]
        if len(set(targets)) != len(targets):
            raise ValueError(f"RejectGarbaged outputs collide ({targets}); give a prefix per key")
        clash = [t for t in targets if t in d]
        if clash and not self.allow_overwrite:
            raise KeyError(
                f"RejectGarbaged would overwrite {clash} already in the data: rename its outputs with output_keys= or "
                "prefix=, or pass allow_overwrite=True"
            )
        for key in keys:
            for name, value in self.reject(d[key]).items():
                d[self.output_key(key, name)] = value
        return d


RejectGarbageD = RejectGarbageDict = RejectGarbaged


def _item_id(item: Mapping[str, Any], id_key: str) -> str | None:
    """Identifier of a decollated output item: a string field, or the file name in a MetaTensor / meta dict."""
    value = item.get(id_key)
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    meta = getattr(value, "meta", None) or item.get(f"{id_key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)) and name:
        name = name[0]
    return None if name is None else str(name)


class RejectionCounter:
    """Ignite handler counting rejected items (after :class:`RejectGarbaged`) per iteration and per epoch.

    Logs TensorBoard scalars ``{tag}/iteration`` (count per iteration), ``{tag}/epoch_count`` and ``{tag}/epoch_rate``
    when a writer is given, stores ``{tag}_count`` and ``{tag}_rate`` in ``engine.state.metrics`` at each epoch end,
    and writes the rejected items (``id, epoch, iteration, garbage_prob``) as CSV when the run completes; with
    ``decisions_csv_path`` it also writes every item's decision (``id, epoch, iteration, rejected, garbage_prob,
    best_real_class, best_real_prob``). Counts and records restart at every run (``STARTED``), so with an evaluator
    they describe the last evaluation.

    Args:
        output_transform: maps ``engine.state.output`` to the rejection flags (bool sequence / tensor), or to a tuple
            ``(flags, ids)``. The default reads ``rejected_key`` from MONAI's decollated output (a list of dicts)
            or from a batched dict, and ids from ``id_key``.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        csv_path: where to write the rejected items at ``COMPLETED``; ``None`` writes nothing.
        decisions_csv_path: where to write one row per item (accepted ones too) with the :class:`RejectGarbaged`
            columns; ``None`` writes nothing. Needs the default output reading (no ``output_transform``).
        tag: name of the scalars and metrics.
        rejected_key: output field with the flags.
        id_key: output field identifying an item (a string, or an image whose metadata holds ``filename_or_obj``);
            items without one are named ``"epoch{e}_iter{i}_{position}"``.

    Example:
        >>> counter = RejectionCounter(summary_writer=writer, csv_path="rejected.csv")
        >>> counter.attach(evaluator)
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] | None = None,
        summary_writer: Any = None,
        csv_path: str | os.PathLike | None = None,
        tag: str = "rejections",
        rejected_key: str = "rejected",
        id_key: str = "image",
        decisions_csv_path: str | os.PathLike | None = None,
    ) -> None:
        if decisions_csv_path is not None and output_transform is not None:
            raise ValueError("decisions_csv_path reads the RejectGarbaged fields; do not give an output_transform")
        self.output_transform = output_transform
        self.summary_writer = summary_writer
        self.csv_path = csv_path
        self.decisions_csv_path = decisions_csv_path
        self.tag = tag
        self.rejected_key = rejected_key
        self.id_key = id_key
        self.reset()

    def reset(self, engine: Any = None) -> None:
        """Zero all counts and records."""
        self.iteration_rejected = 0
        self.epoch_rejected = 0
        self.epoch_seen = 0
        self.total_rejected = 0
        self.total_seen = 0
        self.records: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        """Register the handler's events on an ignite ``Engine``."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _epoch_started(self, engine: Any) -> None:
        self.epoch_rejected = 0
        self.epoch_seen = 0

    def _extract(self, output: Any) -> tuple[list[bool], list[str | None], list[float | None]]:
        flags, ids, probs, _ = self._extract_all(output)
        return flags, ids, probs

    def _extract_all(self, output: Any) -> tuple[list[bool], list[str | None], list[float | None], list[tuple]]:
        if self.output_transform is not None:
            out = self.output_transform(output)
            flags, ids = out if isinstance(out, tuple) else (out, None)
            flags = [bool(f) for f in torch.as_tensor(flags).reshape(-1).tolist()]
            ids = [None] * len(flags) if ids is None else [None if i is None else str(i) for i in ids]
            if len(ids) != len(flags):
                raise ValueError(f"output_transform returned {len(flags)} flags but {len(ids)} ids")
            return flags, ids, [None] * len(flags), [(None, None)] * len(flags)
        items = [output] if isinstance(output, Mapping) else list(output) if isinstance(output, Sequence) else None
        if not items or not all(isinstance(i, Mapping) and self.rejected_key in i for i in items):
            raise ValueError(
                f"engine output has no {self.rejected_key!r} field: add RejectGarbaged to the post-processing "
                "or give an output_transform"
            )
        flags, ids, probs, best = [], [], [], []

        def values(item: Mapping[str, Any], key: str, n: int) -> list[Any]:
            v = item.get(key)
            return [None] * n if v is None else torch.as_tensor(v).reshape(-1).tolist()

        for item in items:
            f = torch.as_tensor(item[self.rejected_key]).reshape(-1).tolist()
            flags.extend(bool(v) for v in f)
            probs.extend(values(item, "garbage_prob", len(f)))
            best.extend(zip(values(item, "best_real_class", len(f)), values(item, "best_real_prob", len(f))))
            ids.extend([_item_id(item, self.id_key)] * len(f) if len(f) == 1 else [None] * len(f))
        return flags, ids, probs, best

    def iteration_completed(self, engine: Any) -> None:
        """Count the current iteration's rejections and record the rejected items."""
        flags, ids, probs, best = self._extract_all(engine.state.output)
        epoch, iteration = engine.state.epoch, engine.state.iteration
        self.iteration_rejected = sum(flags)
        self.epoch_rejected += self.iteration_rejected
        self.epoch_seen += len(flags)
        self.total_rejected += self.iteration_rejected
        self.total_seen += len(flags)
        for pos, (flag, item_id, prob, (cls, cls_prob)) in enumerate(zip(flags, ids, probs, best)):
            name = item_id if item_id is not None else f"epoch{epoch}_iter{iteration}_{pos}"
            if flag:
                self.records.append({"id": name, "epoch": epoch, "iteration": iteration, "garbage_prob": prob})
            if self.decisions_csv_path is not None:
                self.decisions.append(
                    {
                        "id": name,
                        "epoch": epoch,
                        "iteration": iteration,
                        "rejected": flag,
                        "garbage_prob": prob,
                        "best_real_class": cls,
                        "best_real_prob": cls_prob,
                    }
                )
        if self.summary_writer is not None:
            self.summary_writer.add_scalar(f"{self.tag}/iteration", self.iteration_rejected, iteration)

    def epoch_completed(self, engine: Any) -> None:
        """Publish the epoch's count and rate (metrics and TensorBoard)."""
        rate = self.epoch_rejected / self.epoch_seen if self.epoch_seen else 0.0
        engine.state.metrics[f"{self.tag}_count"] = self.epoch_rejected
        engine.state.metrics[f"{self.tag}_rate"] = rate
        if self.summary_writer is not None:
            self.summary_writer.add_scalar(f"{self.tag}/epoch_count", self.epoch_rejected, engine.state.epoch)
            self.summary_writer.add_scalar(f"{self.tag}/epoch_rate", rate, engine.state.epoch)

    def completed(self, engine: Any) -> None:
        """Write the CSV of rejected items and flush the writer."""
        if self.csv_path is not None:
            write_csv(pd.DataFrame(self.records, columns=["id", "epoch", "iteration", "garbage_prob"]), self.csv_path)
        if self.decisions_csv_path is not None:
            columns = ["id", "epoch", "iteration", "rejected", "garbage_prob", "best_real_class", "best_real_prob"]
            write_csv(pd.DataFrame(self.decisions, columns=columns), self.decisions_csv_path)
        if self.summary_writer is not None and hasattr(self.summary_writer, "flush"):
            self.summary_writer.flush()
