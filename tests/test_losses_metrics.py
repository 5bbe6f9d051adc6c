"""Reconstruction losses and metrics: hand-computed values on tiny inputs, gradients, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from medssl.frequency import highpass_filter
from medssl.losses import FrepaLoss, gradient_l1, high_frequency_l1, masked_mse, patch_normalise, rmse
from medssl.metrics import high_band_energy_ratio, highpass_psnr, psnr, ssim3d


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random smooth structure plus fine texture, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(shape[0], shape[1], *[max(n // 4, 1) for n in shape[2:]], generator=g)
    mode = "trilinear" if len(shape) == 5 else "bilinear"
    smooth = torch.nn.functional.interpolate(coarse, size=shape[2:], mode=mode, align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(shape, generator=g)).clamp(0, 1)


def blur(x: torch.Tensor) -> torch.Tensor:
    """3-voxel box blur along every spatial axis (edges replicated)."""
    for axis in range(2, x.ndim):
        padded = torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, x.shape[axis] - 1, 1)], dim=axis)
        n = x.shape[axis]
        x = (padded.narrow(axis, 0, n) + padded.narrow(axis, 1, n) + padded.narrow(axis, 2, n)) / 3
    return x


# ---------------------------------------------------------------- masked MSE and patch normalisation
def test_patch_normalise_hand_values():
    patches = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])
    expected[0] /= math.sqrt(1.25 + 1e-6)
    torch.testing.assert_close(patch_normalise(patches), expected)
    # Statistics over the valid voxels only: [1, 3] -> mean 2, var 1.
    valid = torch.tensor([[True, False, True, False], [True, True, True, True]])
    out = patch_normalise(patches, valid=valid)
    torch.testing.assert_close(out[0, [0, 2]], torch.tensor([-1.0, 1.0]) / math.sqrt(1 + 1e-6))


def test_masked_mse_hand_values():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [1.0, 3.0]]])  # per-token MSE 1, 4, 5
    assert masked_mse(pred, target, torch.tensor([[1, 0, 0]])).item() == pytest.approx(1.0)
    assert masked_mse(pred, target, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(2.5)
    assert masked_mse(pred, target, torch.tensor([[True, True, True]])).item() == pytest.approx(10 / 3)
    assert masked_mse(pred, target, torch.zeros(1, 3)).item() == 0.0
    # norm_pix: token 3 becomes [-1, 1] / sqrt(1 + eps) (MSE ~1); token 2 becomes [0, 0].
    assert masked_mse(pred, target, torch.tensor([[0, 1, 1]]), norm_pix=True).item() == pytest.approx(0.5, rel=1e-5)
    # Padding: the second voxel of token 3 is padding, so only its first voxel (error 1) counts.
    valid = torch.ones(1, 3, 2, dtype=torch.bool)
    valid[0, 2, 1] = False
    assert masked_mse(pred, target, torch.tensor([[0, 1, 1]]), valid=valid).item() == pytest.approx((4 + 4 + 1) / 3)


def test_masked_mse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mask"):
        masked_mse(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.zeros(2, 5))


# ---------------------------------------------------------------- Frepa's losses
def test_rmse_hand_value_and_finite_gradient_at_a_perfect_match():
    pred = torch.tensor([[[[1.0, -1.0], [3.0, 1.0]]]])
    assert rmse(pred, torch.zeros_like(pred)).item() == pytest.approx(math.sqrt(3.0))
    same = torch.rand(1, 1, 4, 4, requires_grad=True)
    rmse(same, same.detach()).backward()
    assert torch.isfinite(same.grad).all()


def test_gradient_l1_hand_values():
    target = torch.zeros(1, 1, 2, 3)
    pred = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])
    # Along rows: |2-0|, |2-1|, |2-3| -> mean 4/3. Along columns: 1, 2, 0, 0 -> mean 3/4.
    assert gradient_l1(pred, target).item() == pytest.approx(4 / 3 + 3 / 4)
    # A constant offset has no gradient; in 3D the third axis counts too.
    volume = torch.rand(2, 1, 4, 5, 6)
    assert gradient_l1(volume + 0.3, volume).item() == pytest.approx(0.0, abs=1e-6)
    ramp = torch.arange(6.0).expand(1, 1, 4, 5, 6)
    assert gradient_l1(ramp, torch.zeros_like(ramp)).item() == pytest.approx(1.0)


def test_high_frequency_l1_against_filtered_images_and_mean_invariance():
    target = smooth_volume((2, 1, 16, 16, 16))
    pred = blur(target)
    cutoffs = (10.0, 30.0, 50.0)
    value = high_frequency_l1(pred, target, cutoffs)
    filtered_pred, filtered_target = highpass_filter(pred, cutoffs), highpass_filter(target, cutoffs)
    expected = sum((filtered_pred[k] - filtered_target[k]).abs().mean() for k in range(3))
    torch.testing.assert_close(value, expected)
    assert value > 1e-3
    # Every high-pass filter removes DC: an intensity offset costs nothing.
    assert high_frequency_l1(target + 0.25, target, cutoffs).item() < 1e-6


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 1, 16, 16, 16)])
def test_frepa_loss_combines_terms_with_its_weights_and_backpropagates(shape):
    target = smooth_volume(shape)
    pred = (blur(target) + 0.01).requires_grad_()
    loss_fn = FrepaLoss()
    terms = loss_fn.terms(pred, target)
    expected = terms["rmse"] + terms["gradient"] + 0.2 * terms["high_frequency"]
    total = loss_fn(pred, target)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["rmse"], rmse(pred, target))
    torch.testing.assert_close(terms["gradient"], gradient_l1(pred, target))
    torch.testing.assert_close(terms["high_frequency"], high_frequency_l1(pred, target))
    reweighted = FrepaLoss(rmse_weight=0.0, gradient_weight=2.0, high_frequency_weight=1.0)(pred, target)
    torch.testing.assert_close(reweighted, 2 * terms["gradient"] + terms["high_frequency"])
    total.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_losses_backpropagate_through_each_term():
    target = smooth_volume((1, 1, 12, 12, 12))
    for loss in (rmse, gradient_l1, high_frequency_l1):
        pred = blur(target).requires_grad_()
        loss(pred, target).backward()
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0, loss.__name__
    tokens = torch.rand(2, 4, 8, requires_grad=True)
    masked_mse(tokens, torch.rand(2, 4, 8), torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]]), norm_pix=True).backward()
    assert tokens.grad[0, 1].abs().sum() == 0 and tokens.grad[0, 0].abs().sum() > 0


# ---------------------------------------------------------------- PSNR
def test_psnr_identical_is_infinite_and_known_noise_gives_expected_value():
    target = smooth_volume((3, 1, 8, 8, 8))
    assert torch.isinf(psnr(target, target)).all()
    # A constant error of 0.1 has MSE 0.01: 20 dB at range 1, 20 log10(2) more at range 2.
    torch.testing.assert_close(psnr(target + 0.1, target), torch.full((3,), 20.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(target + 0.1, target, data_range=2.0), torch.full((3,), 20 + 20 * math.log10(2)))
    # Gaussian noise of std 0.05: 26.02 dB, within 0.15 dB (4 sigma of the estimate on 32^3 voxels).
    volume = smooth_volume((3, 1, 32, 32, 32))
    noise = 0.05 * torch.randn(volume.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(psnr(volume + noise, volume), torch.full((3,), 26.02), atol=0.15, rtol=0)


def test_psnr_mask_excludes_padding():
    target = smooth_volume((2, 1, 8, 8, 8))
    pred = target.clone()
    valid = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    valid[..., :6, :5, :7] = True
    pred[~valid.expand_as(pred)] = 5.0  # garbage where the volume was padded
    pred[1, 0, 0, 0, 0] += 0.5  # one wrong real voxel in sample 1
    result = psnr(pred, target, mask=valid)
    assert torch.isinf(result[0])
    assert result[1].item() == pytest.approx(10 * math.log10(6 * 5 * 7 / 0.25), rel=1e-5)
    assert torch.isfinite(psnr(pred, target)).all() and psnr(pred, target)[0] < 10


# ---------------------------------------------------------------- SSIM
def test_ssim3d_identical_is_one_and_matches_monai_without_mask():
    target = smooth_volume((2, 1, 20, 20, 20))
    torch.testing.assert_close(ssim3d(target, target), torch.ones(2))
    noisy = (target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    value = ssim3d(noisy, target)
    torch.testing.assert_close(value, SSIMMetric(spatial_dims=3, data_range=1.0)(noisy, target).flatten())
    assert torch.all(value < 0.95)
    assert torch.all(ssim3d((target + 0.02 * (noisy - target)), target) > value)  # less noise, higher SSIM


def test_ssim3d_mask_equals_ssim_of_the_unpadded_box():
    target = smooth_volume((2, 1, 24, 24, 20))
    pred = blur(target)
    box = (slice(None), slice(None), slice(0, 17), slice(3, 24), slice(2, 15))
    valid = torch.zeros_like(target, dtype=torch.bool)
    valid[box] = True
    pred_padded = torch.where(valid, pred, torch.rand(pred.shape, generator=torch.Generator().manual_seed(2)))
    masked = ssim3d(pred_padded, target, mask=valid)
    torch.testing.assert_close(masked, ssim3d(pred[box], target[box]))
    assert torch.all((masked - ssim3d(pred_padded, target)).abs() > 0.05)


def test_ssim3d_works_in_2d_and_rejects_small_images():
    image = smooth_volume((1, 1, 32, 32))
    torch.testing.assert_close(ssim3d(image, image), torch.ones(1))
    with pytest.raises(ValueError, match="kernel_size"):
        ssim3d(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))


# ---------------------------------------------------------------- high-frequency fidelity
def test_high_band_energy_ratio():
    target = smooth_volume((2, 1, 16, 16, 16))
    cutoff = 64.0  # at 16 voxels: 2 frequency indices
    torch.testing.assert_close(high_band_energy_ratio(target, target, cutoff), torch.ones(2))
    torch.testing.assert_close(high_band_energy_ratio(2 * target, target, cutoff), torch.full((2,), 4.0))
    # An offset lives at DC only; a blur loses high frequencies.
    torch.testing.assert_close(high_band_energy_ratio(target + 0.5, target, cutoff), torch.ones(2))
    assert torch.all(high_band_energy_ratio(blur(target), target, cutoff) < 0.7)
    # Against a direct band sum on the centred spectrum.
    spectrum = np.abs(np.fft.fftshift(np.fft.fftn(target[0, 0].double().numpy()))) ** 2
    blurred = np.abs(np.fft.fftshift(np.fft.fftn(blur(target)[0, 0].double().numpy()))) ** 2
    k = np.meshgrid(*[np.arange(16) - 8] * 3, indexing="ij")
    band = np.sqrt(sum((c * 512 / 16) ** 2 for c in k)) > cutoff
    expected = blurred[band].sum() / spectrum[band].sum()
    assert high_band_energy_ratio(blur(target), target, cutoff)[0].item() == pytest.approx(expected, rel=1e-4)


def test_highpass_psnr_ignores_smooth_differences_and_sees_lost_detail():
    target = smooth_volume((2, 1, 16, 16, 16))
    assert torch.all(highpass_psnr(target, target, 30.0) == float("inf"))
    assert torch.all(highpass_psnr(target + 0.3, target, 30.0) > 100)  # only float rounding left
    blurred = highpass_psnr(blur(target), target, 30.0)
    assert torch.all(blurred < psnr(target + 0.01, target))
    filtered = highpass_filter(torch.cat([blur(target), target]), 30.0)[0]
    torch.testing.assert_close(blurred, psnr(filtered[:2], filtered[2:]))
