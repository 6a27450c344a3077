"""Train the ``gamverify demo`` models and write the weights the package ships (``apps/demo_weights``).

The models are trained exactly as ``gamverify demo --train True`` would train them: the demo's cohorts (same
settings and seed, so byte-identical volumes) and each bundle's ``configs/train.json`` through
``monai.bundle.ConfigWorkflow`` (:func:`monai_gamverify.apps.demo.train_models`). The best checkpoint of each run is
re-saved as a plain state dict (``<name>.pt``, loaded with ``torch.load(weights_only=True)``), and
``manifest.json`` records the settings (the demo only uses the weights when its settings and seed match), the
SHA-256 of every file, the validation metric, the training time and the versions.

Usage:
    python scripts/make_demo_weights.py --seed 0 [--out monai_gamverify/apps/demo_weights] [--work /tmp/gv_weights]
        [--device cpu] [--only sos_shortcut,...]

``--only`` trains just the named models and keeps every other shipped file byte-identical: it refuses unless each
other model's file is present, its SHA-256 matches the manifest and its entry of the training configuration
(cohort size and seed, epochs, bundle overrides) is unchanged; the manifest's configuration is then updated to the
current one. The shipped files were produced with ``--seed 0`` on CPU (see ``docs/demo.md`` for the measured
metrics).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from monai_gamverify.apps.demo import MODELS, WEIGHTS_DIR, demo_settings, prepare_cohorts, train_models, weights_config
from monai_gamverify.io import atomic_path, write_json


def _kept_models(out: Path, config: dict, keep: list[str]) -> dict[str, dict]:
    """The manifest entries of the shipped models that ``--only`` keeps, after checking that each is still what the
    current configuration would train (file present, SHA-256 as in the manifest, same cohort, epochs and overrides).

    Raises:
        SystemExit: a kept model is missing, changed, or would now be trained differently (retrain it too).
    """
    manifest = out / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"--only needs the shipped weights and {manifest}; run without --only")
    meta = json.loads(manifest.read_text())
    old = meta.get("config", {})
    problems = []
    for key in ("seed", "size", "quality_size", "garbage_ratio"):
        if old.get(key) != config[key]:
            problems.append(f"{key}: {old.get(key)} -> {config[key]}")
    kept = {}
    for name in keep:
        spec, entry = config["models"][name], meta.get("models", {}).get(name)
        path = out / f"{name}.pt"
        cohorts = [spec["data"]] if spec["data"] != "garbage" else ["sos", "chin", "cvm"]
        if entry is None or not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(f"{name}: file missing or changed")
        elif old.get("models", {}).get(name) != spec or old.get("epochs", {}).get(name) != config["epochs"][name]:
            problems.append(f"{name}: its training configuration changed")
        elif any(old.get("n", {}).get(c) != config["n"][c] for c in cohorts):
            problems.append(f"{name}: the size of its training cohort changed")
        else:
            kept[name] = entry
    if problems:
        raise SystemExit("--only cannot keep the other shipped weights: " + "; ".join(problems) + " (retrain them)")
    return kept


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="base seed of the cohorts and of training (demo default 0)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="where the weights and manifest.json are written")
    ap.add_argument("--work", default="/tmp/gamverify_demo_weights", help="scratch folder (cohorts, runs, logs)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", default=None, help="comma-separated models to (re)train; the others are kept as shipped")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import monai

    import monai_gamverify

    settings = demo_settings(quick=False)
    work, out = Path(args.work), Path(args.out)
    config = weights_config(settings, args.seed)
    names = list(MODELS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    kept = _kept_models(out, config, [n for n in MODELS if n not in names]) if args.only else {}
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    prepare_cohorts(work / "data", settings, seed=args.seed)
    runs = train_models(
        work / "data",
        work / "models",
        settings,
        seed=args.seed,
        device=args.device,
        tb_dir=work / "tensorboard",
        log_dir=work / "logs",
        names=names,
    )
    out.mkdir(parents=True, exist_ok=True)
    models = dict(kept)
    for name, run in runs.items():
        state = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        dst = out / f"{name}.pt"
        with atomic_path(dst) as tmp:
            torch.save(state, tmp)
        models[name] = {
            "file": dst.name,
            "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
            "bytes": dst.stat().st_size,
            **{k: v for k, v in run.items() if k != "checkpoint"},
            "bundle": MODELS[name]["bundle"],
        }
    models = {n: models[n] for n in MODELS}  # the manifest lists the models in the demo's order
    command = f"python scripts/make_demo_weights.py --seed {args.seed}"
    previous = json.loads((out / "manifest.json").read_text()) if kept else {}
    updated = [*previous.get("updated_with", []), f"{command} --only {','.join(names)}"] if kept else []
    manifest = {
        "created_with": previous.get("created_with", command),
        **({"updated_with": updated} if updated else {}),
        "config": config,
        "models": models,
        "total_seconds": round(previous.get("total_seconds", 0.0) + time.perf_counter() - t0, 1),
        "versions": {
            "monai_gamverify": monai_gamverify.__version__,
            "monai": monai.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    write_json(manifest, out / "manifest.json")
    keys = ("best_metric_name", "best_metric", "seconds")
    print(json.dumps({k: {kk: v[kk] for kk in keys} for k, v in models.items() if k in runs}))
    print(f"weights and manifest -> {out} ({manifest['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
