"""Label-free, model-level suitability verdicts on the model zoo, leave-models-out (issue 22).

Run (after ``python scripts/train_zoo.py``): ``python scripts/experiment_verify.py [--zoo runs/zoo_suit]
[--out runs/experiment_verify] [--n-images 5,10,20,50] [--alpha 0.05] [--threads 1]``

Protocol (every figure below is leave-models-out and model-level):

- Ground truth: each zoo model's label from its measured accuracy on the held-out target cohort (``train_zoo.py``:
  1 suitable, 0 unsuitable, -1 in between: reported, not scored). The target cohort's labels are never used here.
- Trusted references: per architecture, the suitable SOS model with the best accuracy on its *own validation split*
  (what its owner knows; one at a time: the user has **one** trusted model). Candidates: every other zoo model.
- Target images: ``n`` unlabeled SOS volumes (seed 2000; the first ``n`` of 50), **clean** and, in the shortcut
  scenario, **carrying the marker cue** (the data a shortcut model agrees on).
- Prior (the null rows): evidence of every ordered pair of suitable zoo models other than the candidate and the
  reference, observed on *other* images (seed 3000, the same ``n``), so that neither the candidate nor its label
  ever enters its own verdict.
- Verdict: :func:`monai_gamverify.verification.suitability.judge_candidate` at ``--alpha`` with the bundles' task
  metadata (number and names of classes); ablations drop evidence (each alone; without attention), the metadata,
  add the early features, or give three more references of the user's own (other suitable zoo models).

Prints markdown tables (per n: AUC of the combined p-value and of each evidence alone, verdict accuracy, unsuitable
judged suitable, suitable judged suitable, shortcut models caught) and writes ``results.json`` and ``verdicts.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_zoo import CLASS_NAMES, ZOO, ground_truth, load_cohort, load_member, start_run  # noqa: E402

from monai_gamverify.io import write_csv, write_json  # noqa: E402
from monai_gamverify.verification.evidence import EVIDENCE, ModelObservation, observe_model  # noqa: E402
from monai_gamverify.verification.suitability import (  # noqa: E402
    DEFAULT_EVIDENCE,
    SuitabilityPrior,
    judge_candidate,
    pair_evidence,
)


def task_info(info: dict) -> dict:
    """What a bundle of this zoo model declares (``metadata.json``): classes and their names."""
    names = CLASS_NAMES[info["data"]]
    return {"num_classes": info["n_classes"], "class_names": names, "modality": "CBCT", "num_channels": 1}


def subset(o: ModelObservation, n: int, info: dict | None = None) -> ModelObservation:
    feats = None if o.features is None else o.features[:n]
    return ModelObservation(o.probs[:n], o.cam[:n], feats, o.val_conf, o.info if info is None else info)


def md_table(df: pd.DataFrame, digits: int = 3, index: bool = False) -> str:
    """A markdown table (no tabulate dependency)."""
    if index:
        df = df.reset_index()
    fmt = [(lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v))]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt[0](v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    ok = np.isfinite(score)
    y, score = y[ok], score[ok]
    return float(roc_auc_score(y, score)) if len(set(y)) == 2 else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo_suit")
    p.add_argument("--out", default="runs/experiment_verify")
    p.add_argument("--n-images", default="5,10,20,50")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--n-perm", type=int, default=1000)
    p.add_argument("--references", default=None, help="comma-separated trusted references (default: seed-0 SOS)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-prior", default=None, help="also write the prior of all suitable pairs (20 images) here")
    args = p.parse_args()
    _, out, t0 = start_run(args)
    zoo = Path(args.zoo)
    names = [n for n in ZOO if (zoo / f"{n}.json").is_file()]
    if not names:
        raise SystemExit(f"no trained model in {zoo}: run scripts/train_zoo.py first")
    sizes = sorted(int(s) for s in args.n_images.split(","))
    n_max = max(sizes)
    size = json.loads((zoo / f"{names[0]}.json").read_text())["size"]
    images = {
        "clean": load_cohort("sos", n_max, size, 2000)[0],
        "cue": load_cohort("sos", n_max, size, 2000, cue="marker")[0],
        "prior": load_cohort("sos", n_max, size, 3000)[0],
        "prior_cue": load_cohort("sos", n_max, size, 3000, cue="marker")[0],
    }
    infos, obs = {}, {k: {} for k in images}
    for k, name in enumerate(names):
        model, info = load_member(zoo, name)
        info["label"], info["ground_truth"] = ground_truth(info)  # the rule of train_zoo.py, re-applied
        infos[name] = info
        for key, x in images.items():
            obs[key][name] = observe_model(
                model, x, info["cam_layer"], info["feature_layers"][0], val_conf=info.get("val_conf"),
                info=task_info(info),
            )  # fmt: skip
        print(f"observed {k + 1}/{len(names)} {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    label = {n: int(infos[n]["label"]) for n in names}
    suitable = [n for n in names if label[n] == 1]
    if args.references:
        refs = [s.strip() for s in args.references.split(",")]
    else:  # per architecture, the suitable model its owner would trust: the best on its own validation split
        best: dict[str, str] = {}
        for n in suitable:
            a = infos[n]["arch"]
            if a not in best or infos[n]["val_acc"] > infos[best[a]]["val_acc"]:
                best[a] = n
        refs = list(best.values())
    print(f"references: {refs}; {len(suitable)} suitable, {sum(v == 0 for v in label.values())} unsuitable, "
          f"{sum(v == -1 for v in label.values())} in between")  # fmt: skip
    if args.write_prior:  # the shipped prior: every suitable pair of the zoo on the prior images, 20 each
        n = min(20, n_max)
        pairs = [
            pair_evidence(subset(obs["prior"][a], n), subset(obs["prior"][b], n))
            for a in suitable
            for b in suitable
            if a != b
        ]
        prior = SuitabilityPrior.from_pairs(
            pairs,
            source=f"SOS zoo ({len(suitable)} suitable models of {zoo.name}, {len(pairs)} ordered pairs)",
            n_images=n,
        )
        prior.meta = {"class_names": CLASS_NAMES["sos"], "models": suitable, "grid": 8}
        print(f"prior written: {prior.save(args.write_prior)}")
    ablations = {
        "combined": (list(DEFAULT_EVIDENCE), True),
        "no metadata": (list(DEFAULT_EVIDENCE), False),
        "no attention": ([e for e in DEFAULT_EVIDENCE if e != "attention"], True),
        "all four": (list(EVIDENCE), True),
        "+3 references": (list(DEFAULT_EVIDENCE), True),
        **{f"{e} alone": ([e], False) for e in EVIDENCE},
    }
    rows = []
    for scenario, (tkey, pkey) in {"clean": ("clean", "prior"), "cue": ("cue", "prior_cue")}.items():
        for n in sizes:
            # prior pairs on the prior images, per (candidate, reference) left out below
            prior_pairs = {
                (a, b): pair_evidence(subset(obs[pkey][a], n), subset(obs[pkey][b], n))
                for a in suitable
                for b in suitable
                if a != b
            }
            for ref in refs:
                r_obs = subset(obs[tkey][ref], n)
                for cand in names:
                    if cand == ref:
                        continue
                    pairs = [v for (a, b), v in prior_pairs.items() if {a, b}.isdisjoint({cand, ref})]
                    prior = SuitabilityPrior.from_pairs(pairs, source="zoo, leave-models-out", n_images=n)
                    c_obs = subset(obs[tkey][cand], n)
                    # three more references of the user's own (suitable, neither the candidate nor the reference)
                    extra = [m for m in suitable if m not in (cand, ref)][:: max(1, len(suitable) // 3)][:3]
                    more = {m: subset(obs[tkey][m], n) for m in extra}
                    for abl, (evidence, metadata) in ablations.items():
                        if abl != "combined" and n != 20:
                            continue
                        c, r = c_obs, r_obs
                        if not metadata:
                            c, r = subset(c_obs, n, info={}), subset(r_obs, n, info={})
                        refs_ = more if abl == "+3 references" else None
                        v = judge_candidate(
                            c, r, refs_, prior=prior, alpha=args.alpha, evidence=evidence, n_perm=args.n_perm
                        )
                        rows.append({
                            "scenario": scenario, "n_images": n, "ablation": abl, "reference": ref,
                            "candidate": cand, "kind": infos[cand].get("kind", infos[cand]["data"]),
                            "arch": infos[cand]["arch"], "label": label[cand], **v.to_row(),
                        })  # fmt: skip
            print(f"{scenario} n={n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    write_csv(df, out / "verdicts.csv")
    scored = df[df["label"] >= 0]
    summary = []
    for (scenario, n, abl), g in scored.groupby(["scenario", "n_images", "ablation"], sort=False):
        y = g["label"].to_numpy()
        single = abl.endswith(" alone")
        score = g[abl.split(" ")[0]].to_numpy(float) if single else g["p_value"].fillna(0.5).to_numpy(float)
        called = g["verdict"]
        short = g[g["kind"] == "shortcut"]
        summary.append({
            "scenario": scenario, "n": n, "ablation": abl, "auc": auc(y, score),
            "accuracy": float(((called == "suitable") == (y == 1)).mean()),
            "unsuitable_called_suitable": int(((called == "suitable") & (y == 0)).sum()),
            "n_unsuitable": int((y == 0).sum()),
            "suitable_called_suitable": float((called[y == 1] == "suitable").mean()),
            "suitable_called_not": float((called[y == 1] == "not suitable").mean()),
            "shortcut_caught": float((short["verdict"] == "not suitable").mean()) if len(short) else float("nan"),
            "undecided": float((called == "undecided").mean()),
        })  # fmt: skip
    s = pd.DataFrame(summary)
    write_json({"summary": summary, "references": refs, "alpha": args.alpha, "sizes": sizes}, out / "results.json")
    print(f"\nload average {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s\n")
    print(md_table(s))
    per_kind = (
        scored[(scored["ablation"] == "combined") & (scored["n_images"] == 20)]
        .groupby(["scenario", "kind"])["verdict"]
        .value_counts()
        .unstack(fill_value=0)
    )
    print("\n" + md_table(per_kind, index=True))
    zoo_table = pd.DataFrame(
        [{k: infos[n].get(k) for k in ("name", "kind", "arch", "own_acc", "target_acc", "cue_acc", "label",
                                       "ground_truth")} for n in names]
    )  # fmt: skip
    print("\n" + md_table(zoo_table, digits=2))


if __name__ == "__main__":
    main()
