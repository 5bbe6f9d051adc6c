"""MONAI dictionary transforms for CT: safe loading and checking, and the presets every bundle uses.

``LoadScand`` and ``CheckScand`` open every preset, so the loading path that training runs is the
one that reports bad input: a missing or unreadable file, the wrong number of channels or
dimensions, a degenerate size, or NaN/Inf voxels each raise ``BadScanError`` naming the file.
Scans smaller than the crop are padded, not rejected.

Presets (all settings are arguments):
- ``ct_pretrain_transforms``: Hi-End-MAE's pretraining recipe: RAS, resample, HU window to [0, 1],
  crop to the body, pad, ``num_samples`` random crops weighted 6:2 towards the body (the image is
  its own label), flips, 90-degree rotations, intensity scale/shift.
- ``ct_seg_train_transforms`` / ``ct_seg_val_transforms`` / ``ct_infer_transforms``: the same
  geometry and intensity handling for image + label (nearest-neighbour labels), crops balanced
  between organ and background for training, whole volumes for validation and inference.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medssl.data.scans import ACCEPTED_SCANS, BadScanError, check_scan_array, summarize_error

__all__ = [
    "LoadScand",
    "CheckScand",
    "SelectLabelsd",
    "SpacingOnlyd",
    "ct_pretrain_transforms",
    "ct_seg_train_transforms",
    "ct_seg_val_transforms",
    "ct_infer_transforms",
]


def _source_of(value: object, key: Hashable) -> str:
    """The file a loaded array came from (MONAI keeps it in the meta data), else the datalist key."""
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return f"<in-memory '{key}'>"


class LoadScand(MapTransform):
    """Load scans as channel-first float arrays (MetaTensor with affine), like ``LoadImaged``.

    In: ``{key: path}`` per key (a file or a DICOM series folder); arrays already in memory pass
    through. Out: ``{key: MetaTensor (C, *spatial)}``.
    Any failure (missing file, unknown format, corrupt or truncated data) raises ``BadScanError``
    naming the path and the key; the reader's own error is kept as its cause.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: str | None = None,
        dtype: np.dtype | type | None = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise BadScanError(
                    f"datalist entry '{key}' is {value!r}; expected the path of a scan ({ACCEPTED_SCANS})"
                )
            if not os.path.exists(value):
                raise BadScanError(f"scan {value} (key '{key}') does not exist; expected {ACCEPTED_SCANS}")
            try:
                d[key] = self.loader(value)
            except Exception as error:
                raise BadScanError(
                    f"cannot read scan {value} (key '{key}'): {summarize_error(error)}. Expected a complete scan in "
                    f"{ACCEPTED_SCANS}; re-export or remove it, or set skip_bad=True to leave unreadable scans out"
                ) from error
        return d


class CheckScand(MapTransform):
    """Check loaded channel-first scans; raise ``BadScanError`` naming the file when one is unusable.

    Checks per key: ``spatial_dims`` spatial axes, ``channels`` channels, at least ``min_size``
    voxels along each axis, positive finite spacing and (``check_finite``) no NaN/Inf voxels. With
    ``same_shape`` every key must share the first key's spatial shape (a label on the image grid).
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int = 1,
        spatial_dims: int = 3,
        min_size: int = 4,
        check_finite: bool = True,
        same_shape: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = channels
        self.spatial_dims = spatial_dims
        self.min_size = min_size
        self.check_finite = check_finite
        self.same_shape = same_shape

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        reference: tuple[str, tuple[int, ...]] | None = None
        for key in self.key_iterator(dict(data)):
            array = data[key]
            source = _source_of(array, key)
            check_scan_array(array, source, self.channels, self.spatial_dims, self.min_size, self.check_finite)
            shape = tuple(array.shape[1:])
            if reference is None:
                reference = (source, shape)
            elif self.same_shape and shape != reference[1]:
                raise BadScanError(
                    f"scan {source} (key '{key}') has shape {shape} but {reference[0]} has shape {reference[1]}; "
                    "expected both on the same voxel grid (a label map must match its image)"
                )
        return data


class SelectLabelsd(MapTransform):
    """Keep only some label ids, renumbered 1..n in the given order; every other id becomes background.

    E.g. ``labels=(1, 2)`` on the phantom labels keeps liver -> 1 and spleen -> 2.
    """

    def __init__(self, keys: KeysCollection, labels: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must name distinct label ids to keep, got {labels}")
        self.labels = tuple(int(v) for v in labels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            selected = torch.zeros_like(label)
            for new_id, old_id in enumerate(self.labels, start=1):
                selected[label == old_id] = new_id
            d[key] = selected
        return d


class SpacingOnlyd(Spacingd):
    """``monai.transforms.Spacingd`` that leaves the ``<key>_*`` entries which are not metadata dicts alone.

    MONAI 1.6's ``Spacingd`` also copies a NIfTI scan's meta data into every other ``<key>_*``
    entry, taking each for a metadata dict; MONAI Label's infer task puts the scan's path, a
    string, at ``image_path``, where that raises ``AttributeError: 'str' object has no attribute
    'update'``. Entries of that namespace that are not dicts are set aside while resampling and put
    back unchanged. Resampling, its inverse and metadata-dict entries are MONAI's own.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, object]:
        prefixes = tuple(f"{key}_" for key in self.keys)
        set_aside = {
            name: value
            for name, value in data.items()
            if isinstance(name, str) and name.startswith(prefixes) and not isinstance(value, Mapping)
        }
        resampled = super().__call__({name: value for name, value in data.items() if name not in set_aside}, lazy=lazy)
        # the None placeholders keep the input's key order
        return {**dict.fromkeys(data), **resampled, **set_aside}


def _load_to_window(
    keys: Sequence[str],
    spacing: Sequence[float] | None,
    a_min: float,
    a_max: float,
    b_min: float,
    b_max: float,
    label_key: str | None = None,
    select_labels: Sequence[int] | None = None,
    min_size: int = 4,
) -> list:
    """Load + check, optional label selection, RAS, resample to ``spacing`` (None: keep), HU window."""
    transforms: list = [LoadScand(keys), CheckScand(keys, channels=1, spatial_dims=3, min_size=min_size)]
    if label_key is not None and select_labels is not None:
        transforms.append(SelectLabelsd(label_key, select_labels))
    transforms.append(Orientationd(keys, axcodes="RAS", labels=None))  # labels=None: the MetaTensor's own space
    if spacing is not None:
        modes = ["nearest" if key == label_key else "bilinear" for key in keys]
        transforms.append(SpacingOnlyd(keys, pixdim=spacing, mode=modes))
    transforms.append(ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True))
    return transforms


def _augmentations(
    keys: Sequence[str],
    roi_size: Sequence[int],
    flip_prob: float,
    rotate90_prob: float,
    scale_intensity: float,
    scale_prob: float,
    shift_intensity: float,
    shift_prob: float,
) -> list:
    transforms: list = []
    if flip_prob > 0:
        transforms += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    if rotate90_prob > 0:
        if roi_size[0] != roi_size[1]:
            raise ValueError(
                "rotate90_prob > 0 needs a square in-plane crop (it rotates axes 0 and 1), "
                f"got roi_size={tuple(roi_size)}"
            )
        transforms.append(RandRotate90d(keys, prob=rotate90_prob, max_k=3, spatial_axes=(0, 1)))
    if scale_intensity > 0 and scale_prob > 0:
        transforms.append(RandScaleIntensityd("image", factors=scale_intensity, prob=scale_prob))
    if shift_intensity > 0 and shift_prob > 0:
        transforms.append(RandShiftIntensityd("image", offsets=shift_intensity, prob=shift_prob))
    return transforms


def ct_pretrain_transforms(
    roi_size: Sequence[int] = (96, 96, 96),
    num_samples: int = 8,
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    pos: float = 6.0,
    neg: float = 2.0,
    augment: bool = True,
    flip_prob: float = 0.5,
    rotate90_prob: float = 0.3,
    scale_intensity: float = 0.1,
    scale_prob: float = 0.1,
    shift_intensity: float = 0.1,
    shift_prob: float = 0.1,
    min_size: int = 4,
) -> Compose:
    """Self-supervised pretraining crops of CT scans (Hi-End-MAE's recipe by default).

    In: ``{"image": path}``. Out: a list of ``num_samples`` dicts, each ``{"image": float32 tensor
    (1, *roi_size)}``, HU ``[a_min, a_max]`` mapped to ``[b_min, b_max]``; the intensity
    augmentations (like the paper's) may move values up to ``scale_intensity``/``shift_intensity``
    outside that range. Crop centres fall on body voxels (above ``a_min`` HU) and on air/lung voxels
    (at or below it) in the ratio ``pos`` : ``neg``.
    """
    keys = ["image"]
    transforms = _load_to_window(keys, spacing, a_min, a_max, b_min, b_max, min_size=min_size)
    transforms += [
        CropForegroundd(keys, source_key="image", allow_smaller=True),
        SpatialPadd(keys, spatial_size=roi_size),
        # the image is its own label: crops centre on voxels above the window's floor (body) or at
        # it (air, lung); no image_key, which would also restrict "negative" centres to the body
        # and leave none (the official code does the same)
        RandCropByPosNegLabeld(
            keys, label_key="image", spatial_size=roi_size, pos=pos, neg=neg, num_samples=num_samples
        ),
    ]
    if augment:
        transforms += _augmentations(
            keys, roi_size, flip_prob, rotate90_prob, scale_intensity, scale_prob, shift_intensity, shift_prob
        )
    transforms.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return Compose(transforms)


def ct_seg_train_transforms(
    roi_size: Sequence[int] = (96, 96, 96),
    num_samples: int = 4,
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    pos: float = 1.0,
    neg: float = 1.0,
    select_labels: Sequence[int] | None = None,
    class_ratios: Sequence[float] | None = None,
    augment: bool = True,
    flip_prob: float = 0.1,
    rotate90_prob: float = 0.1,
    scale_intensity: float = 0.0,
    scale_prob: float = 0.0,
    shift_intensity: float = 0.1,
    shift_prob: float = 0.5,
    min_size: int = 4,
) -> Compose:
    """Segmentation training crops (MONAI's 3D CT recipe: crops balanced ``pos``:``neg`` on the label).

    With ``class_ratios`` (one weight per label id, background first) the crop centres are drawn
    per class instead (MONAI's RandCropByLabelClassesd), so small organs get crops of their own
    rather than the share of the foreground their voxels have.

    In: ``{"image": path, "label": path}``. Out: a list of ``num_samples`` dicts with ``"image"``
    float32 (1, *roi_size) in the HU window mapped to [b_min, b_max] (before intensity shifts) and
    ``"label"`` float32 (1, *roi_size) of integer ids (renumbered when ``select_labels`` is given).
    """
    keys = ["image", "label"]
    transforms = _load_to_window(keys, spacing, a_min, a_max, b_min, b_max, "label", select_labels, min_size)
    transforms += [
        CropForegroundd(keys, source_key="image", allow_smaller=True),
        SpatialPadd(keys, spatial_size=roi_size),
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=roi_size,
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            image_key="image",
            image_threshold=b_min,
        )
        if class_ratios is None
        else RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=roi_size,
            ratios=list(class_ratios),
            num_classes=len(class_ratios),
            num_samples=num_samples,
            image_key="image",
            image_threshold=b_min,
            warn=False,  # a scan without one of the organs just draws the other classes
        ),
    ]
    if augment:
        transforms += _augmentations(
            keys, roi_size, flip_prob, rotate90_prob, scale_intensity, scale_prob, shift_intensity, shift_prob
        )
    transforms.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return Compose(transforms)


def ct_seg_val_transforms(
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    select_labels: Sequence[int] | None = None,
    crop_foreground: bool = True,
    min_size: int = 4,
) -> Compose:
    """Whole-volume validation data for sliding-window evaluation.

    In: ``{"image": path, "label": path}``. Out: ``"image"`` and ``"label"`` float32 MetaTensors
    (1, *volume) with their affines, cropped to the body when ``crop_foreground``.
    """
    keys = ["image", "label"]
    transforms = _load_to_window(keys, spacing, a_min, a_max, b_min, b_max, "label", select_labels, min_size)
    if crop_foreground:
        transforms.append(CropForegroundd(keys, source_key="image", allow_smaller=True))
    transforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(transforms)


def ct_infer_transforms(
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    min_size: int = 4,
) -> Compose:
    """Inference input: ``{"image": path}`` -> ``"image"`` float32 MetaTensor (1, *volume).

    No cropping, so ``monai.transforms.Invertd`` only has to undo orientation and resampling to put
    predictions back on the scan's own grid.
    """
    keys = ["image"]
    transforms = _load_to_window(keys, spacing, a_min, a_max, b_min, b_max, min_size=min_size)
    transforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(transforms)
