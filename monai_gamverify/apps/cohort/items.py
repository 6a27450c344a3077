"""The items of a cohort run: datalist / folder / glob / list entries, each with a unique file-name-safe id."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_gamverify.data.datalist import PATH_KEYS, DataError, list_images, read_datalist_split

__all__ = ["cohort_items", "safe_id"]

_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(value: Any) -> str:
    """``value`` as a file-name-safe id (``[A-Za-z0-9._-]``)."""
    text = _BAD_ID_CHARS.sub("_", str(value)).strip("._")
    return text or "item"


def cohort_items(
    data: str | os.PathLike | Sequence[Any], split: str = "test", base_dir: str | os.PathLike | None = None
) -> list[dict]:
    """The items of a cohort run, each with a unique file-name-safe ``"id"``; bad entries are kept, not raised.

    Unlike :func:`monai_gamverify.data.load_datalist`, one bad entry does not stop the list: an entry without an
    ``image`` gets an ``"_error"`` message (it becomes a row of ``errors.csv``); missing or unreadable files are
    found when the item is processed.

    Args:
        data: a datalist JSON (decathlon style; relative paths resolved against its directory), a directory of
            images, a glob pattern, one image file, or a list of image paths / entry dicts.
        split: list of the datalist to run on.
        base_dir: directory that relative paths of a list of entries are resolved against (default: cwd).

    Returns:
        Entry dicts with ``id`` (entry ``id``, else the image file name without extension, else ``item<index>``)
        and absolute ``image`` paths.

    Raises:
        DataError: the datalist or folder cannot be read, or two entries share an id.

    Example:
        >>> cohort_items("data/sos/datalist.json", "test")[0]["id"]
        'sos_0003'
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(data, (str, os.PathLike)):
        p = Path(data).expanduser()
        if p.suffix.lower() == ".json":
            if not p.is_file():
                raise DataError(f"datalist not found: {p}")
            entries, base = read_datalist_split(p, split), p.parent
        else:
            entries = list_images(p, spatial_dims=None, num_channels=None, check="none")
    else:
        entries = list(data)
    if not entries:
        raise DataError("no items given")
    items: list[dict] = []
    for i, entry in enumerate(entries):
        item = (
            {"image": entry}
            if isinstance(entry, (str, os.PathLike))
            else dict(entry)
            if isinstance(entry, Mapping)
            else {"_error": f"entry {i} is not an image path or a dict: {entry!r}"}
        )
        for key in PATH_KEYS:
            if isinstance(item.get(key), (str, os.PathLike)):
                q = Path(item[key]).expanduser()
                item[key] = str(q if q.is_absolute() else (base / q).resolve())
        if "image" not in item and "_error" not in item:
            item["_error"] = f"entry {i} has no 'image' key (keys: {sorted(item)})"
        if "id" in item:
            item["id"] = safe_id(item["id"])
        elif isinstance(item.get("image"), str):
            item["id"] = safe_id(Path(item["image"]).name.split(".")[0])
        else:
            item["id"] = f"item{i:05d}"
        items.append(item)
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item["id"] in seen:
            raise DataError(
                f"entries {seen[item['id']]} and {i} have the same id {item['id']!r} "
                f"({items[seen[item['id']]].get('image')} and {item.get('image')}); give each entry a unique 'id'"
            )
        seen[item["id"]] = i
    return items
