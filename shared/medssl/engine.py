"""Pieces that put a self-supervised network on MONAI's Ignite engines.

Contract of a pretraining network: ``network(image)`` returns a dict with at least ``"loss"``
(a scalar tensor) and whatever else the method wants logged or shown. With
``loss_function=network_loss`` MONAI's own ``SupervisedTrainer`` then runs the iteration
(AMP, gradient accumulation, events) and ``SupervisedEvaluator`` validates it unchanged.
Networks that can draw a reconstruction figure also provide ``figure_panels(image)``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = [
    "network_loss",
    "output_loss",
    "MeanLoss",
    "GradientClipping",
    "StopOnNonFiniteLoss",
    "WarmupCosineSchedule",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)


def network_loss(prediction: dict[str, torch.Tensor], _target: Any = None) -> torch.Tensor:
    """Loss function for SupervisedTrainer when the network computes its own loss."""
    return prediction["loss"]


def output_loss(output: dict | Sequence[dict]) -> torch.Tensor:
    """Read the loss of a trainer's or evaluator's iteration output (for handlers and metrics)."""
    if isinstance(output, dict):
        return output[CommonKeys.LOSS] if CommonKeys.LOSS in output else output[CommonKeys.PRED]["loss"]
    return output[0][CommonKeys.PRED]["loss"]


class MeanLoss(Metric):
    """Mean of the network's own loss over an evaluation run, weighted by batch size."""

    def __init__(self, output_transform: Callable = lambda output: output, device: str | torch.device = "cpu"):
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._count = 0

    def update(self, output: dict) -> None:
        loss = output[CommonKeys.PRED]["loss"].detach()
        batch = output[CommonKeys.IMAGE].shape[0]
        self._sum += loss.to(self._sum) * batch
        self._count += batch

    def compute(self) -> float:
        if self._count == 0:
            raise RuntimeError("MeanLoss has seen no batch: is the validation dataset empty?")
        return float(self._sum) / self._count


class GradientClipping:
    """Clip the global gradient norm after backward (unscaling AMP gradients first).

    Attach to a MONAI trainer: ``GradientClipping(max_norm=1.0).attach(trainer)``.
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class StopOnNonFiniteLoss:
    """Stop training with an error naming the iteration when the loss becomes NaN or infinite.

    It runs after the loss and before backward, so the weights (and any checkpoint written
    afterwards) are those of the last good iteration.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output[CommonKeys.LOSS]
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"loss is {loss.detach().float().cpu().tolist()} at iteration {engine.state.iteration} "
                f"(epoch {engine.state.epoch}); training stopped before this step changed any weight. "
                "The last checkpoint was written before it: lower the learning rate or check the data, "
                "then run the same command again to resume."
            )


class WarmupCosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up for warmup_steps, then cosine from the base rate down to min_lr_ratio of it.

    Stepped once per iteration (MONAI's LrScheduleHandler with epoch_level=False).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest ``{prefix}*.pt`` in folder, or "" when there is none (fresh start)."""
    candidates = sorted(Path(folder).glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime)
    if candidates:
        logger.info("resuming from %s", candidates[-1])
        return str(candidates[-1])
    return ""
