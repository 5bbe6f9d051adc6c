"""Figures people look at instead of reading numbers: orthogonal views of 3D volumes.

:func:`orthogonal_views` draws the central axial, coronal and sagittal slices of several volumes
(one row each) into a PNG; :class:`ReconstructionFigureHandler` does it during training for a
fixed validation batch through the network's ``figure_panels(image)`` and sends the same picture
to TensorBoard.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402

__all__ = ["central_slices", "orthogonal_views", "ReconstructionFigureHandler"]

logger = logging.getLogger(__name__)

VIEW_NAMES = ("axial", "coronal", "sagittal")


def central_slices(volume: np.ndarray, center: tuple[int, int, int] | None = None) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through center of a (X, Y, Z) RAS volume, display-oriented."""
    x, y, z = center if center is not None else tuple(s // 2 for s in volume.shape)
    # Rotate so that anterior / superior are at the top of the picture.
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def orthogonal_views(
    panels: Mapping[str, np.ndarray | torch.Tensor],
    path: str | os.PathLike,
    title: str = "",
    overlays: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Write a PNG with one row per panel and the three central views as columns.

    Args:
        panels: name -> volume, (X, Y, Z) or (1, X, Y, Z), intensities shown in [vmin, vmax].
        path: where the PNG goes (folders are created).
        title: figure title.
        overlays: optional name -> integer label volume drawn in colour over the panel of the
            same name (label 0 transparent).
    Returns:
        the path written.
    """
    rows = len(panels)
    # Constrained layout keeps the title clear of the column titles (tight_layout lets them overlap).
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False, layout="constrained")
    for row, (name, volume) in enumerate(panels.items()):
        volume = _as_numpy(volume)
        labels = _as_numpy(overlays[name]) if overlays and name in overlays else None
        for col, image in enumerate(central_slices(volume)):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if labels is not None:
                label_slice = central_slices(labels)[col]
                ax.imshow(np.ma.masked_equal(label_slice, 0), cmap="tab10", vmin=0, vmax=10, alpha=0.45)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(VIEW_NAMES[col])
            if col == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _as_numpy(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().float().cpu().numpy()
    volume = np.asarray(volume)
    return volume[0] if volume.ndim == 4 else volume


class ReconstructionFigureHandler:
    """Every ``interval`` epochs, draw the network's reconstruction of a fixed validation scan.

    The network must provide ``figure_panels(image) -> dict[str, Tensor (B, 1, X, Y, Z)]``
    (for example input / masked input / reconstruction). The first sample of the first batch of
    ``data_loader`` is used every time, so figures of successive epochs compare directly.

    Args:
        network: the pretraining network.
        data_loader: validation loader; its first batch is taken once.
        output_dir: folder for ``reconstruction_epoch{N}.png``.
        interval: epochs between figures.
        summary_writer: optional TensorBoard SummaryWriter that gets the same image.
        device: where the network runs.
        seed: seed of the generator for any masking drawn in ``figure_panels``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        data_loader: torch.utils.data.DataLoader,
        output_dir: str | os.PathLike,
        interval: int = 1,
        summary_writer=None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.network = network
        self.data_loader = data_loader
        self.output_dir = Path(output_dir)
        self.interval = interval
        self.summary_writer = summary_writer
        self.device = torch.device(device)
        self.seed = seed
        self._image: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if self._image is None:
            batch = next(iter(self.data_loader))
            batch = batch[0] if isinstance(batch, list) else batch
            self._image = torch.as_tensor(batch["image"][:1]).to(self.device)
        network = getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel
        was_training = network.training
        network.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with torch.no_grad():
            panels = network.figure_panels(self._image, generator=generator)
        network.train(was_training)
        epoch = engine.state.epoch
        path = orthogonal_views(
            {name: volume[0] for name, volume in panels.items()},
            self.output_dir / f"reconstruction_epoch{epoch:04d}.png",
            title=f"epoch {epoch}",
        )
        logger.info("reconstruction figure written to %s", path)
        if self.summary_writer is not None:
            image = plt.imread(path)[..., :3]
            self.summary_writer.add_image("reconstruction", image, epoch, dataformats="HWC")
