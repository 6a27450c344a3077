"""The output directory of a cohort run: ``run.json`` (configuration), per-item results and their validation on
resume, and the final tables (``results.csv``, ``errors.csv``, ``summary.json``)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_gamverify.apps.cohort.distributed import barrier
from monai_gamverify.io import write_csv, write_json

__all__ = [
    "RUN_FORMAT",
    "RUN_VERSION",
    "ERROR_COLUMNS",
    "prepare_out",
    "valid_result",
    "valid_map",
    "results_table",
    "summarize",
    "write_tables",
]

#: ``format`` entry of ``run.json``
RUN_FORMAT = "monai-gamverify.cohort"
#: ``format_version`` of ``run.json`` (2: item results record their map's shape, checked on resume)
RUN_VERSION = 2
#: columns of ``errors.csv``
ERROR_COLUMNS = ["id", "file", "message"]
_OURS = {"items", "maps", "errors", "results.csv", "errors.csv", "summary.json"}


def prepare_out(out: Path, run_info: dict, overwrite: bool, rank: int, world: int) -> None:
    """Check ``run.json`` against this run's config (all ranks), then let rank 0 clean and write it.

    Raises:
        ValueError: ``out`` holds another run (and not ``overwrite``) or foreign files.
    """
    run_json = out / "run.json"
    existing = None
    if run_json.is_file():
        try:
            existing = json.loads(run_json.read_text())
        except (OSError, json.JSONDecodeError):
            existing = None  # a run.json is only ever written atomically: an unreadable one is not ours
        if not isinstance(existing, dict) or existing.get("format") != RUN_FORMAT:
            if not overwrite:
                raise ValueError(f"{run_json} is not a cohort run record; choose another --out or pass overwrite")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OURS)
        if foreign:
            raise ValueError(
                f"output directory {out} is not empty and holds no run.json (found {foreign[:5]}); "
                "choose an empty or new directory, or pass overwrite=True"
            )
    if isinstance(existing, dict) and existing.get("format") == RUN_FORMAT:
        old, new = existing.get("config", {}), run_info["config"]
        if old != new and not overwrite:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"{out} holds a run with a different configuration (differs in: {', '.join(diff)}); resume with the "
                "same arguments, choose another output directory, or pass overwrite=True to start again"
            )
        if old != new or existing.get("format_version") != RUN_VERSION:
            existing = None
    barrier(world)  # every rank has read run.json before rank 0 may replace it
    if rank == 0:
        if existing is None or overwrite:
            for sub in ("items", "maps", "errors"):
                shutil.rmtree(out / sub, ignore_errors=True)
            for name in ("results.csv", "errors.csv", "summary.json"):
                (out / name).unlink(missing_ok=True)
            write_json(run_info, run_json)
        for sub in ("items", "maps", "errors"):
            (out / sub).mkdir(parents=True, exist_ok=True)
            for stale in (out / sub).glob(".*"):  # temp files of writes cut short by SIGKILL
                stale.unlink(missing_ok=True)
    barrier(world)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def valid_map(path: Path, shape: Sequence[int] | None) -> bool:
    """Whether ``path`` is a readable NIfTI map of spatial shape ``shape`` with finite values (the whole file is
    decompressed: a truncated or corrupted write is found, not only a missing one)."""
    if shape is None or not path.is_file():
        return False
    try:
        img = nib.load(str(path))
        if tuple(int(s) for s in img.shape) != tuple(int(s) for s in shape):
            return False
        data = np.asanyarray(img.dataobj)
    except Exception:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for a damaged file
        return False
    return bool(np.isfinite(data).all())


def valid_result(path: Path, item_id: str, config_hash: str, out: Path) -> dict | None:
    """The stored result of an item if it belongs to this run and its map (if any) is valid, else ``None``."""
    rec = _read_json(path) if path.is_file() else None
    if not isinstance(rec, dict) or rec.get("id") != item_id or rec.get("config_hash") != config_hash:
        return None
    if rec.get("status") != "ok" or not isinstance(rec.get("result"), dict):
        return None
    shapes = rec.get("map_shapes") or {"map": rec.get("map_shape")}  # a segmentation row has one map per label
    for key, rel in rec["result"].items():
        if (key == "map" or key.startswith("map_")) and rel and not valid_map(out / rel, shapes.get(key)):
            return None
    return rec["result"]


def results_table(rows: Sequence[dict]) -> Any:
    """One DataFrame of result rows, built once (columns: the union of the rows' keys in order of first appearance;
    a key a row lacks is empty)."""
    import pandas as pd  # pandas only when writing the tables

    if not rows:
        return pd.DataFrame(columns=["id", "image", "prediction", "energy"])
    return pd.DataFrame.from_records(list(rows))


def summarize(rows: list[dict], errors: list[dict], n_items: int, config_hash: str) -> dict:
    """The run's summary (counts, predictions, energy statistics, verdicts)."""
    energies = np.array([r["energy"] for r in rows if "energy" in r], dtype=np.float64)
    summary: dict[str, Any] = {
        "n_items": n_items,
        "n_succeeded": len(rows),
        "n_failed": len(errors),
        "config_hash": config_hash,
        "predictions": dict(sorted(Counter(r["prediction_name"] for r in rows if "prediction_name" in r).items())),
        "energy": {
            "mean": float(energies.mean()),
            "std": float(energies.std()),
            "min": float(energies.min()),
            "median": float(np.median(energies)),
            "max": float(energies.max()),
        }
        if len(energies)
        else None,
        "failed_ids": [e["id"] for e in errors],
    }
    labels = [k[len("voxels_") :] for k in (rows[0] if rows else {}) if k.startswith("voxels_")]
    if labels:  # a segmentation bundle: per label, predicted voxels and attribution energy
        summary["labels"] = {
            name: {
                "mean_voxels": float(np.mean([r[f"voxels_{name}"] for r in rows])),
                "n_empty": sum(1 for r in rows if r[f"voxels_{name}"] == 0),
                "mean_energy": float(np.mean([r[f"energy_{name}"] for r in rows])),
            }
            for name in labels
        }
    if rows and "in_distribution" in rows[0]:
        summary["n_out_of_distribution"] = sum(1 for r in rows if r.get("in_distribution") is False)
    if rows and "verdict" in rows[0]:
        summary["verdicts"] = dict(sorted(Counter(r["verdict"] for r in rows).items()))
    if rows and "p_suitable" in rows[0]:
        summary["mean_p_suitable"] = float(np.mean([r["p_suitable"] for r in rows]))
    return summary


def write_tables(out: Path, rows: list[dict], errors: list[dict], n_items: int, config_hash: str) -> dict:
    """Write ``results.csv``, ``errors.csv`` and ``summary.json``; returns the summary."""
    import pandas as pd  # pandas only when writing the tables

    write_csv(results_table(rows), out / "results.csv")
    write_csv(pd.DataFrame(errors, columns=ERROR_COLUMNS), out / "errors.csv")
    summary = summarize(rows, errors, n_items, config_hash)
    write_json(summary, out / "summary.json")
    return summary
