"""``gamverify demo``: the whole package on synthetic data in a few CPU minutes, with one self-contained report.

Modules: :mod:`.settings` (models, sizes, where bundles and shipped weights are), :mod:`.weights` (shipped or trained
weights), :mod:`.stages` (cohorts, explanations through the engine, verification, energy, K+1), :mod:`.report`
(verdicts, HTML, TensorBoard, printed summary), :mod:`.runner` (:func:`run_demo`).

Stages (each logged at INFO on the ``monai_gamverify.apps.demo`` logger and passed to ``on_stage``; long loops show
tqdm bars):

1. **cohorts** — synthetic SOS (the task), chin and cervical-vertebrae volumes (other anatomy), head-and-neck
   image-quality volumes with simulated raters (:mod:`monai_gamverify.data.synthetic`), SOS volumes carrying a
   stage-encoding marker (the shortcut model's training data), pure-noise volumes, the mixed K+1 datalist
   (:func:`monai_gamverify.kplus1.mix_garbage`) and the verdict's target volumes.
2. **models** — six ``small_cnn`` bundles: the SOS reference ``sos_ref``, a second SOS model ``sos_b`` (other seed,
   wider), a chin model ``chin`` and a CVM model ``cvm`` (both unsuitable for SOS), the K+1 SOS model ``sos_kplus1``
   and the 2D image-quality regressor ``quality``; and a shortcut ("Clever Hans") model ``sos_shortcut``, a DenseNet
   trained on SOS volumes carrying a burned-in marker whose intensity encodes the stage. By default the weights
   shipped in ``monai_gamverify/apps/demo_weights`` (written by ``scripts/make_demo_weights.py --seed 0`` through the
   same bundle configs) are used when they match the cohort settings; otherwise, or with ``train=True``, every model
   is trained here through its bundle's ``configs/train.json`` (``monai.bundle.ConfigWorkflow`` with overrides), each
   in its own copy of the bundle (``models/<name>``, with the passport training writes).
3. **explanations** — Grad-CAM of the reference and the chin model on a few SOS test volumes, through the
   single-image engine (:class:`monai_gamverify.apps.pipeline.ImagePipeline`): NIfTI maps, PNG overlays on three
   orthogonal slices, pointing game against the ground-truth mask, text descriptions.
4. **verification** — the label-free model-level verdict
   (:func:`monai_gamverify.apps.suitability.verify_suitability`): each candidate (``sos_b``, ``sos_kplus1``, ``chin``,
   ``cvm``, ``sos_shortcut``) next to the one trusted reference ``sos_ref``, with the prior shipped with the package,
   on 20 unlabeled SOS volumes no model saw and on the same volumes carrying the marker (the data a shortcut model
   agrees on): ``suitable`` / ``not suitable`` / ``undecided`` with p-value, reasons and each evidence; and the
   measured ground truth (accuracy of the SOS-task models with and without the marker, never shown to the verdict).
5. **attribution energy** — AE of the quality model on the held-out quality volumes and its leave-one-out Spearman
   analysis.
6. **garbage class** — rejections of the K+1 model on held-out SOS, chin, CVM and noise volumes, against the
   post-hoc baselines (MSP, energy score).
7. **screen** — an in-distribution screen for the SOS reference model (:mod:`monai_gamverify.screening`), fitted on
   the SOS training volumes and calibrated on SOS volumes no model saw, run on SOS, chin, CVM and noise volumes.
8. **report** — ``report.html``, ``summary.json``, TensorBoard summary scalars and the summary text
   (:func:`format_summary`; ``gamverify demo`` prints it).

The output directory must be new, empty, or a previous demo output (marked by :data:`DEMO_MARKER`).

Example:
    >>> summary = run_demo("demo_out")          # or: gamverify demo --out demo_out
    >>> summary["report"]
    'demo_out/report.html'
"""

from __future__ import annotations

from monai_gamverify.apps.demo.report import format_summary
from monai_gamverify.apps.demo.runner import DEMO_MARKER, run_demo
from monai_gamverify.apps.demo.settings import MODELS, WEIGHTS_DIR, DemoSettings, bundles_dir, demo_settings
from monai_gamverify.apps.demo.stages import prepare_cohorts
from monai_gamverify.apps.demo.weights import load_model, shipped_weights, train_models, weights_config

__all__ = [
    "DemoSettings",
    "demo_settings",
    "MODELS",
    "WEIGHTS_DIR",
    "DEMO_MARKER",
    "bundles_dir",
    "prepare_cohorts",
    "train_models",
    "shipped_weights",
    "weights_config",
    "load_model",
    "run_demo",
    "format_summary",
]
