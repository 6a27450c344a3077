"""The label-free, model-level suitability verdict: ``suitable``, ``not suitable`` or ``undecided``, with a p-value,
the reasons that decided it and every evidence's score and p-value.

The question is a test. H0: *the candidate behaves on the target images like a suitable model behaves next to the
trusted reference* — its prediction agreement, attention agreement (Method 1), early-feature agreement (Method 2)
and label-free accuracy estimate are exchangeable with those of known-suitable pairs. The **null rows** are those
pairs' evidence: each extra reference the user gives against the trusted one (the user's own task), plus the rows of
a **prior** (:class:`SuitabilityPrior`, fitted once on a zoo of suitable models and saved as JSON; the package ships
one fitted on its SOS zoo). Each evidence gets a conformal p-value (its rank among the null rows), and one combined
nonconformity score — the largest robust z-score below the null over the evidences — gets one exact conformal
p-value (fully symmetric: the candidate and the null rows are standardised together), so the false-rejection rate
of a suitable candidate is <= alpha under exchangeability, whatever the evidences' correlation.

Rejecting H0 says *not suitable*. Not rejecting it is not yet a proof: *suitable* also needs positive evidence that
the candidate is related to the reference (its predictions agree beyond chance: a seeded permutation test of
Cohen's kappa). Otherwise the verdict is *undecided*. A task mismatch in the bundles' metadata (classes, modality,
input channels, intensity window) decides *not suitable* by itself, with p = 0, and the candidate's own in-distribution
screen (when it ships one) is a second test (Bonferroni over the two).

Example:
    >>> prior = SuitabilityPrior.load("prior.json")
    >>> v = judge_candidate(obs["candidate"], obs["reference"], prior=prior, alpha=0.05)
    >>> v.verdict, v.p_value, v.reasons
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_gamverify.io import write_json
from monai_gamverify.verification.evidence import (
    EVIDENCE,
    ModelObservation,
    aligned_probabilities,
    atc_accuracy,
    cohen_kappa,
    disattenuated_agreement,
    mean_map_agreement,
    prediction_agreement,
    task_mismatches,
)

__all__ = [
    "SuitabilityPrior",
    "SuitabilityVerdict",
    "pair_evidence",
    "conformal_combined",
    "related_pvalue",
    "judge_candidate",
    "VERDICTS",
    "DEFAULT_EVIDENCE",
]

VERDICTS = ("suitable", "not suitable", "undecided")
#: evidence combined by default. Early-feature agreement (Method 2) and the ATC accuracy estimate are reported with
#: their p-values but not combined: alone, each ranks the zoo's models no better than chance (ROC AUC 0.46 and 0.43,
#: docs/verification.md) — early features measure the architecture and the input contrast, and the confidences of
#: label-shuffled, corrupted-data and wrong-field-of-view models are as high as suitable ones' — so combining them
#: only adds false rejections
DEFAULT_EVIDENCE = ("agreement", "attention")
PRIOR_FORMAT = "monai-gamverify/suitability-prior/1"
_DESCRIBE = {
    "agreement": "its predictions agree with the reference's (Cohen's kappa)",
    "attention": "its attention agrees with the reference's (Pearson r of the mean Grad-CAM maps, disattenuated)",
    "features": "its early feature maps agree with the reference's (Pearson r of the mean maps)",
    "atc": "its own confidences estimate its accuracy on these images (ATC)",
}


def pair_evidence(candidate: ModelObservation, reference: ModelObservation) -> dict[str, float]:
    """Every evidence of a (candidate, reference) pair observed on the same images (NaN where it cannot be
    computed: agreement across label spaces, features without a feature layer, ATC without validation
    confidences).

    Returns:
        ``{"agreement", "attention", "features", "atc"}`` -> float.
    """
    if len(candidate.probs) != len(reference.probs):
        raise ValueError(f"candidate and reference observed {len(candidate.probs)} and {len(reference.probs)} images")
    aligned = aligned_probabilities(candidate, reference) is not None
    agreement = prediction_agreement(candidate, reference) if aligned else np.nan
    attention = disattenuated_agreement(candidate.cam, reference.cam)
    features = np.nan
    if candidate.features is not None and reference.features is not None:
        features = mean_map_agreement(candidate.features, reference.features)
    return {"agreement": float(agreement), "attention": attention, "features": features, "atc": atc_accuracy(candidate)}


@dataclass
class SuitabilityPrior:
    """Evidence rows of known-suitable (candidate, reference) pairs: the null distribution of a suitable candidate.

    Attributes:
        rows: (N, len(evidence)) float64; NaN where an evidence was not available for a pair.
        evidence: evidence names (columns).
        source: where the rows come from (zoo, models, images), stated in reports.
        n_images: target images per pair when the rows were made (rows from very different counts are noisier or
            tighter than the candidate's; keep it close to the run's ``n_images``).
    """

    rows: np.ndarray
    evidence: tuple[str, ...] = EVIDENCE
    source: str = ""
    n_images: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, float).reshape(-1, len(self.evidence))
        unknown = set(self.evidence) - set(EVIDENCE)
        if unknown:
            raise ValueError(f"unknown evidence {sorted(unknown)}; known: {list(EVIDENCE)}")

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Mapping[str, float]], source: str = "", n_images: int = 0) -> SuitabilityPrior:
        """A prior from :func:`pair_evidence` dicts of suitable pairs."""
        return cls(np.array([[p.get(e, np.nan) for e in EVIDENCE] for p in pairs], float), EVIDENCE, source, n_images)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the prior as JSON (plain numbers: no pickle, nothing executable)."""
        doc = {
            "format": PRIOR_FORMAT,
            "evidence": list(self.evidence),
            "rows": [[None if np.isnan(v) else float(v) for v in r] for r in self.rows],
            "source": self.source,
            "n_images": int(self.n_images),
            "meta": self.meta,
        }
        return write_json(doc, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SuitabilityPrior:
        """Read a prior written by :meth:`save`; a file of another kind raises ``ValueError`` naming it."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"verifier file not found: {p}") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"verifier file {p} is not readable JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != PRIOR_FORMAT:
            raise ValueError(f"{p} is not a suitability verifier file (format {PRIOR_FORMAT!r})")
        rows = np.array([[np.nan if v is None else v for v in r] for r in doc["rows"]], float)
        n_images = int(doc.get("n_images", 0))
        return cls(rows, tuple(doc["evidence"]), doc.get("source", ""), n_images, doc.get("meta", {}))


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD) per column (spread floored by a small fraction of the column's scale)."""
    med = np.nanmedian(values, axis=0)
    mad = 1.4826 * np.nanmedian(np.abs(values - med), axis=0)
    floor = 1e-3 * np.maximum(np.nanmax(np.abs(values), axis=0), 1e-3)
    return (values - med) / np.maximum(mad, floor)


def conformal_combined(candidate: Sequence[float], null_rows: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Exact conformal p-value of the combined score "largest robust z below the null" and each column's p-value.

    The candidate and the null rows are standardised together (median and MAD of all N + 1 rows), each row's score
    is ``max_j (-z_j)`` and the p-value is the candidate's rank among the N + 1 scores (ties count against the
    candidate): a symmetric function of the rows, so ``P(p <= a) <= a`` when the candidate is exchangeable with them.

    Args:
        candidate: (m,) evidence values (higher = more like a suitable model).
        null_rows: (N, m) the same evidence of suitable pairs (no NaN).

    Returns:
        (combined p, per-evidence p-values (m,), the candidate's z-scores (m,)).
    """
    c = np.asarray(candidate, float).reshape(1, -1)
    null = np.asarray(null_rows, float).reshape(-1, c.shape[1])
    if np.isnan(c).any() or np.isnan(null).any():
        raise ValueError("conformal_combined needs evidence without NaN (drop unavailable evidence first)")
    allrows = np.vstack([null, c])
    z = _robust_z(allrows)
    scores = (-z).max(axis=1)
    n = len(allrows)
    p_comb = float((scores >= scores[-1]).sum() / n)
    p_each = (null <= c).sum(axis=0).astype(float)
    p_each = (1.0 + p_each) / n
    return p_comb, p_each, z[-1]


def related_pvalue(a: Sequence[int], b: Sequence[int], n_perm: int = 2000, seed: int = 0) -> float:
    """One-sided permutation p-value that two models' predictions agree beyond chance (kappa of a vs b against
    kappa of a random permutation of a vs b; seeded).

    Example:
        >>> related_pvalue([0, 1, 2, 3, 4] * 4, [0, 1, 2, 3, 4] * 4) < 0.01
        True
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    observed = cohen_kappa(a, b)
    _, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib, n = inv[: a.size], inv[a.size :], a.size
    k = int(inv.max()) + 1
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((int(n_perm), n)), axis=1)  # a permuted, b fixed: the margins stay the same
    codes = ia[perm] * k + ib + (np.arange(int(n_perm)) * k * k)[:, None]
    confusion = np.bincount(codes.ravel(), minlength=int(n_perm) * k * k).reshape(-1, k, k) / n
    observed_agree = np.trace(confusion, axis1=1, axis2=2)
    expected = np.bincount(ia, minlength=k) @ np.bincount(ib, minlength=k) / n**2
    if expected >= 1.0:
        return 1.0
    kappas = (observed_agree - expected) / (1.0 - expected)
    return float((1 + (kappas >= observed - 1e-12).sum()) / (1 + len(kappas)))


@dataclass
class SuitabilityVerdict:
    """A candidate's model-level verdict.

    Attributes:
        verdict: ``"suitable"``, ``"not suitable"`` or ``"undecided"``.
        p_value: p-value of H0 "behaves like a suitable model" (0 for a task mismatch).
        reasons: the sentences that decided the verdict.
        evidence: evidence name -> value (NaN where not available).
        p_values: evidence name -> conformal p-value (NaN where not used).
        related_p: permutation p-value that the predictions agree with the reference's beyond chance.
        screen_p: the candidate's own screen's dataset p-value, when it ships a screen.
        n_null: null rows used; null_source: where they came from.
    """

    verdict: str
    p_value: float
    reasons: list[str]
    evidence: dict[str, float] = field(default_factory=dict)
    p_values: dict[str, float] = field(default_factory=dict)
    related_p: float = float("nan")
    screen_p: float | None = None
    n_null: int = 0
    null_source: str = ""

    def to_row(self) -> dict[str, Any]:
        """A flat dict for ``verdicts.csv``: verdict, p_value, reasons and one column per evidence and p-value."""
        row: dict[str, Any] = {"verdict": self.verdict, "p_value": self.p_value, "reasons": "; ".join(self.reasons)}
        for e in EVIDENCE:
            row[e] = self.evidence.get(e, np.nan)
            row[f"p_{e}"] = self.p_values.get(e, np.nan)
        row.update(related_p=self.related_p, screen_p=self.screen_p, n_null=self.n_null, null_source=self.null_source)
        return row


def _null_rows(user_pairs: Sequence[Mapping[str, float]], prior: SuitabilityPrior | None, alpha: float):
    user = np.array([[p.get(e, np.nan) for e in EVIDENCE] for p in user_pairs], float).reshape(-1, len(EVIDENCE))
    enough = len(user) + 1 >= int(np.ceil(1.0 / alpha))
    if prior is None or len(prior) == 0 or enough:
        return user, f"{len(user)} pair(s) of the given references"
    cols = [prior.evidence.index(e) if e in prior.evidence else None for e in EVIDENCE]
    rows = np.array([[np.nan if j is None else r[j] for j in cols] for r in prior.rows], float)
    source = f"{len(user)} pair(s) of the given references + {len(rows)} of the prior ({prior.source or 'unnamed'})"
    return np.vstack([user, rows]), source


def judge_candidate(
    candidate: ModelObservation,
    reference: ModelObservation,
    references: Mapping[str, ModelObservation] | None = None,
    prior: SuitabilityPrior | None = None,
    alpha: float = 0.05,
    screen_p: float | None = None,
    evidence: Sequence[str] | None = None,
    n_perm: int = 2000,
    seed: int = 0,
) -> SuitabilityVerdict:
    """The verdict on one candidate against the trusted reference (see the module docstring).

    Args:
        candidate: the candidate's observation of the target images.
        reference: the trusted reference's observation of the same images.
        references: further trusted references (each observed on the same images): their evidence against the
            trusted one joins the null rows; with ``ceil(1 / alpha) - 1`` or more of them the prior is not needed.
        prior: null rows from a zoo (:class:`SuitabilityPrior`); needed when fewer references are given.
        alpha: level of the tests.
        screen_p: the candidate's own screen's dataset p-value on the target images, if it ships a screen.
        evidence: evidences combined (default :data:`DEFAULT_EVIDENCE`, those available for the candidate and the
            null rows); every evidence is reported with its p-value.
        n_perm: permutations of the relatedness test.
        seed: its seed.

    Returns:
        :class:`SuitabilityVerdict`.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mismatch = task_mismatches(candidate.info, reference.info)
    if mismatch:
        return SuitabilityVerdict("not suitable", 0.0, ["another task: " + "; ".join(mismatch)], screen_p=screen_p)
    probs = aligned_probabilities(candidate, reference)
    if probs is None:
        k = (candidate.probs.shape[1], reference.probs.shape[1])
        return SuitabilityVerdict(
            "not suitable", 0.0, [f"another task: it predicts {k[0]} classes, the reference {k[1]}"], screen_p=screen_p
        )
    ev = pair_evidence(candidate, reference)
    user_pairs = [pair_evidence(r, reference) for r in (references or {}).values()]
    null, source = _null_rows(user_pairs, prior, alpha)
    wanted = list(evidence or DEFAULT_EVIDENCE)
    unknown = set(wanted) - set(EVIDENCE)
    if unknown:
        raise ValueError(f"unknown evidence {sorted(unknown)}; choose from {list(EVIDENCE)}")
    use = [e for e in wanted if np.isfinite(ev[e]) and np.isfinite(null[:, EVIDENCE.index(e)]).mean() >= 0.9]
    p_values = dict.fromkeys(EVIDENCE, np.nan)
    for j, e in enumerate(EVIDENCE):  # every evidence's own conformal p-value, combined or only reported
        col = null[:, j][np.isfinite(null[:, j])]
        if np.isfinite(ev[e]) and len(col):
            p_values[e] = float((1 + (col <= ev[e]).sum()) / (1 + len(col)))
    cols = [EVIDENCE.index(e) for e in use]
    null = null[:, cols]
    null = null[np.isfinite(null).all(axis=1)] if len(cols) else null[:0]
    related = related_pvalue(probs.argmax(1), reference.predictions, n_perm=n_perm, seed=seed)
    if len(null) + 1 < int(np.ceil(1.0 / alpha)) or not use:
        reasons = [
            f"too few null rows ({len(null)}) to test at alpha = {alpha}: give >= {int(np.ceil(1 / alpha)) - 1} "
            "references or a verifier file (--verifier)"
        ]
        nan = float("nan")
        return SuitabilityVerdict("undecided", nan, reasons, ev, p_values, related, screen_p, len(null), source)
    p_comb, _, _ = conformal_combined([ev[e] for e in use], null)
    tests = [p_comb] + ([screen_p] if screen_p is not None else [])
    level = alpha / len(tests)  # Bonferroni over the evidence test and the candidate's own screen
    p_value = float(min(1.0, len(tests) * min(tests)))
    reasons = []
    if p_comb <= level:
        worst = sorted(use, key=lambda e: p_values[e])  # the combined evidences that speak against it
        for e in worst:
            if p_values[e] <= alpha or e == worst[0]:
                reasons.append(f"{_DESCRIBE[e]} less than suitable models do: {ev[e]:.2f} (p = {p_values[e]:.3g})")
    if screen_p is not None and screen_p <= level:
        reasons.append(f"its own screen finds the target images unlike its training data (p = {screen_p:.3g})")
    if reasons:
        return SuitabilityVerdict("not suitable", p_value, reasons, ev, p_values, related, screen_p, len(null), source)
    if related <= alpha:
        reasons = [
            f"behaves like suitable models next to the reference (combined p = {p_comb:.3g}) and its predictions "
            f"agree with the reference's beyond chance (kappa {ev['agreement']:.2f}, p = {related:.3g})"
        ]
        return SuitabilityVerdict("suitable", p_value, reasons, ev, p_values, related, screen_p, len(null), source)
    reasons = [
        f"not distinguishable from suitable models (combined p = {p_comb:.3g}), but its predictions do not agree "
        f"with the reference's beyond chance (kappa {ev['agreement']:.2f}, p = {related:.3g}): more images needed"
    ]
    return SuitabilityVerdict("undecided", p_value, reasons, ev, p_values, related, screen_p, len(null), source)
