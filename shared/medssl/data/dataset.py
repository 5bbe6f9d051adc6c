"""Datasets over datalists, with bad scans either reported by name or skipped with a warning.

``validate_datalist`` screens every scan before training (headers only by default, or a full
read), listing every unusable one at once. ``build_dataset`` screens the headers and builds a
MONAI ``Dataset``, ``CacheDataset`` or ``PersistentDataset`` whose errors surface as
``BadScanError`` naming the file; with ``skip_bad=True`` a scan that fails while training is
logged and replaced by the next usable one. Nothing is skipped without a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.utils import convert_to_tensor, look_up_option

from medssl.data.scans import (
    SCAN_EXTENSIONS,
    BadScanError,
    check_scan_header,
    find_bad_scan_error,
    is_dicom_series,
    read_scan_header,
)
from medssl.data.transforms import CheckScand, LoadScand

__all__ = [
    "validate_datalist",
    "build_dataset",
    "scan_keys_of",
    "CACHE_MODES",
    "ScanDataset",
    "CachedScanDataset",
    "PersistentScanDataset",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "cache", "persistent")


def scan_keys_of(datalist: Sequence[dict]) -> tuple[str, ...]:
    """Keys of the first datalist item whose values are scan paths (e.g. ("image", "label"))."""
    if not datalist:
        return ()
    keys = []
    for key, value in datalist[0].items():
        if isinstance(value, (str, os.PathLike)) and (
            str(value).lower().endswith(SCAN_EXTENSIONS) or os.path.isdir(value)
        ):
            keys.append(key)
    return tuple(keys)


def _check_item(
    item: dict, keys: Sequence[str], channels: int, spatial_dims: int, min_size: int, read_data: bool
) -> None:
    """Raise ``BadScanError`` for the first problem of one datalist item."""
    for key in keys:
        if key not in item:
            raise BadScanError(f"datalist item {item} has no '{key}' entry; every item needs {list(keys)}")
    if read_data or any(is_dicom_series(item[key]) for key in keys):  # a DICOM series has no single header
        loaded = LoadScand(keys)(item)
        CheckScand(keys, channels=channels, spatial_dims=spatial_dims, min_size=min_size)(loaded)
        return
    reference = None
    for key in keys:
        header = read_scan_header(item[key])
        check_scan_header(item[key], header, channels, spatial_dims, min_size)
        if reference is None:
            reference = (item[key], header.spatial_shape)
        elif header.spatial_shape != reference[1]:
            raise BadScanError(
                f"scan {item[key]} (key '{key}') has shape {header.spatial_shape} but {reference[0]} has shape "
                f"{reference[1]}; expected both on the same voxel grid (a label map must match its image)"
            )


def validate_datalist(
    datalist: Sequence[dict],
    keys: Sequence[str] = ("image",),
    channels: int = 1,
    spatial_dims: int = 3,
    min_size: int = 4,
    read_data: bool = False,
    skip_bad: bool = False,
) -> list[dict]:
    """Check every scan of a datalist before training.

    Args:
        keys: the datalist keys holding scan paths (e.g. ("image", "label")).
        channels, spatial_dims, min_size: the expected layout (see ``CheckScand``).
        read_data: False reads headers only (fast: catches missing and non-image files, wrong
            channels, dimensions, sizes, mismatched label grids); True loads every scan (also
            catches truncated data and NaN/Inf voxels).
        skip_bad: False raises one ``BadScanError`` listing every unusable scan; True logs a
            warning naming each unusable scan and returns the datalist without them.

    Returns:
        the usable items, in order.
    """
    usable, problems = [], []
    for item in datalist:
        try:
            _check_item(item, keys, channels, spatial_dims, min_size, read_data)
        except BadScanError as error:
            problems.append(str(error))
        else:
            usable.append(item)
    if problems and not skip_bad:
        listed = "\n  - ".join(problems)
        raise BadScanError(
            f"{len(problems)} of {len(datalist)} datalist items are unusable:\n  - {listed}\n"
            "Fix or remove them, or pass skip_bad=True to train without them (each skipped scan is logged)."
        )
    for problem in problems:
        logger.warning("skipping unusable scan: %s", problem)
    if not usable:
        raise BadScanError(f"none of the {len(datalist)} datalist items is usable (see the warnings above)")
    return usable


class _BadScanReporting:
    """Mixin for MONAI datasets: surface ``BadScanError`` from MONAI's wrapped errors, or skip the item.

    MONAI wraps every transform error in "applying transform ..." RuntimeErrors; this re-raises the
    ``BadScanError`` inside so the message naming the file is the one users see. With
    ``skip_bad`` the failing item is logged (once per process) and the next usable item returned.
    """

    skip_bad: bool
    _bad_indices: set[int]

    def _transform(self, index: int):
        attempts = len(self.data)  # type: ignore[attr-defined]
        for offset in range(attempts):
            current = (index + offset) % attempts
            if current in self._bad_indices:
                continue
            try:
                return super()._transform(current)  # type: ignore[misc]
            except Exception as error:
                bad = find_bad_scan_error(error)
                if bad is None:
                    raise
                if not self.skip_bad:
                    raise BadScanError(str(bad)) from bad.__cause__
                self._bad_indices.add(current)
                logger.warning("skipping unusable scan (dataset item %d): %s", current, bad)
        raise BadScanError(f"every one of the {attempts} dataset items is unusable (see the warnings above)")


class ScanDataset(_BadScanReporting, Dataset):
    """``monai.data.Dataset`` that names bad scans (see ``build_dataset``)."""

    def __init__(self, data: Sequence, transform: Callable | None = None, skip_bad: bool = False) -> None:
        super().__init__(data, transform)
        self.skip_bad = skip_bad
        self._bad_indices = set()


class CachedScanDataset(_BadScanReporting, CacheDataset):
    """``monai.data.CacheDataset`` that names bad scans (see ``build_dataset``)."""

    def __init__(self, data: Sequence, transform: Callable | None = None, skip_bad: bool = False, **kwargs) -> None:
        self.skip_bad = skip_bad
        self._bad_indices = set()
        try:
            super().__init__(data, transform, **kwargs)
        except Exception as error:  # caching runs the deterministic transforms right here
            bad = find_bad_scan_error(error)
            if bad is None:
                raise
            raise BadScanError(str(bad)) from bad.__cause__


class PersistentScanDataset(_BadScanReporting, PersistentDataset):
    """``monai.data.PersistentDataset`` that names bad scans (see ``build_dataset``) and that several
    processes (the ranks of a distributed run) can fill at once in one ``cache_dir``.

    MONAI writes a cache file under the system temporary folder and then moves it into
    ``cache_dir``; when the two lie on different filesystems (a local ``/tmp``, a cache on shared
    storage) the move is a copy, and another process can open the half-copied file and fail
    ("PytorchStreamReader failed reading zip archive"). Here the file is written beside its final
    name and renamed into place, which is atomic: a reader sees no file or a complete one, and
    concurrent writers of one item write the same bytes.
    """

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | Path, skip_bad: bool = False) -> None:
        super().__init__(data, transform, cache_dir=cache_dir)
        self.skip_bad = skip_bad
        self._bad_indices = set()

    def _cachecheck(self, item_transformed):
        if self.cache_dir is None:
            return super()._cachecheck(item_transformed)
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            return super()._cachecheck(item_transformed)  # MONAI's read, which also recomputes a corrupt file
        item = self._pre_transform(deepcopy(item_transformed))  # deepcopy keeps the hashed item unchanged
        try:
            handle, temporary = tempfile.mkstemp(prefix=f".{hashfile.stem}-", suffix=".tmp", dir=self.cache_dir)
        except PermissionError:  # a read-only cache folder: train without caching, as MONAI does
            return item
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(
                    convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta),
                    file,
                    pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                    pickle_protocol=self.pickle_protocol,
                )
            os.replace(temporary, hashfile)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return item


def build_dataset(
    datalist: Sequence[dict],
    transform: Callable,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    skip_bad: bool = False,
    check_headers: bool = True,
    channels: int = 1,
) -> Dataset:
    """A MONAI dataset over ``datalist`` that reports (or, with ``skip_bad``, skips) bad scans by name.

    Args:
        transform: e.g. ``ct_pretrain_transforms()``; its ``LoadScand``/``CheckScand`` raise the errors.
        cache: "none" (``Dataset``: load every time), "cache" (``CacheDataset``: the deterministic
            transforms' output kept in memory for ``cache_rate`` of the items, filled with
            ``num_workers`` threads) or "persistent" (``PersistentDataset``: cached on disk in
            ``cache_dir``).
        skip_bad: leave unusable scans out with a logged warning each, instead of raising. With
            "cache" every scan is fully read up front (caching reads them anyway), otherwise headers
            are screened up front and a scan that fails later is skipped when it is reached.
        check_headers: screen every scan's header before building (``validate_datalist``), so
            wrong channels/dimensions or non-image files are all reported at once at start-up.
        channels: channels every scan must have.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache='{cache}' is not one of {CACHE_MODES}")
    if cache == "persistent" and cache_dir is None:
        raise ValueError("cache='persistent' needs cache_dir, the folder that keeps the cached volumes")
    if not datalist:
        raise ValueError("the datalist is empty: there is nothing to train on")
    keys = scan_keys_of(datalist)
    if check_headers or (skip_bad and cache == "cache"):
        datalist = validate_datalist(
            datalist, keys, channels=channels, read_data=skip_bad and cache == "cache", skip_bad=skip_bad
        )
    if cache == "cache":
        return CachedScanDataset(
            datalist, transform, skip_bad=skip_bad, cache_rate=cache_rate, num_workers=num_workers, progress=False
        )
    if cache == "persistent":
        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        return PersistentScanDataset(datalist, transform, cache_dir=cache_dir, skip_bad=skip_bad)  # type: ignore[arg-type]
    return ScanDataset(datalist, transform, skip_bad=skip_bad)
