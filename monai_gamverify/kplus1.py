"""K+1 "garbage" class: widen a trained classifier, mix garbage data in, reject at inference, count rejections.

The post-hoc out-of-distribution baselines the garbage class is compared with (maximum softmax probability, energy
score, Mahalanobis distance, AUROC / FPR at 95 % TPR) are in :mod:`monai_gamverify.metrics.ood`.

Example:
    >>> model6 = widen_classifier(model5)  # 5 SOS stages -> 5 stages + garbage, a deep copy
    >>> train = mix_garbage(datalist, {"chin": chin_files}, num_classes=5, ratio=0.2, seed=0)
    >>> loss = torch.nn.CrossEntropyLoss(weight=class_weights([d["label"] for d in train], 6))
    >>> post = RejectGarbaged(keys="pred", threshold=0.5)

The pieces live in their role packages; this module re-exports them (bundle configs and earlier code import from
here): the head in :mod:`monai_gamverify.networks.heads`, the data in :mod:`monai_gamverify.data.garbage`, the
transform in :mod:`monai_gamverify.transforms.garbage` and the handler in :mod:`monai_gamverify.handlers.garbage`.
"""

from __future__ import annotations

from monai_gamverify.data.garbage import class_weights, mix_garbage, mix_garbage_dirs
from monai_gamverify.handlers.garbage import RejectionCounter
from monai_gamverify.networks.heads import find_classifier_head, init_from_checkpoint, widen_classifier
from monai_gamverify.transforms.garbage import RejectGarbageD, RejectGarbaged, RejectGarbageDict

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
