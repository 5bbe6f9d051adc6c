"""Pieces that put a self-supervised network on MONAI's Ignite engines.

Contract of a pretraining network: ``network(image)`` returns a dict with at least ``"loss"``
(a scalar tensor) and whatever else the method wants logged or shown. With
``loss_function=network_loss`` MONAI's own ``SupervisedTrainer`` then runs the iteration
(AMP, gradient accumulation, events) and ``SupervisedEvaluator`` validates it unchanged.
Networks that can draw a reconstruction figure also provide ``figure_panels(image)``.
"""

from __future__ import annotations

import json
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
    "SeededInferer",
    "CPUAutocastInferer",
    "SeededValidationData",
    "GradientClipping",
    "StopOnNonFiniteLoss",
    "WarmupCosineSchedule",
    "latest_checkpoint",
    "RNGState",
    "BestMetricState",
    "RunSettings",
    "BestModelCheckpoint",
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


class SeededInferer(Inferer):
    """Runs ``network(inputs, generator=...)`` with a generator seeded afresh for every batch.

    For validation of a network that draws masks or corruptions from ``generator``: every epoch
    then sees the same draws, so its loss curve shows learning, not the luck of the draw.
    ``method`` names another method of the network to call the same way (e.g. an evaluation
    that returns per-sample errors); the network's ``module`` is used when it has one (DDP).
    """

    def __init__(self, seed: int = 0, method: str | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.method = method

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs):
        generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
        if self.method is not None:
            network = getattr(getattr(network, "module", network), self.method)
        return network(inputs, *args, generator=generator, **kwargs)


class CPUAutocastInferer(Inferer):
    """Runs ``inferer`` with the network under bfloat16 autocast on the CPU; its outputs come back in float32.

    MONAI's engines autocast only on CUDA (their ``amp`` is float16 with a gradient scaler), so
    the bundles give CPU runs their mixed precision here: the network's convolutions and matrix
    products run in bfloat16, while the weights, the optimiser, the loss and the blending of
    sliding windows stay in float32. Backward follows the forward's precision through autograd.
    It pays only where the CPU computes bfloat16 natively (AVX512-BF16 or AMX; elsewhere oneDNN
    emulates it, more slowly than float32), so a run on another CPU is warned. ``enabled=False``
    runs ``inferer`` as it is.
    """

    def __init__(self, inferer: Inferer, enabled: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.enabled = enabled
        if enabled and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            logger.warning("bfloat16 autocast on a CPU without native bfloat16 (AVX512-BF16 or AMX) is slower "
                           "than float32: set amp to false")

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)

        def autocast_network(*network_args, **network_kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = network(*network_args, **network_kwargs)
            return output.float() if output.is_floating_point() else output

        return self.inferer(inputs, autocast_network, *args, **kwargs)


class SeededValidationData:
    """Re-seed the validation data before every run of the evaluator, so every epoch validates the same crops.

    Random crops of the validation scans (and any other random transform of the validation
    dataset) otherwise continue their random stream from one validation to the next, and the
    loss curve mixes learning with the draw of crops. Before each run this seeds every random
    transform of the evaluator's dataset (they draw in this process when the loader has no
    workers) and gives the loader a generator with the same seed (worker processes seed their
    copies of the transforms from it). Training's random state is not touched.

    Attach to a MONAI evaluator: ``SeededValidationData(seed=0).attach(evaluator)``.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        loader = engine.state.dataloader
        if getattr(loader, "persistent_workers", False):
            raise ValueError(
                "SeededValidationData cannot re-seed persistent data loader workers: set persistent_workers "
                "to false in the validation data loader's config"
            )
        for transform in _random_objects(getattr(loader.dataset, "transform", None)):
            transform.set_random_state(self.seed)
        loader.generator = torch.Generator().manual_seed(self.seed)


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

    It covers torch (CPU and CUDA), numpy and Python's global generators, the generators of the
    given data loaders (their shuffling order and worker seeds) and the private RandomState of
    every random transform of their datasets, so that a run resumed from an epoch checkpoint
    draws the same crops, shuffles and masks as an uninterrupted one. In a distributed run every
    process keeps its own state. Everything is stored as tensors and numbers, loadable with
    ``weights_only=True``.

    Args:
        data_loaders: e.g. the trainer's and the evaluator's data loaders; None entries are skipped.
    """

    def __init__(self, *data_loaders) -> None:
        loaders = [loader for loader in data_loaders if loader is not None]
        transforms = [getattr(getattr(loader, "dataset", None), "transform", None) for loader in loaders]
        self.transforms = _random_objects([t for t in transforms if t is not None])
        self.generators = _unique(g for loader in loaders for g in _loader_generators(loader) if g is not None)

    def state_dict(self) -> dict:
        """This process's state; in a distributed run {"ranks": every process's state} (rank 0 saves it)."""
        state = self._process_state()
        if _world_size() > 1:
            states = [None] * _world_size()
            torch.distributed.all_gather_object(states, state)
            return {"ranks": states}
        return state

    def load_state_dict(self, state: dict) -> None:
        states = state.get("ranks", [state])
        if len(states) != _world_size():
            logger.warning(
                "the checkpoint holds the random state of %d process(es), this run has %d: rank r resumes with that "
                "of rank r %% %d, so this run does not repeat the interrupted one exactly", len(states), _world_size(),
                len(states),
            )
        self._load_process_state(states[_engine_rank() % len(states)])

    def _process_state(self) -> dict:
        _, keys, position, has_gauss, cached = np.random.get_state()
        version, python_state, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_extra": [int(position), int(has_gauss), float(cached)],
            "python": torch.tensor(python_state, dtype=torch.int64),
            "python_extra": [version, gauss],
            "transforms": [_numpy_state_to_tensors(t.R.get_state()) for t in self.transforms],
            "data_loader_generators": [generator.get_state() for generator in self.generators],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _load_process_state(self, state: dict) -> None:
        for key, mine in (("transforms", self.transforms), ("data_loader_generators", self.generators)):
            if len(state[key]) != len(mine):
                raise ValueError(
                    f"the checkpoint holds the random state of {len(state[key])} {key.replace('_', ' ')}, this run has "
                    f"{len(mine)}: resume with the same preprocessing and data loader config"
                )
        torch.set_rng_state(state["torch"])
        position, has_gauss, cached = state["numpy_extra"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
        version, gauss = state["python_extra"]
        random.setstate((version, tuple(state["python"].tolist()), gauss))
        for transform, saved in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_state_from_tensors(saved))
        for generator, saved in zip(self.generators, state["data_loader_generators"]):
            generator.set_state(saved)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _loader_generators(loader) -> tuple:
    """The generators a data loader draws from: its own (worker seeds) and its sampler's (shuffling)."""
    return getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)


def _unique(items) -> list:
    """Items in order, each object once (by identity)."""
    found, seen = [], set()
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            found.append(item)
    return found


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


class BestMetricState:
    """An evaluator's best key metric and its epoch, as a checkpointable object.

    MONAI keeps them in ``evaluator.state.best_metric`` / ``best_metric_epoch``, which ignite's
    ``Engine.state_dict`` does not hold; without them a resumed run would take its first
    validation for the best one.
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


class BestModelCheckpoint:
    """Write the network whenever the evaluator's key metric reaches a new best (atomically, on rank 0).

    Attach to a MONAI evaluator. "New best" is the evaluator's own decision (its ``metric_cmp_fn``,
    recorded in ``state.best_metric_epoch``), which :class:`ResumableCheckpoint` given the
    evaluator restores, so after a kill and resume a worse epoch never replaces the best model.
    (MONAI's ``CheckpointSaver(save_key_metric=True)`` keeps its own list of saved scores, which a
    new process starts empty.)

    Args:
        save_dir: folder of the file.
        save_dict: e.g. {"model": network}. A single entry is saved as its bare state dict, like
            CheckpointSaver does, several as a dict of state dicts.
        filename: name of the file in save_dir.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: dict, filename: str = "model.pt") -> None:
        if not save_dict:
            raise ValueError("BestModelCheckpoint needs save_dict, e.g. {'model': network}")
        self.save_dir = str(save_dir)
        self.save_dict = save_dict
        self.filename = filename
        self.saver = DiskSaver(self.save_dir, require_empty=False, atomic=True)

    def attach(self, engine: Engine) -> None:
        if getattr(engine.state, "key_metric_name", None) is None:
            raise ValueError("BestModelCheckpoint needs an evaluator with a key metric: set its key_val_metric")
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if state.best_metric_epoch != state.epoch:
            return
        states = {name: _unwrapped(obj).state_dict() for name, obj in self.save_dict.items()}
        self.saver(next(iter(states.values())) if len(states) == 1 else states, self.filename)
        logger.info("best %s %.4f at epoch %d: saved %s", state.key_metric_name, state.best_metric, state.epoch,
                    os.path.join(self.save_dir, self.filename))


def _unwrapped(obj: Any) -> Any:
    """The module inside a (Distributed)DataParallel wrapper, so saved keys have no "module." prefix."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return obj.module if isinstance(obj, wrappers) else obj


class RunSettings:
    """A run's settings as a checkpointable object: JSON text, loadable with ``weights_only=True``.

    Args:
        settings: JSON values by name, e.g. {"learning_rate": 1e-4, "seed": 0}.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.text = json.dumps(settings, sort_keys=True)

    def state_dict(self) -> dict:
        return {"json": self.text}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the command's settings are the run's; see :meth:`differences`."""

    def differences(self, saved: dict) -> list[str]:
        """``"name: saved -> this run's"`` for every setting that differs from a saved state_dict."""
        before, now = json.loads(saved["json"]), json.loads(self.text)
        return [
            f"{name}: {json.dumps(before.get(name))} -> {json.dumps(now.get(name))}"
            for name in sorted(before.keys() | now.keys())
            if before.get(name) != now.get(name)
        ]


class ResumableCheckpoint:
    """Save a resumable checkpoint every ``interval`` epochs and resume from the newest one.

    Added to the given objects: the trainer itself (configs cannot name it without a circular
    reference), the run's random state (:class:`RNGState` of the trainer's and the evaluator's
    data loaders), the evaluator's best metric (:class:`BestMetricState`) when ``evaluator`` is
    given, and the AMP gradient scaler when the trainer uses an enabled one. A resumed run thus
    continues at the saved epoch and iteration and, on CPU with a fixed seed, ends with the
    weights of an uninterrupted run. The checkpoint of an epoch is written after every other
    handler of that epoch (validation included); files are written atomically (a temporary
    file renamed into place) and only on rank 0: a crash during a save never leaves a corrupt
    newest checkpoint.

    Args:
        ckpt_dir: folder for ``{prefix}_epoch=N.pt``.
        save_dict: objects with state, e.g. {"model": ..., "optimizer": ..., "lr_scheduler": ...}.
        interval: epochs between checkpoints.
        n_saved: how many checkpoints to keep.
        prefix: file name prefix.
        evaluator: the validation engine whose best key metric (and data loader's random state)
            must survive a resume, e.g. the one a :class:`BestModelCheckpoint` is attached to.
        settings: the run's settings that a resumed run must share (JSON values, e.g. the
            learning rate, seed and labelled cases), recorded in every checkpoint. A checkpoint
            written with other settings, or with another number of iterations per epoch, is
            refused with the differences named: continuing it would mix two runs. The epoch
            budget is not a setting: raising it trains a finished run on.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: dict,
        interval: int = 1,
        n_saved: int = 1,
        prefix: str = "checkpoint",
        evaluator: Engine | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir = str(ckpt_dir)
        self.settings = RunSettings(settings or {})
        self.save_dict = save_dict
        self.interval = interval
        self.n_saved = n_saved
        self.prefix = prefix
        self.evaluator = evaluator
        self._objects: dict = {}
        self._resumed_from = ""
        self._complete = False
        self._saved_scaler: dict | None = None
        self._saver: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        loaders = (getattr(engine, "data_loader", None), getattr(self.evaluator, "data_loader", None))
        self._objects = dict(self.save_dict, trainer=engine, rng=RNGState(*loaders))
        if self.evaluator is not None:
            self._objects["evaluator"] = BestMetricState(self.evaluator)
        self._resumed_from = latest_checkpoint(self.ckpt_dir, self.prefix)
        if self._resumed_from:
            logger.info("resuming from %s", self._resumed_from)
            checkpoint = torch.load(self._resumed_from, map_location="cpu", weights_only=True)
            self._refuse_another_run(checkpoint, engine.state.epoch_length)
            max_epochs = engine.state.max_epochs
            try:
                Checkpoint.load_objects(self._objects, checkpoint)
            except (KeyError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"{self._resumed_from} does not fit this run ({error}). Resume with the config that wrote it, "
                    f"or move it out of {self.ckpt_dir} to train from scratch."
                ) from error
            engine.state.max_epochs = max_epochs  # the command's epoch budget wins over the saved one
            self._saved_scaler = checkpoint.get("scaler")
            # Ignite restarts a finished engine from epoch 0: the same command run again would train twice.
            self._complete = engine.state.epoch >= max_epochs
        else:
            logger.info("no checkpoint in %s: training starts from scratch", self.ckpt_dir)
        self._objects["settings"] = self.settings
        # Deferred to the start of the run: MONAI's Trainer.run() creates the AMP scaler afresh, and
        # the saver must come after every handler attached so far, validation included, so that a
        # checkpoint holds the evaluator's best metric and the random state after that epoch's validation.
        engine.add_event_handler(Events.STARTED, self._start)

    def _refuse_another_run(self, checkpoint: dict, epoch_length: int | None) -> None:
        """Raise when the checkpoint was written with other settings or another epoch length."""
        if "settings" not in checkpoint:
            logger.warning("%s records no settings: they cannot be checked against this run's", self._resumed_from)
        elif differences := self.settings.differences(checkpoint["settings"]):
            raise ValueError(
                f"{self._resumed_from} was written with other settings ({'; '.join(differences)}). Resume with "
                f"the settings that wrote it, or give this run another ckpt_dir than {self.ckpt_dir} to train "
                "from scratch with the new ones."
            )
        saved_length = checkpoint.get("trainer", {}).get("epoch_length")
        if None not in (epoch_length, saved_length) and saved_length != epoch_length:
            raise ValueError(
                f"{self._resumed_from} was written by a run of {saved_length} iterations per epoch, this run has "
                f"{epoch_length} (other data, labelled cases or batch settings). Resume with the settings that wrote "
                f"it, or give this run another ckpt_dir than {self.ckpt_dir} to train from scratch."
            )

    def _start(self, engine: Engine) -> None:
        if self._complete:
            logger.warning(
                "%s already holds all %d epochs of this run: nothing to train. Raise the epochs to train on, "
                "or move the checkpoint out of %s to train again from scratch.",
                self._resumed_from, engine.state.max_epochs, self.ckpt_dir,
            )
            engine.terminate()
            return
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self._objects["scaler"] = scaler
            if self._saved_scaler is not None:
                scaler.load_state_dict(self._saved_scaler)
            elif self._resumed_from:
                logger.warning("%s holds no AMP scaler state: the gradient scale starts afresh", self._resumed_from)
        else:
            self._objects.pop("scaler", None)
            if self._saved_scaler is not None:
                logger.warning("%s holds an AMP scaler state, unused as this run has no AMP", self._resumed_from)
        self._saved_scaler = None
        if self._saver is None:
            self._saver = Checkpoint(
                self._objects,
                DiskSaver(self.ckpt_dir, require_empty=False, atomic=True),
                filename_prefix=self.prefix,
                n_saved=self.n_saved,
                global_step_transform=lambda e, _: e.state.epoch,
                filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
            )
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._saver)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._after_save)

    def _after_save(self, engine: Engine) -> None:
        self._keep_newest()
        if engine.state.epoch < engine.state.max_epochs and engine.state.dataloader is not None:
            # A run resumed from this checkpoint starts the next epoch with a fresh data iterator, so
            # this one does too: running the old one to its end would draw once more from the
            # sampler's generator (torch's RandomSampler does) and shift every later shuffle.
            engine.set_data(engine.state.dataloader)

    def _keep_newest(self) -> None:
        """Remove older checkpoints, including those a resumed run inherited from the killed one."""
        if _engine_rank() != 0:
            return
        checkpoints = sorted(Path(self.ckpt_dir).glob(f"{self.prefix}_epoch=*.pt"), key=lambda p: p.stat().st_mtime)
        for old in checkpoints[: -self.n_saved]:
            old.unlink(missing_ok=True)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _engine_rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1
