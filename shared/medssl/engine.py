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
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.transforms import Randomizable, Transform
from monai.utils import CommonKeys

__all__ = [
    "network_loss",
    "output_loss",
    "MeanOutput",
    "MethodInferer",
    "GradientClipping",
    "StopOnNonFiniteLoss",
    "WarmupCosineSchedule",
    "latest_checkpoint",
    "RNGState",
    "ResumableCheckpoint",
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


class MeanOutput(Metric):
    """Mean over an evaluation run of one entry of the network's output dict.

    The entry is a scalar (weighted by batch size) or a per-sample (B,) tensor. With the default
    key "loss" this is the validation loss of a pretraining network.
    """

    required_output_keys = (CommonKeys.IMAGE, CommonKeys.PRED)

    def __init__(self, key: str = "loss", output_transform: Callable = lambda output: output,
                 device: str | torch.device = "cpu") -> None:
        self.key = key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._count = 0

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, dict]) -> None:
        image, prediction = output
        value = prediction[self.key].detach().to(self._sum)
        batch = image.shape[0]
        self._sum += value.sum() if value.ndim else value * batch
        self._count += batch

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count == 0:
            raise RuntimeError(f"MeanOutput({self.key!r}) has seen no batch: is the evaluation dataset empty?")
        return float(self._sum) / self._count


class MethodInferer(Inferer):
    """Inferer that calls a named method of the network instead of forward (e.g. an evaluation)."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs):
        network = getattr(network, "module", network)
        return getattr(network, self.method)(inputs, *args, **kwargs)


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
    """Path of the newest ``{prefix}*.pt`` in folder, or "" when there is none."""
    candidates = sorted(Path(folder).glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime)
    return str(candidates[-1]) if candidates else ""


class RNGState:
    """The random state a training run draws from, as a checkpointable object.

    It covers torch (CPU and CUDA), numpy and Python's global generators and the private
    RandomState of every random transform of the training data loader, so that a run resumed
    from an epoch checkpoint draws the same crops, shuffles and masks as an uninterrupted one.
    Everything is stored as tensors and numbers, loadable with ``weights_only=True``.
    """

    def __init__(self, data_loader=None) -> None:
        transform = getattr(getattr(data_loader, "dataset", None), "transform", None)
        self.transforms = _random_objects(transform) if transform is not None else []

    def state_dict(self) -> dict:
        _, keys, position, has_gauss, cached = np.random.get_state()
        version, python_state, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_extra": [int(position), int(has_gauss), float(cached)],
            "python": torch.tensor(python_state, dtype=torch.int64),
            "python_extra": [version, gauss],
            "transforms": [_numpy_state_to_tensors(t.R.get_state()) for t in self.transforms],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        position, has_gauss, cached = state["numpy_extra"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
        version, gauss = state["python_extra"]
        random.setstate((version, tuple(state["python"].tolist()), gauss))
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds the random state of {len(state['transforms'])} data transforms, this run has "
                f"{len(self.transforms)}: resume with the same preprocessing config"
            )
        for transform, saved in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_state_from_tensors(saved))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _random_objects(root: object) -> list[Randomizable]:
    """Every Randomizable reachable from root through attributes and lists, in a fixed order.

    MONAI's random dictionary transforms hold random array transforms with their own
    RandomState (e.g. RandCropByPosNegLabeld.cropper), so the top level is not enough.
    """
    found, seen, stack = [], set(), [root]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, (Transform, Randomizable)) and id(item) not in seen:
            seen.add(id(item))
            if isinstance(item, Randomizable):
                found.append(item)
            stack.extend(reversed(list(vars(item).values())))
    return found


def _numpy_state_to_tensors(state: tuple) -> list:
    _, keys, position, has_gauss, cached = state
    return [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def _numpy_state_from_tensors(saved: list) -> tuple:
    keys, position, has_gauss, cached = saved
    return ("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached)


class ResumableCheckpoint:
    """Save a resumable checkpoint every ``interval`` epochs and resume from the newest one.

    The trainer itself and the run's random state (:class:`RNGState`) are added to the saved objects when the handler is attached (configs cannot
    name it without a circular reference), so a resumed run continues at the saved epoch and
    iteration. Files are written atomically (a temporary file renamed into place) and only on
    rank 0: a crash during a save never leaves a corrupt newest checkpoint.

    Args:
        ckpt_dir: folder for ``{prefix}_epoch=N.pt``.
        save_dict: objects with state, e.g. {"model": ..., "optimizer": ..., "lr_scheduler": ...}.
        interval: epochs between checkpoints.
        n_saved: how many checkpoints to keep.
        prefix: file name prefix.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: dict,
        interval: int = 1,
        n_saved: int = 1,
        prefix: str = "checkpoint",
    ) -> None:
        self.ckpt_dir = str(ckpt_dir)
        self.save_dict = save_dict
        self.interval = interval
        self.n_saved = n_saved
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        objects = dict(self.save_dict, trainer=engine, rng=RNGState(getattr(engine, "data_loader", None)))
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path:
            logger.info("resuming from %s", path)
            max_epochs = engine.state.max_epochs
            Checkpoint.load_objects(objects, torch.load(path, map_location="cpu", weights_only=True))
            engine.state.max_epochs = max_epochs  # the command's epoch budget wins over the saved one
        else:
            logger.info("no checkpoint in %s: training starts from scratch", self.ckpt_dir)
        saver = Checkpoint(
            objects,
            DiskSaver(self.ckpt_dir, require_empty=False, atomic=True),
            filename_prefix=self.prefix,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.epoch,
            filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), saver)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._keep_newest)

    def _keep_newest(self, _engine: Engine) -> None:
        """Remove older checkpoints, including those a resumed run inherited from the killed one."""
        if _engine_rank() != 0:
            return
        checkpoints = sorted(Path(self.ckpt_dir).glob(f"{self.prefix}_epoch=*.pt"), key=lambda p: p.stat().st_mtime)
        for old in checkpoints[: -self.n_saved]:
            old.unlink(missing_ok=True)


def _engine_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
