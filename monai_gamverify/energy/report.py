"""The AE report: the per-category table, atypical volumes, scatter plots and :func:`energy_report` (files).

Beyond :func:`~monai_gamverify.energy.statistics.spearman_loo` this adds the table over categories (with Holm's
adjustment), robust flags for volumes whose AE is atypical for their score, and the figures.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from monai_gamverify.energy.attribution import energy_from_maps
from monai_gamverify.energy.statistics import SpearmanLOO, check_pair, holm_adjust, spearman_loo
from monai_gamverify.io.files import write_csv, write_json
from monai_gamverify.visualize.plots import new_figure, save_figure

__all__ = ["energy_table", "table_from_results", "atypical_cases", "energy_scatter_png", "energy_report"]

logger = logging.getLogger(__name__)


def energy_table(
    energy_by_category: Mapping[str, Any],
    scores_by_category: Mapping[str, Any],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
    progress: bool = True,
) -> pd.DataFrame:
    """The per-category AE-vs-score table: the study's columns plus bootstrap interval and Holm adjustment.

    Args:
        energy_by_category: category -> AE per volume.
        scores_by_category: category -> score per volume (same keys, same volume order).
        n_boot, ci, seed: bootstrap settings of :func:`spearman_loo` (same seed for every category, so a
            category's row does not depend on which other categories are present).
        alpha: family-wise level for the ``significant_holm`` column.
        progress: show a progress bar over categories.

    Returns:
        DataFrame, one row per category: ``category, n, rho, p, median_loo_rho, median_loo_p, min_loo_rho,
        max_loo_rho, ci_low, ci_high, p_holm, median_loo_p_holm, significant_holm, degenerate_folds,
        n_boot_valid``. ``p_holm`` adjusts the full-sample p over the categories; ``median_loo_p_holm`` applies the
        same step-down to the median LOO p (a descriptive note: a median of p-values is not itself a p-value).

    Example:
        >>> energy_table({"parotid": ae_p, "larynx": ae_l}, {"parotid": sc_p, "larynx": sc_l})
    """
    if not isinstance(energy_by_category, Mapping) or not isinstance(scores_by_category, Mapping):
        raise TypeError("energy_by_category and scores_by_category must be mappings category -> values")
    missing = sorted(set(energy_by_category) ^ set(scores_by_category), key=str)
    if missing:
        raise ValueError(f"categories present in only one of energy/scores: {missing}")
    if not energy_by_category:
        raise ValueError("no category given")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    results = {}
    for cat in tqdm(list(energy_by_category), desc="energy table", disable=not progress):
        try:
            results[cat] = spearman_loo(
                energy_by_category[cat], scores_by_category[cat], n_boot=n_boot, ci=ci, seed=seed
            )
        except ValueError as err:
            raise ValueError(f"category {cat!r}: {err}") from err
    return table_from_results(results, alpha=alpha)


def table_from_results(results: Mapping[str, SpearmanLOO], alpha: float = 0.05) -> pd.DataFrame:
    """The :func:`energy_table` rows from :func:`spearman_loo` results already computed (nothing is recomputed).

    Args:
        results: category -> result.
        alpha: family-wise level for the ``significant_holm`` column.

    Returns:
        The table of :func:`energy_table`.

    Example:
        >>> table_from_results({"parotid": spearman_loo(ae_p, sc_p), "larynx": spearman_loo(ae_l, sc_l)})
    """
    if not results:
        raise ValueError("no category given")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rows = [
        {
            "category": cat,
            "n": res.n,
            "rho": res.rho,
            "p": res.p,
            "median_loo_rho": res.median_rho,
            "median_loo_p": res.median_p,
            "min_loo_rho": res.min_loo_rho,
            "max_loo_rho": res.max_loo_rho,
            "ci_low": res.ci_low,
            "ci_high": res.ci_high,
            "degenerate_folds": len(res.degenerate_folds),
            "n_boot_valid": res.n_boot_valid,
        }
        for cat, res in results.items()
    ]
    df = pd.DataFrame(rows)
    df.insert(df.columns.get_loc("degenerate_folds"), "p_holm", holm_adjust(df["p"].to_numpy()))
    df.insert(df.columns.get_loc("degenerate_folds"), "median_loo_p_holm", holm_adjust(df["median_loo_p"].to_numpy()))
    df.insert(df.columns.get_loc("degenerate_folds"), "significant_holm", df["p_holm"] <= alpha)
    return df


def atypical_cases(
    energy: Any,
    scores: Any,
    ids: Sequence[Any] | None = None,
    *,
    k: float = 1.5,
) -> pd.DataFrame:
    """Volumes whose AE is unusual for their score: robust line of AE on score, residual outside Tukey's fences.

    The line is Theil-Sen (``scipy.stats.theilslopes``: median of pairwise slopes), so a few odd volumes do not
    bend it; a residual below ``Q1 - k * IQR`` or above ``Q3 + k * IQR`` of all residuals is flagged.

    Args:
        energy: AE per volume, shape (n,).
        scores: predicted or consensus score per volume, shape (n,).
        ids: volume identifiers (default ``0..n-1``); must be unique.
        k: Tukey fence multiplier (1.5 = "outlier", 3 = "far out").

    Returns:
        DataFrame with ``id, score, energy, fitted, residual, flag, direction`` (``"high"``/``"low"``/``""``),
        in input order; fence values in ``df.attrs`` (``slope``, ``intercept``, ``lower_fence``, ``upper_fence``).

    Example:
        >>> df = atypical_cases(ae, consensus, ids=volume_ids)
        >>> df[df.flag]
    """
    e, s = check_pair(energy, scores, min_n=3)
    ids = list(range(e.size)) if ids is None else list(ids)
    if len(ids) != e.size:
        raise ValueError(f"ids has {len(ids)} entries for {e.size} volumes")
    if len(set(map(str, ids))) != len(ids):
        raise ValueError("ids must be unique")
    if not k >= 0:
        raise ValueError(f"k must be non-negative, got {k}")
    slope, intercept = (float(v) for v in stats.theilslopes(e, s)[:2])
    fitted = intercept + slope * s
    resid = e - fitted
    q1, q3 = np.percentile(resid, [25, 75])
    lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    direction = np.where(resid > hi, "high", np.where(resid < lo, "low", ""))
    df = pd.DataFrame(
        {"id": ids, "score": s, "energy": e, "fitted": fitted, "residual": resid, "flag": direction != ""}
    )
    df["direction"] = direction
    df.attrs.update(slope=slope, intercept=intercept, lower_fence=float(lo), upper_fence=float(hi), k=float(k))
    return df


def energy_scatter_png(
    energy: Any,
    scores: Any,
    path: str | os.PathLike,
    title: str | None = None,
    *,
    ids: Sequence[Any] | None = None,
    flags: Any | None = None,
    result: SpearmanLOO | None = None,
    fit: tuple[float, float] | None = None,
) -> Path:
    """Scatter plot of AE against the score with Spearman's rho in the title; written atomically as PNG.

    Args:
        energy: AE per volume.
        scores: score per volume (x axis).
        path: output PNG.
        title: first title line (e.g. the category).
        ids: labels for flagged points.
        flags: boolean per volume (e.g. ``atypical_cases(...).flag``), drawn in red and labelled with the id.
        result: a :func:`spearman_loo` result to quote (median LOO rho/p, interval); computed when ``None``
            and at least 4 volumes are given, otherwise only ``scipy.stats.spearmanr`` is quoted.
        fit: (slope, intercept) of a line to draw, e.g. the robust fit of :func:`atypical_cases`.

    Returns:
        The written path.

    Example:
        >>> energy_scatter_png(ae, consensus, "parotid.png", "parotid")
    """
    e, s = check_pair(energy, scores, min_n=3)
    flags = np.zeros(e.size, bool) if flags is None else np.asarray(flags, bool).reshape(-1)
    if flags.size != e.size:
        raise ValueError(f"flags has {flags.size} entries for {e.size} volumes")
    ids = list(range(e.size)) if ids is None else list(ids)
    if result is None and e.size >= 4:
        result = spearman_loo(e, s, n_boot=0)
    if result is not None:
        stat = f"Spearman ρ = {result.rho:.2f} (p = {result.p:.2g}), n = {result.n}"
        if math.isfinite(result.ci_low):
            stat += f", {100 * result.ci:.0f}% CI [{result.ci_low:.2f}, {result.ci_high:.2f}]"
        stat += (
            f"\nmedian LOO ρ = {result.median_rho:.2f} (p = {result.median_p:.2g}), "
            f"LOO range [{result.min_loo_rho:.2f}, {result.max_loo_rho:.2f}]"
        )
    else:
        r = stats.spearmanr(e, s)
        stat = f"Spearman ρ = {float(r.statistic):.2f} (p = {float(r.pvalue):.2g}), n = {e.size}"

    fig = new_figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(s[~flags], e[~flags], s=28, c="tab:blue", label="volumes")
    if flags.any():
        ax.scatter(s[flags], e[flags], s=40, c="tab:red", marker="D", label="atypical AE")
        for i in np.flatnonzero(flags):
            ax.annotate(str(ids[i]), (s[i], e[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fit is not None:
        xs = np.array([s.min(), s.max()])
        ax.plot(xs, fit[1] + fit[0] * xs, "--", c="gray", lw=1, label="Theil-Sen fit")
    if flags.any() or fit is not None:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("score (consensus)")
    ax.set_ylabel("attribution energy (sum of raw CAM)")
    ax.set_title(f"{title}\n{stat}" if title else stat, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _read_wide_csv(path: str | os.PathLike, id_column: str, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} CSV not found: {p}")
    df = pd.read_csv(p)
    if id_column not in df.columns:
        raise ValueError(f"{what} CSV {p} has no id column {id_column!r} (columns: {list(df.columns)})")
    df[id_column] = df[id_column].astype(str)
    dup = df[id_column][df[id_column].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{what} CSV {p} repeats ids {dup[:10]}")
    return df.set_index(id_column)


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def energy_report(
    energy: str | os.PathLike,
    scores: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    categories: str | Sequence[str] | None = None,
    id_column: str = "id",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
    k: float = 1.5,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """AE-vs-score analysis per category from precomputed AE: table (CSV/JSON), LOO folds, atypical cases, plots.

    Inputs are wide tables keyed by volume id: the energy CSV has ``id`` and one AE column per category (or is a
    folder of raw NIfTI maps, see :func:`energy_from_maps`); the scores CSV has ``id`` and one consensus column per
    category. Every volume with AE must have a score row; score rows without AE are ignored. Empty cells drop
    that volume from that category only (the table's ``n`` shows it). A category whose AE or scores are constant
    (or that has fewer than 3 volumes) has no Spearman rho: it is left out with a warning and listed under
    ``skipped`` (with the reason) in the result and in ``energy_table.json``; no usable category is an error.

    Written to ``out_dir``: ``energy_table.csv``, ``energy_table.json`` (table, folds, atypical cases, settings),
    ``energy_loo.csv`` (category, left-out id, rho, p), ``energy_atypical.csv`` and ``energy_scatter_<category>.png``.

    Args:
        energy: AE CSV or a folder of raw maps.
        scores: consensus-score CSV.
        out_dir: output folder.
        categories: categories to analyse (default: every column present in both tables); a comma-separated
            string is accepted.
        id_column: name of the id column in both CSVs.
        n_boot, ci, seed: bootstrap settings (:func:`spearman_loo`).
        alpha: family-wise level for Holm's flag.
        k: Tukey fence multiplier for atypical cases.
        plots: write the scatter PNGs.
        progress: progress bars.

    Returns:
        dict with the written paths, the table as records and the skipped categories (name -> reason).

    Example:
        >>> energy_report("ae.csv", "consensus.csv", "out/energy")
    """
    out = Path(out_dir)
    src = Path(energy)
    if src.is_dir():
        e_df = energy_from_maps(src).rename(columns={"id": id_column})
        e_df[id_column] = e_df[id_column].astype(str)
        e_df = e_df.set_index(id_column)
    else:
        e_df = _read_wide_csv(src, id_column, "energy")
    s_df = _read_wide_csv(scores, id_column, "scores")
    missing = sorted(set(e_df.index) - set(s_df.index))
    if missing:
        raise ValueError(f"{len(missing)} volume(s) with AE have no score row: {missing[:10]}")
    if categories is None:
        cats = [c for c in e_df.columns if c in s_df.columns]
    else:
        cats = (
            [c.strip() for c in categories.split(",")] if isinstance(categories, str) else [str(c) for c in categories]
        )
    absent = [c for c in cats if c not in e_df.columns or c not in s_df.columns]
    if absent or not cats:
        raise ValueError(
            f"categories {absent or cats} not found in both tables "
            f"(energy columns {list(e_df.columns)}, score columns {list(s_df.columns)})"
        )

    e_by, s_by, ids_by = {}, {}, {}
    for c in cats:
        pair = pd.DataFrame(
            {"e": pd.to_numeric(e_df[c], errors="coerce"), "s": pd.to_numeric(s_df[c], errors="coerce")}
        )
        pair = pair.loc[e_df.index].dropna()
        if len(pair) < len(e_df):
            logger.warning("category %r: %d volume(s) without AE or score are left out", c, len(e_df) - len(pair))
        e_by[c], s_by[c], ids_by[c] = pair["e"].to_numpy(), pair["s"].to_numpy(), pair.index.tolist()
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    skipped: dict[str, str] = {}
    loo_by: dict[str, SpearmanLOO] = {}  # one spearman_loo per category: its folds, bootstrap and table row
    for c in tqdm(list(cats), desc="energy table", disable=not progress):
        # e.g. all-zero maps of one output: that category has no rho, the others still do
        try:
            loo_by[c] = spearman_loo(e_by[c], s_by[c], n_boot=n_boot, ci=ci, seed=seed)
        except ValueError as err:
            skipped[c] = str(err)
            cats.remove(c)
            logger.warning("category %r is left out of the AE analysis: %s", c, err)
    if not cats:
        raise ValueError(f"no category can be analysed: {skipped}")
    e_by, s_by, ids_by = ({c: d[c] for c in cats} for d in (e_by, s_by, ids_by))

    table = table_from_results(loo_by, alpha=alpha)
    loo_rows, atyp, written = [], [], {}
    for c in cats:
        res = loo_by[c]
        loo_rows += [
            {"category": c, "left_out": i, "loo_rho": r, "loo_p": p}
            for i, r, p in zip(ids_by[c], res.loo_rho, res.loo_p)
        ]
        cases = atypical_cases(e_by[c], s_by[c], ids_by[c], k=k)
        cases.insert(0, "category", c)
        atyp.append(cases)
        if plots:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(c))
            written[f"scatter_{c}"] = energy_scatter_png(
                e_by[c],
                s_by[c],
                out / f"energy_scatter_{name}.png",
                str(c),
                ids=ids_by[c],
                flags=cases.flag,
                result=res,
                fit=(cases.attrs["slope"], cases.attrs["intercept"]),
            )
    loo_df, atyp_df = pd.DataFrame(loo_rows), pd.concat(atyp, ignore_index=True)
    written["table_csv"] = write_csv(table, out / "energy_table.csv")
    written["loo_csv"] = write_csv(loo_df, out / "energy_loo.csv")
    written["atypical_csv"] = write_csv(atyp_df, out / "energy_atypical.csv")
    summary = {
        "table": table.to_dict(orient="records"),
        "folds": loo_df.to_dict(orient="records"),
        "atypical": atyp_df[atyp_df.flag].to_dict(orient="records"),
        "skipped": skipped,
        "settings": {
            "n_boot": n_boot,
            "ci": ci,
            "seed": seed,
            "alpha": alpha,
            "k": k,
            "energy": str(src),
            "scores": str(scores),
        },
    }
    written["table_json"] = write_json(_json_safe(summary), out / "energy_table.json")
    return {
        "paths": {key: str(v) for key, v in written.items()},
        "table": _json_safe(summary["table"]),
        "skipped": skipped,
    }
