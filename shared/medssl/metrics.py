"""Per-sample reconstruction metrics, 2D and 3D: PSNR, SSIM and high-frequency fidelity.

Inputs are images (B, C, *spatial); every metric returns one value per sample, shape (B,).
``mask`` arguments (broadcastable to the images, True = real voxel) keep padding out of the
result, so a volume padded up to a multiple of the patch size scores as the unpadded one would.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs
from monai.utils import ensure_tuple_rep

from medssl.frequency import REFERENCE_SIZE, _check_spatial_dims, frequency_radius, highpass_filter

__all__ = ["psnr", "ssim3d", "high_band_energy_ratio", "highpass_psnr"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor, spatial_dims: int | None) -> int:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return _check_spatial_dims(pred, spatial_dims)


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, ...) values per sample over the entries where mask is True (all when None)."""
    if mask is None:
        return values.flatten(1).mean(1)
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)


def psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    mask: torch.Tensor | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample: 10 log10(data_range^2 / MSE); inf for a perfect match.

    The MSE runs over channels and the voxels where ``mask`` is True; a sample with no valid
    voxel gives NaN.
    """
    _check_pair(pred, target, spatial_dims)
    mse = _per_sample_mean((pred.float() - target.float()) ** 2, mask)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim3d(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    mask: torch.Tensor | None = None,
    kernel_size: int | Sequence[int] = 11,
    kernel_sigma: float | Sequence[float] = 1.5,
    kernel_type: str = "gaussian",
    k1: float = 0.01,
    k2: float = 0.03,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Structural similarity per sample (3D, and 2D for 2D input), via MONAI's ``compute_ssim_and_cs``.

    The SSIM map has one value per window position that fits in the image (as in MONAI's
    SSIMMetric, whose per-sample result this equals without a mask); it is averaged over
    channels and positions. With ``mask``, only windows lying entirely on valid voxels count,
    so padding never enters any statistic: on an image padded around a box this equals the SSIM
    of the box alone. A sample with no such window gives NaN.
    """
    spatial_dims = _check_pair(pred, target, spatial_dims)
    kernel = ensure_tuple_rep(kernel_size, spatial_dims)
    if any(n < k for n, k in zip(pred.shape[2:], kernel)):
        raise ValueError(f"ssim3d needs images at least kernel_size {kernel} large, got {tuple(pred.shape[2:])}")
    ssim_map, _ = compute_ssim_and_cs(
        pred,
        target,
        spatial_dims=spatial_dims,
        kernel_size=kernel,
        kernel_sigma=ensure_tuple_rep(kernel_sigma, spatial_dims),
        data_range=data_range,
        kernel_type=kernel_type,
        k1=k1,
        k2=k2,
    )
    if mask is None:
        return _per_sample_mean(ssim_map, None)
    padding = (~mask.bool()).expand(pred.shape[0], -1, *pred.shape[2:]).to(ssim_map.dtype)
    max_pool = getattr(F, f"max_pool{spatial_dims}d")
    window_touches_padding = max_pool(padding, kernel_size=kernel, stride=1)  # same shape as ssim_map
    return _per_sample_mean(ssim_map, window_touches_padding == 0)


def high_band_energy_ratio(
    pred: torch.Tensor,
    target: torch.Tensor,
    cutoff: float,
    reference_size: int | None = REFERENCE_SIZE,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Spectral energy of pred above a cut-off divided by that of target, per sample.

    Energy is sum |F(k)|^2 over channels and the frequencies with distance from DC strictly
    above ``cutoff`` (frequency-index units at ``reference_size``, see :mod:`medssl.frequency`).
    1 means the reconstruction keeps the target's high-frequency energy; below 1, it is
    smoother than the target.
    """
    spatial_dims = _check_pair(pred, target, spatial_dims)
    axes = tuple(range(-spatial_dims, 0))
    band = frequency_radius(pred.shape[-spatial_dims:], pred.device, reference_size) > cutoff

    def band_energy(image: torch.Tensor) -> torch.Tensor:
        power = torch.fft.fftn(image.float(), dim=axes).abs() ** 2
        return (power * band).flatten(1).sum(1)

    return band_energy(pred) / band_energy(target)


def highpass_psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    cutoff: float,
    data_range: float = 1.0,
    reference_size: int | None = REFERENCE_SIZE,
    mask: torch.Tensor | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """PSNR (dB, per sample) between the Gaussian high-passed pred and target.

    The filter is the one of Frepa's loss (:func:`medssl.frequency.highpass_filter`); the peak is
    the data range of the unfiltered images. Differences in mean or in smooth shading do not
    count, lost edges and texture do.
    """
    _check_pair(pred, target, spatial_dims)
    return psnr(
        highpass_filter(pred.float(), cutoff, reference_size)[0],
        highpass_filter(target.float(), cutoff, reference_size)[0],
        data_range,
        mask,
    )
