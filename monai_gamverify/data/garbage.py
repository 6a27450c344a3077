"""K+1 "garbage" class data: mix garbage images into a datalist (:func:`mix_garbage`, :func:`mix_garbage_dirs`)
and class weights for the unbalanced mix (:func:`class_weights`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_gamverify.data.datalist import DataError, load_datalist

__all__ = ["mix_garbage", "mix_garbage_dirs", "class_weights"]


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
