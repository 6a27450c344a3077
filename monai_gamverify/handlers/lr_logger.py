"""The optimizer's learning rate as a TensorBoard scalar (:class:`LearningRateLogger`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import min_version, optional_import
from torch.utils.tensorboard import SummaryWriter

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["LearningRateLogger"]


class LearningRateLogger:
    """Write the learning rate of each parameter group of ``optimizer`` to TensorBoard (``{tag}`` / ``{tag}_g{i}``).

    Args:
        optimizer: the optimizer (default: ``engine.optimizer``).
        summary_writer: a ``SummaryWriter``; if ``None``, one is created in ``log_dir``.
        log_dir: TensorBoard directory when no writer is given.
        tag: scalar tag.
        epoch_level: log at epoch starts (``True``) or every iteration.

    Example:
        >>> LearningRateLogger(log_dir="runs").attach(trainer)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        summary_writer: Any = None,
        log_dir: str | os.PathLike | None = None,
        tag: str = "lr",
        epoch_level: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self._writer = summary_writer
        self._own_writer = summary_writer is None
        self.log_dir = str(log_dir) if log_dir is not None else "./runs"
        self.tag = tag
        self.epoch_level = epoch_level

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_STARTED`` (or ``ITERATION_STARTED``); the writer is closed on ``COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_STARTED if self.epoch_level else Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _close(self, engine: Engine) -> None:
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    def __call__(self, engine: Engine) -> None:
        optimizer = self.optimizer if self.optimizer is not None else getattr(engine, "optimizer", None)
        if optimizer is None:
            raise ValueError("LearningRateLogger needs an optimizer: the engine has none, pass optimizer=")
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            tag = self.tag if len(groups) == 1 else f"{self.tag}_g{i}"
            self._writer.add_scalar(tag, float(group["lr"]), step)
        self._writer.flush()
