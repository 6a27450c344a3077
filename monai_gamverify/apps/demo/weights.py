"""The demo's weights: the shipped ones (checked against their manifest) or trained here through the bundles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from monai_gamverify.apps.demo.settings import MODELS, WEIGHTS_DIR, DemoSettings, bundles_dir, torch_device
from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.data.garbage import class_weights

__all__ = ["weights_config", "shipped_weights", "train_models", "load_model"]

logger = logging.getLogger("monai_gamverify.apps.demo")


def weights_config(settings: DemoSettings, seed: int = 0) -> dict:
    """What shipped weights must have been trained with to be used by a run: cohorts, epochs, models, seed.

    Args:
        settings: the run's sizes.
        seed: the run's base seed.

    Returns:
        A JSON-able dict, stored as ``config`` in ``demo_weights/manifest.json``.

    Example:
        >>> weights_config(demo_settings(), 0)["epochs"]["sos_ref"]
        30
    """
    return {
        "seed": int(seed),
        "size": settings.size,
        "quality_size": settings.quality_size,
        "n": dict(settings.n),
        "epochs": dict(settings.epochs),
        "garbage_ratio": settings.garbage_ratio,
        "models": json.loads(json.dumps(MODELS)),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_weights(settings: DemoSettings, seed: int = 0, weights_dir: str | os.PathLike | None = None) -> dict | None:
    """The shipped checkpoints (name -> path) when their manifest matches these settings and seed, else ``None``.

    Every file's SHA-256 is checked against the manifest (a changed or truncated file is not used).

    Example:
        >>> shipped_weights(demo_settings(), seed=0)
        {'sos_ref': PosixPath('.../demo_weights/sos_ref.pt'), ...}
    """
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text())
    if meta.get("config") != weights_config(settings, seed):
        return None
    paths = {}
    for name in MODELS:
        entry = meta.get("models", {}).get(name, {})
        path = root / f"{name}.pt"
        if not path.is_file() or entry.get("sha256") != _sha256(path):
            return None
        paths[name] = path
    return paths


@contextlib.contextmanager
def _bundle_logs(path: Path) -> Iterator[Any]:
    """Send the console logs of a bundle run (StatsHandler, evaluators) to ``path``; yields a function that moves
    the stream handlers created so far (call it after the workflow is initialised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, mode="w")
    fh.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    moved: list[tuple[logging.Logger, list[logging.Handler]]] = []

    def move() -> None:
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if not isinstance(lg, logging.Logger) or name.startswith("torch") or fh in lg.handlers:
                continue
            streams = [h for h in lg.handlers if type(h) is logging.StreamHandler]
            if streams:
                for h in streams:
                    lg.removeHandler(h)
                lg.addHandler(fh)
                moved.append((lg, streams))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter of transforms; the run's own log keeps errors
            yield move
    finally:
        for lg, streams in moved:
            lg.removeHandler(fh)
            for h in streams:
                lg.addHandler(h)
        fh.close()


def _train_one(
    name: str,
    data: Path,
    models_dir: Path,
    tb_dir: Path,
    log_dir: Path,
    epochs: int,
    val_interval: int,
    seed: int,
    device: torch.device,
    progress: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    spec = MODELS[name]
    # every model is trained in its own copy of the bundle (models_dir/<name>: configs/, models/model.pt): training
    # writes the bundle's passport and updates its metadata.json, which must not touch the package's bundles/
    root = models_dir / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(bundles_dir() / spec["bundle"] / "configs", root / "configs")
    ckpt_dir = root / "models"
    overrides = {
        "bundle_root": str(root),
        "dataset_dir": str(data / spec["data"]),
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(root / "eval"),
        "fit_screen": False,  # the demo fits its screens itself (stage 7)
        "log_dir": str(tb_dir / f"train_{name}"),
        "num_epochs": int(epochs),
        "val_interval": int(val_interval),
        "seed": int(seed) + int(spec["seed"]),
        "device": f"$torch.device('{device}')",
        **spec["overrides"],
        **dict(extra or {}),
    }
    t0 = time.perf_counter()
    wf_logger = logging.getLogger("monai.bundle.workflows")  # says "Logging file is set to False" otherwise
    level = wf_logger.level
    with _bundle_logs(log_dir / f"train_{name}.log") as move_logs:
        wf_logger.setLevel(logging.ERROR)
        wf = ConfigWorkflow(
            config_file=str(root / "configs" / "train.json"),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            **overrides,
        )
        wf_logger.setLevel(level)
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        move_logs()
        bar = tqdm(total=int(epochs), desc=f"train {name}", unit="epoch", disable=not progress, leave=False)

        def tick(engine: Any) -> None:
            bar.update(1)
            if evaluator.state.best_metric is not None and evaluator.state.best_metric != -1:
                bar.set_postfix(best=f"{evaluator.state.best_metric:.3f}")

        trainer.add_event_handler(Events.EPOCH_COMPLETED, tick)
        try:
            wf.run()
        finally:
            bar.close()
            wf.finalize()
    ckpt = ckpt_dir / "model.pt"
    if not ckpt.is_file():
        raise RuntimeError(f"training {name} wrote no checkpoint {ckpt}; see {log_dir / f'train_{name}.log'}")
    key = getattr(evaluator.state, "key_metric_name", None) or next(iter(evaluator.state.metrics), "metric")
    return {
        "checkpoint": ckpt,
        "seconds": round(time.perf_counter() - t0, 1),
        "epochs": int(epochs),
        "best_metric_name": key,
        "best_metric": float(evaluator.state.best_metric),
        "best_epoch": int(evaluator.state.best_metric_epoch),
    }


def train_models(
    data_dir: str | os.PathLike,
    models_dir: str | os.PathLike,
    settings: DemoSettings,
    seed: int = 0,
    device: str | torch.device | None = None,
    tb_dir: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Train the demo models through their bundles' ``configs/train.json`` (:data:`MODELS`).

    Args:
        data_dir: folder written by :func:`prepare_cohorts`.
        models_dir: each model is trained in its own copy of its bundle, ``models_dir/<name>`` (``configs/``,
            ``models/model.pt``: the best validation metric, ``models/passport.json``).
        settings: epochs and validation interval.
        seed: base seed (model ``k`` uses ``seed + MODELS[k]["seed"]``).
        device: training device (default: CUDA when available).
        tb_dir: TensorBoard folder (``train_<name>`` per model; default ``models_dir/tensorboard``).
        log_dir: bundle console logs (``train_<name>.log``; default ``models_dir``).
        progress: progress bars.
        names: train only these models (default: every model of :data:`MODELS`).

    Returns:
        name -> ``{"checkpoint", "seconds", "epochs", "best_metric_name", "best_metric", "best_epoch"}``.

    Raises:
        ValueError: an unknown model name.

    Example:
        >>> train_models("demo_out/data", "demo_out/models", demo_settings(quick=True))["sos_ref"]["checkpoint"]
    """

    names = list(MODELS) if names is None else list(names)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {list(MODELS)}")
    data, models = Path(data_dir), Path(models_dir)
    tb = Path(tb_dir) if tb_dir is not None else models / "tensorboard"
    logs = Path(log_dir) if log_dir is not None else models
    dev = torch_device(device)
    labels = [int(e["label"]) for e in load_datalist(data / "garbage" / "datalist.json", "training", check="none")]
    weights = class_weights(labels, 6).tolist()
    extra = {
        "sos_kplus1": {
            "datalist": str(data / "garbage" / "datalist.json"),
            "loss#weight": f"$torch.tensor({[round(w, 6) for w in weights]}, device=@device)",
        }
    }
    out = {}
    for name in names:
        out[name] = _train_one(
            name,
            data,
            models,
            tb,
            logs,
            settings.epochs[name],
            settings.val_interval,
            seed,
            dev,
            progress,
            extra.get(name),
        )
        r = out[name]
        logger.info(
            "    %s: %d epochs in %.0f s, best %s %.3f (epoch %s)",
            name, r["epochs"], r["seconds"], r["best_metric_name"], r["best_metric"], r["best_epoch"],
        )  # fmt: skip
    return out


def load_model(name: str, checkpoint: str | os.PathLike, device: torch.device) -> Any:
    """The bundle of demo model ``name`` with its checkpoint (a :class:`~monai_gamverify.bundle.BundleModel`)."""

    spec = MODELS[name]
    root = bundles_dir() / spec["bundle"]
    return load_bundle(root, checkpoint=checkpoint, device=device, overrides=spec["overrides"])
