"""Superpatches: a CT volume cut into a grid of equal non-overlapping 3D blocks (MAESIL).

A volume of any size is padded at the high end of every axis up to a multiple of the
superpatch size, cut into superpatches that a fixed-size network can take, and stitched back
with the padding cropped off, so padded voxels never reach an output or a metric. The padding
is also returned as a ``valid`` mask (1 = real voxel) for losses computed on padded blocks.

- :func:`superpatch_layout`, :func:`partition`, :func:`stitch`: the exact round trip.
- :func:`reconstruct_volume`: run a superpatch-sized function over a whole volume.
- :class:`RandSuperpatchCropd`: training crops of one superpatch each that pad small volumes
  (writing the valid mask under its own key) and reject near-empty crops.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, SpatialCrop, SpatialPad
from monai.utils import ensure_tuple_rep

__all__ = [
    "SuperpatchLayout",
    "superpatch_layout",
    "pad_to_superpatches",
    "partition",
    "stitch",
    "reconstruct_volume",
    "RandSuperpatchCropd",
]


class SuperpatchLayout(NamedTuple):
    """How a batch of volumes was cut: enough to stitch the superpatches back.

    batch_size: volumes in the batch.
    spatial_shape: the volumes' own spatial shape (before padding).
    superpatch_size: edge lengths of one superpatch.
    grid: superpatches per axis.
    """

    batch_size: int
    spatial_shape: tuple[int, ...]
    superpatch_size: tuple[int, ...]
    grid: tuple[int, ...]

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(g * s for g, s in zip(self.grid, self.superpatch_size))

    @property
    def num_superpatches(self) -> int:
        """Superpatches per volume."""
        return math.prod(self.grid)


def superpatch_layout(
    spatial_shape: Sequence[int], superpatch_size: int | Sequence[int], batch_size: int = 1
) -> SuperpatchLayout:
    """The grid of superpatches that covers spatial_shape (the last one per axis may be padded)."""
    size = ensure_tuple_rep(superpatch_size, len(spatial_shape))
    grid = tuple(math.ceil(n / s) for n, s in zip(spatial_shape, size))
    return SuperpatchLayout(batch_size, tuple(int(n) for n in spatial_shape), size, grid)


def pad_to_superpatches(
    volume: torch.Tensor, superpatch_size: int | Sequence[int], pad_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, SuperpatchLayout]:
    """Pad (B, C, *spatial) at the high end of each axis up to a multiple of superpatch_size.

    Returns the padded volume, its valid mask (B, 1, *padded) with 1 on the volume's own voxels
    and 0 on padding (same dtype as the volume), and the layout.
    """
    layout = superpatch_layout(volume.shape[2:], superpatch_size, volume.shape[0])
    # F.pad lists (low, high) pairs from the last axis backwards.
    pad = [v for n, p in reversed(list(zip(layout.spatial_shape, layout.padded_shape))) for v in (0, p - n)]
    padded = F.pad(volume, pad, value=pad_value)
    valid = F.pad(torch.ones_like(volume[:, :1]), pad, value=0.0)
    return padded, valid, layout


def _cut(padded: torch.Tensor, layout: SuperpatchLayout) -> torch.Tensor:
    """(B, C, *padded) -> (B * G, C, *superpatch), superpatches in raster order of the grid per volume."""
    b, c = padded.shape[:2]
    dims = len(layout.grid)
    # (B, C, g0, s0, g1, s1, ...) -> (B, g0, g1, ..., C, s0, s1, ...)
    blocks = padded.reshape(b, c, *[v for g, s in zip(layout.grid, layout.superpatch_size) for v in (g, s)])
    order = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
    return blocks.permute(order).reshape(b * layout.num_superpatches, c, *layout.superpatch_size)


def partition(
    volume: torch.Tensor, superpatch_size: int | Sequence[int], pad_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, SuperpatchLayout]:
    """Cut (B, C, *spatial) into superpatches.

    Returns:
        superpatches (B * G, C, *superpatch_size): G = layout.num_superpatches per volume, the
        superpatches of volume b at [b * G, (b + 1) * G) in raster order of the grid;
        valid (B * G, 1, *superpatch_size): 1 on real voxels, 0 on padding;
        the layout for :func:`stitch`.
    """
    padded, valid, layout = pad_to_superpatches(volume, superpatch_size, pad_value)
    return _cut(padded, layout), _cut(valid, layout), layout


def stitch(superpatches: torch.Tensor, layout: SuperpatchLayout) -> torch.Tensor:
    """Inverse of :func:`partition`: (B * G, C, *superpatch_size) -> (B, C, *spatial_shape), padding cropped."""
    dims = len(layout.grid)
    c = superpatches.shape[1]
    blocks = superpatches.reshape(layout.batch_size, *layout.grid, c, *layout.superpatch_size)
    # (B, g0, g1, ..., C, s0, s1, ...) -> (B, C, g0, s0, g1, s1, ...)
    order = [0, 1 + dims] + [v for i in range(dims) for v in (1 + i, 2 + dims + i)]
    padded = blocks.permute(order).reshape(layout.batch_size, c, *layout.padded_shape)
    return padded[(slice(None), slice(None), *[slice(0, n) for n in layout.spatial_shape])]


def reconstruct_volume(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    superpatch_size: int | Sequence[int],
    batch_size: int = 1,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Run a superpatch-sized reconstruction over whole volumes and stitch the result.

    Args:
        reconstruct: maps (n, C, *superpatch_size) to a tensor of the same shape.
        volume: (B, C, *spatial), any spatial size.
        superpatch_size: the size ``reconstruct`` takes.
        batch_size: superpatches per call (bounds memory).
        pad_value: value of the padding the network sees at the volume's high edges.

    Returns:
        (B, C, *spatial): the stitched reconstruction; padding never reaches it.
    """
    superpatches, _, layout = partition(volume, superpatch_size, pad_value)
    outputs = [reconstruct(chunk) for chunk in torch.split(superpatches, batch_size)]
    return stitch(torch.cat(outputs), layout)


class RandSuperpatchCropd(Randomizable, MapTransform):
    """Random superpatch-sized crops of channel-first volumes, rejecting near-empty crops.

    Returns a list of ``num_samples`` dicts (like MONAI's other multi-sample crops), each a copy of
    the input with the keys cropped.

    Volumes smaller than the superpatch are padded at the high end with ``pad_value``; the key
    ``valid_key`` gets a (1, *superpatch_size) mask, 1 on real voxels and 0 on that padding, so a
    loss can leave padding out. A crop whose real voxels have a mean below ``min_mean`` (air,
    the table) is drawn again, up to ``max_tries`` times; if every try fails, the try with the
    highest mean is kept, so a sparse scan still yields a crop.

    Args:
        keys: keys cropped together (the first one decides the rejection).
        superpatch_size: crop edge lengths.
        num_samples: crops drawn from each volume.
        valid_key: where the valid mask goes; None to leave it out.
        min_mean: rejection threshold on the first key's mean over real voxels.
        max_tries: crops drawn at most.
        pad_value: value of the padding.
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        superpatch_size: int | Sequence[int] = 128,
        num_samples: int = 1,
        valid_key: str | None = "valid",
        min_mean: float = 0.05,
        max_tries: int = 10,
        pad_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if max_tries < 1 or num_samples < 1:
            raise ValueError(
                f"RandSuperpatchCropd: max_tries and num_samples must be at least 1, got {max_tries} and {num_samples}"
            )
        self.superpatch_size = superpatch_size
        self.num_samples = num_samples
        self.valid_key = valid_key
        self.min_mean = min_mean
        self.max_tries = max_tries
        self.pad_value = pad_value
        self._start: tuple[int, ...] = ()

    def randomize(self, data: tuple[int, ...]) -> None:
        """Draw a crop start per axis inside spatial shape ``data`` (padding included)."""
        self._start = tuple(int(self.R.randint(0, n + 1)) for n in data)

    def _draw_window(self, reference: torch.Tensor, valid: torch.Tensor, size: tuple[int, ...]) -> tuple[int, ...]:
        """Start of the first crop whose real voxels reach min_mean, else of the best of max_tries."""
        padded_shape = tuple(reference.shape[1:])
        best_start, best_mean = (0,) * len(size), -math.inf
        for _ in range(self.max_tries):
            self.randomize(tuple(p - s for p, s in zip(padded_shape, size)))
            window = (slice(None), *[slice(a, a + s) for a, s in zip(self._start, size)])
            real = valid[window]
            mean = float((torch.as_tensor(reference[window]).float() * real).sum() / real.sum().clamp_min(1.0))
            if mean > best_mean:
                best_start, best_mean = self._start, mean
            if mean >= self.min_mean:
                break
        return best_start

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return [dict(d) for _ in range(self.num_samples)]
        first = d[keys[0]]
        size = ensure_tuple_rep(self.superpatch_size, len(first.shape) - 1)
        pad = SpatialPad(size, method="end", value=self.pad_value)
        padded = {key: pad(d[key]) for key in keys}
        valid = SpatialPad(size, method="end", value=0.0)(torch.ones(1, *first.shape[1:]))
        samples = []
        for _ in range(self.num_samples):
            start = self._draw_window(padded[keys[0]][:1], valid, size)
            crop = SpatialCrop(roi_start=start, roi_end=[a + s for a, s in zip(start, size)])
            sample = dict(d) | {key: crop(padded[key]) for key in keys}
            if self.valid_key is not None:
                sample[self.valid_key] = crop(valid)
            samples.append(sample)
        return samples
