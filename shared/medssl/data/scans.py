"""What a usable CT scan is, and the errors that say why one is not.

Two levels of checking share the same rules (spatial dimensions, channels, size, spacing):
``read_scan_header`` + ``check_scan_header`` read only the file header (cheap, used to screen a
whole datalist before training), ``check_scan_array`` checks a loaded channel-first array (used by
the loading transforms, and also catches truncated files and NaN/Inf voxels). Every message names
the file, says what was expected, and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "SCAN_EXTENSIONS",
    "DICOM_EXTENSION",
    "ACCEPTED_SCANS",
    "BadScanError",
    "ScanHeader",
    "is_dicom_series",
    "read_scan_header",
    "check_scan_header",
    "check_scan_array",
    "find_bad_scan_error",
    "summarize_error",
]

SCAN_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
DICOM_EXTENSION = ".dcm"
ACCEPTED_SCANS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) or a folder holding one DICOM (.dcm) series"
)
_WHAT_TO_DO = "fix or re-export it, remove it from the datalist, or set skip_bad=True to skip unusable scans (logged)"


class BadScanError(ValueError):
    """A scan that cannot be used for training: unreadable, wrong layout, or non-finite values.

    Its message always names the file (or the datalist entry) and what was expected.
    """


@dataclass(frozen=True)
class ScanHeader:
    """Layout of a scan as its header describes it (no voxel data read)."""

    spatial_shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]


def is_dicom_series(path: str | os.PathLike) -> bool:
    """True for a folder that directly holds ``.dcm`` files (read as one DICOM series)."""
    folder = Path(path)
    return folder.is_dir() and any(
        entry.is_file() and entry.name.lower().endswith(DICOM_EXTENSION) for entry in folder.iterdir()
    )


def summarize_error(error: BaseException) -> str:
    """One line naming the error type and its first message line (readers' messages run long)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def _read_nifti_header(path: Path) -> ScanHeader:
    import nibabel as nib

    image = nib.load(str(path))
    shape = tuple(int(s) for s in image.shape)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if path.name.lower().endswith(".nii"):  # uncompressed: a cut-off file is visible from its size
        expected = int(image.header.get_data_offset()) + int(np.prod(shape)) * image.get_data_dtype().itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise BadScanError(
                f"scan {path} is truncated: {actual} bytes on disk, the header announces {expected}; {_WHAT_TO_DO}"
            )
    if len(shape) == 4:  # NIfTI keeps channels (or time points) on the 4th axis
        return ScanHeader(shape[:3], shape[3], zooms)
    return ScanHeader(shape, 1, zooms)


def _read_itk_header(path: Path) -> ScanHeader:
    import itk

    image_io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise BadScanError(f"scan {path}: no ITK reader recognises this file; expected {ACCEPTED_SCANS}")
    image_io.SetFileName(str(path))
    image_io.ReadImageInformation()
    ndim = image_io.GetNumberOfDimensions()
    shape = tuple(int(image_io.GetDimensions(i)) for i in range(ndim))
    spacing = tuple(float(image_io.GetSpacing(i)) for i in range(ndim))
    return ScanHeader(shape, int(image_io.GetNumberOfComponents()), spacing)


def read_scan_header(path: str | os.PathLike) -> ScanHeader:
    """Read a scan's layout from its header only.

    Raises:
        BadScanError: the path does not exist, is not an accepted format, or its header cannot be
            read (e.g. a text file named ``.nii.gz``). DICOM series folders are not handled here
            (their layout needs the whole series); use the loading transforms for them.
    """
    scan = Path(path)
    if not scan.exists():
        raise BadScanError(f"scan {scan} does not exist; expected {ACCEPTED_SCANS}")
    name = scan.name.lower()
    if scan.is_dir() or not name.endswith(SCAN_EXTENSIONS):
        raise BadScanError(f"scan {scan} is not a file of an accepted format; expected {ACCEPTED_SCANS}")
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _read_nifti_header(scan)
        return _read_itk_header(scan)
    except BadScanError:
        raise
    except Exception as error:
        raise BadScanError(
            f"cannot read the header of scan {scan} ({summarize_error(error)}); "
            f"expected {ACCEPTED_SCANS}; {_WHAT_TO_DO}"
        ) from error


def _check_layout(
    source: str,
    spatial_shape: Sequence[int],
    channels: int,
    spacing: Sequence[float] | None,
    expected_channels: int,
    spatial_dims: int,
    min_size: int,
) -> None:
    what = f"a {spatial_dims}D volume with {expected_channels} channel{'s' if expected_channels != 1 else ''}"
    if expected_channels == 1:
        what = f"a single-channel {spatial_dims}D CT volume"
    if len(spatial_shape) != spatial_dims:
        raise BadScanError(
            f"scan {source} has {len(spatial_shape)} spatial dimensions (shape {tuple(spatial_shape)}); "
            f"expected {what}; {_WHAT_TO_DO}"
        )
    if channels != expected_channels:
        raise BadScanError(
            f"scan {source} has {channels} channels; expected {expected_channels} ({what}); {_WHAT_TO_DO}"
        )
    if min(spatial_shape) < min_size:
        raise BadScanError(
            f"scan {source} has shape {tuple(spatial_shape)}: fewer than {min_size} voxels along an axis, too thin to "
            f"crop or resample (a single slice or an empty volume?); expected {what}; {_WHAT_TO_DO}"
        )
    if spacing is not None and not all(np.isfinite(s) and s > 0 for s in spacing):
        raise BadScanError(
            f"scan {source} has voxel spacing {tuple(spacing)}; expected positive, finite sizes in mm; {_WHAT_TO_DO}"
        )


def check_scan_header(
    source: str | os.PathLike,
    header: ScanHeader,
    channels: int = 1,
    spatial_dims: int = 3,
    min_size: int = 4,
) -> None:
    """Raise ``BadScanError`` when a header's layout is not ``channels`` x ``spatial_dims``-D of ``min_size``."""
    _check_layout(str(source), header.spatial_shape, header.channels, header.spacing, channels, spatial_dims, min_size)


def check_scan_array(
    array: torch.Tensor | np.ndarray,
    source: str | os.PathLike,
    channels: int = 1,
    spatial_dims: int = 3,
    min_size: int = 4,
    check_finite: bool = True,
) -> None:
    """Check a loaded, channel-first scan (C, *spatial); raise ``BadScanError`` naming ``source`` if unusable.

    Besides the layout it checks the voxel spacing of a MetaTensor's affine and, for floating
    point data, that every voxel is finite.
    """
    spacing = None
    affine = getattr(array, "affine", None)
    if affine is not None and affine.shape[-1] == spatial_dims + 1:
        spacing = [float(v) for v in torch.as_tensor(affine)[:spatial_dims, :spatial_dims].double().norm(dim=0)]
    _check_layout(str(source), tuple(array.shape[1:]), int(array.shape[0]), spacing, channels, spatial_dims, min_size)
    if check_finite:
        values = torch.as_tensor(array)
        if values.is_floating_point():
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise BadScanError(
                    f"scan {source} has {bad} NaN/Inf voxels of {values.numel()}; expected finite CT numbers (HU); "
                    f"{_WHAT_TO_DO}"
                )


def find_bad_scan_error(error: BaseException | None) -> BadScanError | None:
    """The ``BadScanError`` inside an exception chain (MONAI wraps transform errors in RuntimeErrors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BadScanError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
