"""Reconstruction losses of the pretraining methods, 2D and 3D.

- :func:`masked_mse` (with :func:`patch_normalise`): the MAE loss of Hi-End-MAE and MAESIL, on
  patch tokens, optionally ignoring padded voxels.
- :func:`rmse`, :func:`gradient_l1`, :func:`high_frequency_l1` and :class:`FrepaLoss`: Frepa's
  dense restoration loss on whole images (B, C, *spatial).
All return a scalar tensor and are differentiable in ``pred``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.frequency import DEFAULT_CUTOFFS, REFERENCE_SIZE, _check_spatial_dims, highpass_filter

__all__ = ["patch_normalise", "masked_mse", "rmse", "gradient_l1", "high_frequency_l1", "FrepaLoss"]


def patch_normalise(patches: torch.Tensor, eps: float = 1e-6, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise every patch (last axis) by its own mean and variance: LayerNorm without affine.

    patches: (..., P). valid: optional (..., P) bool/0-1, True for real voxels; the statistics
    then use the valid voxels only (a patch with none keeps mean 0, variance 0). The variance is
    the population one, as in LayerNorm (MAE's reference code uses the unbiased one, a factor
    P / (P - 1) apart).
    """
    if valid is None:
        return F.layer_norm(patches, patches.shape[-1:], eps=eps)
    weight = valid.to(patches.dtype)
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (patches * weight).sum(-1, keepdim=True) / count
    var = ((patches - mean) ** 2 * weight).sum(-1, keepdim=True) / count
    return (patches - mean) / torch.sqrt(var + eps)


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix: bool = False,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE loss: mean squared error over the voxels of the masked tokens only.

    pred, target: (B, N, P) patch tokens (e.g. from ``medssl.masking.patchify``).
    mask: (B, N), 1 for a masked token (the loss counts it), 0 for a visible one.
    norm_pix: compare with each target patch normalised by its own statistics (:func:`patch_normalise`).
    valid: optional (B, N, P), True for real voxels, False for padding; padding never counts.
    Without ``valid`` this is MAE's mean over the masked tokens of the per-token mean error.
    Returns 0 when nothing is masked.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"masked_mse expects pred and target (B, N, P) and mask (B, N), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)} and {tuple(mask.shape)}"
        )
    if norm_pix:
        target = patch_normalise(target, eps, valid)
    error = (pred - target) ** 2
    weight = mask.to(error.dtype).unsqueeze(-1)
    if valid is not None:
        weight = weight * valid.to(error.dtype)
    else:
        weight = weight.expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(torch.finfo(error.dtype).tiny)


def rmse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Root mean squared error over the whole batch (Frepa's image loss).

    The mean squared error is clamped at ``eps`` so the gradient stays finite at a perfect match.
    """
    return torch.sqrt(F.mse_loss(pred, target).clamp_min(eps))


def gradient_l1(pred: torch.Tensor, target: torch.Tensor, spatial_dims: int | None = None) -> torch.Tensor:
    """Sum over spatial axes of the mean L1 distance between forward differences (Frepa's L_grad).

    pred, target: (B, C, *spatial).
    """
    spatial_dims = _check_spatial_dims(pred, spatial_dims)
    # Differences are linear, so the difference of gradients is the gradient of the difference.
    error = pred - target
    return sum(torch.diff(error, dim=axis).abs().mean() for axis in range(-spatial_dims, 0))


def high_frequency_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    cutoffs: float | Sequence[float] = DEFAULT_CUTOFFS,
    reference_size: int | None = REFERENCE_SIZE,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Sum over cut-offs of the mean L1 distance of Gaussian high-passed images (Frepa's L_HFL).

    pred, target: (B, C, *spatial). Cut-offs are in frequency-index units at ``reference_size``
    (see :mod:`medssl.frequency`); the defaults are the official 10..50 at 512.
    """
    filtered = highpass_filter(pred - target, cutoffs, reference_size, spatial_dims)  # (K, B, C, *spatial)
    return filtered.abs().flatten(1).mean(1).sum()


class FrepaLoss(nn.Module):
    """Frepa's restoration loss: rmse_weight * RMSE + gradient_weight * L_grad + high_frequency_weight * L_HFL.

    Defaults are the official weights (1, 1, 0.2) and cut-offs. ``forward(pred, target)`` takes
    (B, C, *spatial) images and returns the scalar loss; :meth:`terms` returns the unweighted parts.
    """

    def __init__(
        self,
        rmse_weight: float = 1.0,
        gradient_weight: float = 1.0,
        high_frequency_weight: float = 0.2,
        cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
        reference_size: int | None = REFERENCE_SIZE,
        spatial_dims: int | None = None,
    ) -> None:
        super().__init__()
        self.weights = {"rmse": rmse_weight, "gradient": gradient_weight, "high_frequency": high_frequency_weight}
        self.cutoffs = tuple(cutoffs)
        self.reference_size = reference_size
        self.spatial_dims = spatial_dims

    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "rmse": rmse(pred, target),
            "gradient": gradient_l1(pred, target, self.spatial_dims),
            "high_frequency": high_frequency_l1(pred, target, self.cutoffs, self.reference_size, self.spatial_dims),
        }

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in self.terms(pred, target).items())
