"""Fine-tuning pieces for segmentation on a pretrained encoder.

- :func:`pretrained_network`: initialise the encoder of a UNETR / SwinUNETR / SegResNet from a
  pretraining bundle (:mod:`medssl.zoo`) and optionally freeze it (frozen-encoder probing).
- :func:`parameter_groups`: optimizer groups with layer-wise learning-rate decay (deeper encoder
  levels and the decoder learn faster than the patch embedding) and no weight decay on biases
  and norms.
- :func:`label_subset`: train on the first k labelled cases (label-efficiency experiments).
- :func:`name_metric_classes`: organ names instead of "class0".. in MetricsSaver's CSV reports.
- :class:`SegmentationOverlayHandler`: a PNG of image + label and image + prediction on the
  axial / coronal / sagittal views of the first validation case after each validation.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from medssl.figures import orthogonal_views
from medssl.zoo import ENCODER_SUBMODULES, load_pretrained_encoder

__all__ = [
    "encoder_parameter_names",
    "freeze_encoder",
    "pretrained_network",
    "encoder_level",
    "parameter_groups",
    "label_subset",
    "name_metric_classes",
    "SegmentationOverlayHandler",
]

logger = logging.getLogger(__name__)

# Parameter names -> encoder level for layer-wise decay: level 0 is the stem (patch embedding or
# first convolution); stage/block i is level i + 1. Anything else (encoder output norm, decoder,
# head) gets the top level.
_LEVEL_PATTERNS: dict[str, tuple[re.Pattern, re.Pattern]] = {
    "vit": (re.compile(r"^vit\.patch_embedding\."), re.compile(r"^vit\.blocks\.(\d+)\.")),
    "swin": (re.compile(r"^swinViT\.patch_embed\."), re.compile(r"^swinViT\.layers(\d+)c?\.")),
    "cnn": (re.compile(r"^convInit\."), re.compile(r"^down_layers\.(\d+)\.")),
}


def _unwrap(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel


def encoder_parameter_names(network: nn.Module, kind: str) -> list[str]:
    """Names of the parameters that belong to the pretrained encoder of the segmentation network."""
    roots = tuple(f"{name}." for name in ENCODER_SUBMODULES[kind])
    return [name for name, _ in _unwrap(network).named_parameters() if name.startswith(roots)]


def freeze_encoder(network: nn.Module, kind: str) -> int:
    """Stop gradients through the encoder's parameters; return how many tensors were frozen."""
    names = set(encoder_parameter_names(network, kind))
    for name, parameter in _unwrap(network).named_parameters():
        if name in names:
            parameter.requires_grad_(False)
    logger.info("encoder frozen: %d %s encoder tensors get no gradient, the decoder trains", len(names), kind)
    return len(names)


def pretrained_network(
    network: nn.Module,
    kind: str,
    pretrained: Mapping[str, Any] | None = None,
    freeze: bool = False,
) -> nn.Module:
    """Initialise ``network``'s encoder from the source named in ``pretrained``; return the network.

    Args:
        network: from ``medssl.encoders.build_segmentation_network(kind, ...)``.
        kind: "vit", "swin" or "cnn".
        pretrained: keyword arguments of :func:`medssl.zoo.load_pretrained_encoder` (bundle_name,
            bundle_dir, source, version, url, sha256, model_path, model_file, key_in_ckpt, strict);
            None or all sources None: random initialisation (logged).
        freeze: keep the encoder fixed (frozen-encoder probing); needs a pretrained source.
    """
    report = load_pretrained_encoder(network, kind, **dict(pretrained or {}))
    if freeze:
        if report is None:
            raise ValueError("freeze_encoder is true but no pretrained source is named: a frozen random encoder "
                             "learns nothing; set pretrained#bundle_name (or url / model_path) or freeze_encoder false")
        freeze_encoder(network, kind)
    return network


def encoder_level(name: str, kind: str, num_levels: int) -> int:
    """Level of parameter ``name`` for layer-wise decay: 0 stem ... num_levels - 1 decoder/head."""
    stem, stage = _LEVEL_PATTERNS[kind]
    if stem.match(name):
        return 0
    match = stage.match(name)
    if match:
        index = int(match.group(1))
        # Swin stages are numbered from 1 (layers1..layers4), ViT blocks and CNN stages from 0.
        return index if kind == "swin" else index + 1
    return num_levels - 1


def _num_levels(network: nn.Module, kind: str) -> int:
    if kind == "vit":
        return len(network.vit.blocks) + 2
    if kind == "swin":
        return sum(1 for name, _ in network.swinViT.named_children() if re.fullmatch(r"layers\d+", name)) + 2
    return len(network.down_layers) + 2


def parameter_groups(
    network: nn.Module,
    kind: str,
    lr: float,
    weight_decay: float = 1e-5,
    layer_decay: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups for fine-tuning.

    Args:
        network: the segmentation network (parameters with requires_grad False are left out,
            so a frozen encoder adds nothing).
        kind: "vit", "swin" or "cnn" (how encoder levels are named).
        lr: learning rate of the top level (decoder, head, ViT output norm).
        weight_decay: applied to weights; biases, norms and other 1-D tensors get none.
        layer_decay: None or 1 for one rate everywhere; d < 1 scales level l's rate by
            d ** (top - l), so the patch embedding moves least (ViT: 12 blocks -> 14 levels).

    Returns:
        a list of {"params", "lr", "weight_decay", "lr_scale", "level"} dicts for any
        torch optimizer; schedulers scale every group's own lr.
    """
    network = _unwrap(network)
    decay = 1.0 if layer_decay is None else float(layer_decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    num_levels = _num_levels(network, kind)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        level = encoder_level(name, kind, num_levels) if decay < 1.0 else num_levels - 1
        decayed = parameter.ndim > 1
        group = groups.get((level, decayed))
        if group is None:
            scale = decay ** (num_levels - 1 - level)
            group = {"params": [], "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0,
                     "lr_scale": scale, "level": level}
            groups[(level, decayed)] = group
        group["params"].append(parameter)
    if not groups:
        raise ValueError("the network has no trainable parameter (everything frozen?)")
    ordered = [groups[key] for key in sorted(groups)]
    if decay < 1.0:
        logger.info("layer-wise lr decay %.3g over %d levels: lr %.3g (stem) .. %.3g (decoder)",
                    decay, num_levels, min(g["lr"] for g in ordered), lr)
    return ordered


def label_subset(
    datalist: Sequence[dict], fraction: float | None = None, count: int | None = None
) -> list[dict]:
    """The first labelled cases of a datalist: ``count`` of them, or ``ceil(fraction * n)``.

    Both None: the whole list. The order of the datalist decides (no random draw), so the same
    setting always trains on the same cases and smaller subsets are contained in larger ones.
    """
    items = list(datalist)
    if fraction is not None and count is not None:
        raise ValueError(f"give label_fraction or label_count, not both (got {fraction} and {count})")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
        count = math.ceil(fraction * len(items))
    if count is None:
        return items
    if not 1 <= count <= len(items):
        raise ValueError(f"label_count must be between 1 and the {len(items)} training cases, got {count}")
    logger.info("training on the first %d of %d labelled cases", count, len(items))
    return items[:count]


def name_metric_classes(
    report_dir: str | os.PathLike, metric_names: Sequence[str], class_names: Sequence[str], delimiter: str = ","
) -> list[Path]:
    """Put organ names in the CSV reports of MONAI's MetricsSaver.

    MetricsSaver (monai 1.6) labels per-class columns and rows "class0", "class1", ...; this
    rewrites ``{metric}_raw.csv`` and ``{metric}_summary.csv`` of each metric with
    ``class_names`` in that order (the classes the metric saw: without background when it was
    excluded). Returns the files rewritten.
    """
    names = {f"class{index}": name for index, name in enumerate(class_names)}
    rewritten = []
    for metric in metric_names:
        for suffix in ("raw", "summary"):
            path = Path(report_dir) / f"{metric}_{suffix}.csv"
            if not path.is_file():
                continue
            lines = path.read_text().splitlines()
            renamed = [delimiter.join(names.get(cell, cell) for cell in line.split(delimiter)) for line in lines]
            path.write_text("\n".join(renamed) + "\n")
            rewritten.append(path)
    if not rewritten:
        raise FileNotFoundError(f"no MetricsSaver report for {list(metric_names)} in {report_dir}")
    return rewritten


class SegmentationOverlayHandler:
    """After every ``interval``-th validation, draw label and prediction over the first case.

    Attach to the evaluator. It keeps the first sample of each run's first iteration (the decollated
    evaluator output after postprocessing, where ``label_key`` and ``pred_key`` hold one-hot
    or index maps) and writes ``overlay_epoch{N}.png`` with two rows, image + label and
    image + prediction, on the axial / coronal / sagittal views (N: the trainer's epoch).

    Args:
        output_dir: folder of the PNGs.
        interval: validations between figures.
        summary_writer: optional TensorBoard SummaryWriter that gets the same picture.
        image_key, label_key, pred_key: keys of the evaluator output.
        vmin, vmax: image intensities shown from black to white (the preprocessing's range).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        interval: int = 1,
        summary_writer=None,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        vmin: float = 0.0,
        vmax: float = 1.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.interval = interval
        self.summary_writer = summary_writer
        self.image_key, self.label_key, self.pred_key = image_key, label_key, pred_key
        self.vmin, self.vmax = vmin, vmax
        self._runs = 0
        self._sample_pending = False
        self._sample: dict[str, torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._expect_sample)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first_sample)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _expect_sample(self, _engine: Engine) -> None:
        self._sample_pending = True

    def _keep_first_sample(self, engine: Engine) -> None:
        if not self._sample_pending:
            return
        self._sample_pending = False
        output = engine.state.output
        first = output[0] if isinstance(output, (list, tuple)) else output
        self._sample = {}
        for key in (self.image_key, self.label_key, self.pred_key):
            value = first[key]
            value = value[0] if value.ndim == 5 else value  # a batch that was not decollated
            self._sample[key] = value.detach()

    @staticmethod
    def _as_index_map(volume: torch.Tensor) -> torch.Tensor:
        """(C, X, Y, Z) one-hot / probabilities, or (1, X, Y, Z) indices -> (X, Y, Z) indices."""
        return volume.argmax(0) if volume.shape[0] > 1 else volume[0].round().long()

    def __call__(self, engine: Engine) -> None:
        self._runs += 1
        if self._sample is None or (self._runs - 1) % self.interval:
            return
        epoch = engine.state.epoch
        image = self._sample[self.image_key][0].float().cpu()
        title = f"epoch {epoch}"
        key_metric = getattr(engine.state, "key_metric_name", None)
        if key_metric in engine.state.metrics:
            title += f": {key_metric} {engine.state.metrics[key_metric]:.3f}"
        path = orthogonal_views(
            {"label": image, "prediction": image},
            self.output_dir / f"overlay_epoch{epoch:04d}.png",
            title=title,
            overlays={
                "label": self._as_index_map(self._sample[self.label_key].cpu()),
                "prediction": self._as_index_map(self._sample[self.pred_key].cpu()),
            },
            vmin=self.vmin,
            vmax=self.vmax,
        )
        logger.info("overlay of label and prediction written to %s", path)
        if self.summary_writer is not None:
            self.summary_writer.add_image("overlay", plt.imread(path)[..., :3], epoch, dataformats="HWC")
