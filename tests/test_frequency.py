"""Frepa's frequency-domain ops against straightforward per-sample NumPy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medssl.frequency import (
    frequency_corruption,
    gaussian_highpass_bank,
    highpass_filter,
    histogram_equalised_mask,
    low_frequency_perturbation,
    spectral_patch_mask,
)
from medssl.noise import standard_normal

SHAPES = {2: (3, 2, 64, 48), 3: (2, 1, 32, 24, 16)}  # (B, C, *spatial)


def make_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth blobs plus texture, in [0, 1]-ish: both low and high frequencies are present."""
    g = torch.Generator().manual_seed(seed)
    spatial = shape[2:]
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in spatial], indexing="ij")
    radius = torch.sqrt(sum(c**2 for c in grids))
    blob = (radius < 0.7).float() * 0.6 + 0.2 * torch.cos(6 * grids[0])
    return blob + 0.1 * torch.rand(shape, generator=g)


# ---------------------------------------------------------------- NumPy references, one sample at a time
def centred_fft(a: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, a.ndim))  # a: (C, *spatial)
    return np.fft.fftshift(np.fft.fftn(a, axes=axes), axes=axes)


def real_inverse(spectrum: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, spectrum.ndim))
    return np.fft.ifftn(np.fft.ifftshift(spectrum, axes=axes), axes=axes).real


def centred_frequencies(spatial: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(n) - n // 2 for n in spatial], indexing="ij")


def centred(keep: torch.Tensor) -> np.ndarray:
    """A (*spatial) mask in fftn layout, as a centred NumPy array."""
    return np.fft.fftshift(keep.numpy())


def mirror_index(n: int) -> np.ndarray:
    """Centred index of -k for every centred index of k."""
    return (2 * (n // 2) - np.arange(n)) % n


def reference_keep_mask(spatial, patch, radius, ratio, draws) -> np.ndarray:
    """Keep mask of one sample: loop over spectral patches, then restore the mirrored core."""
    keep = np.ones(spatial, dtype=bool)
    protected = np.zeros(spatial, dtype=bool)
    grid = [n // p for n, p in zip(spatial, patch)]
    for index in itertools.product(*[range(g) for g in grid]):
        region = tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, patch))
        lowest = [i * p - n // 2 for i, p, n in zip(index, patch, spatial)]
        highest = [lo + p - 1 for lo, p in zip(lowest, patch)]
        if all(lo < radius * p and hi > -radius * p for lo, hi, p in zip(lowest, highest, patch)):
            protected[region] = True
        elif draws[index] < ratio:
            keep[region] = False
    mirrored = protected[np.ix_(*[mirror_index(n) for n in spatial])]
    return keep | protected | mirrored


def reference_perturbation(spectrum, scale, radius, noise) -> np.ndarray:
    """Add the windowed noise to one sample's centred spectrum (C, *spatial)."""
    spatial = spectrum.shape[1:]
    exponent = sum(k**2 / (2 * (radius * n) ** 2) for k, n in zip(centred_frequencies(spatial), spatial))
    window = np.exp(-exponent)
    window[tuple(n // 2 for n in spatial)] = 0.0
    return spectrum + scale * np.abs(spectrum).max() * window * noise


# ---------------------------------------------------------------- spectral patch masking
@pytest.mark.parametrize("dims", [2, 3])
def test_spectral_patch_mask_matches_reference(dims):
    x = make_image(SHAPES[dims])
    b, spatial, patch, radius, (low, high) = x.shape[0], x.shape[2:], (8, 4, 4)[:dims], 1.0, (0.5, 0.75)
    out, keep = spectral_patch_mask(x, patch, (low, high), radius, generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    ratios = (low + (high - low) * torch.rand(b, generator=g)).numpy()
    draws = torch.rand(b, *[n // p for n, p in zip(spatial, patch)], generator=g).numpy()
    for i in range(b):
        expected_keep = reference_keep_mask(tuple(spatial), patch, radius, ratios[i], draws[i])
        np.testing.assert_array_equal(centred(keep[i]), expected_keep)
        expected = real_inverse(centred_fft(x[i].double().numpy()) * expected_keep)
        np.testing.assert_allclose(out[i].numpy(), expected, atol=2e-6)
    assert out.dtype == x.dtype and out.shape == x.shape


@pytest.mark.parametrize("dims", [2, 3])
def test_spectral_patch_mask_spectrum_is_symmetric_part_of_masked_one(dims):
    """Output spectrum = F * (keep(k) + keep(-k)) / 2: the real part of the inverse, and nothing else."""
    x = make_image(SHAPES[dims]).double()
    out, keep = spectral_patch_mask(x, 4, generator=torch.Generator().manual_seed(0))
    spatial = x.shape[2:]
    for i in range(x.shape[0]):
        k = centred(keep[i]).astype(float)
        mirrored = k[np.ix_(*[mirror_index(n) for n in spatial])]
        expected = centred_fft(x[i].numpy()) * (k + mirrored) / 2
        np.testing.assert_allclose(centred_fft(out[i].numpy()), expected, atol=1e-9)


@pytest.mark.parametrize("spatial", [(64, 64), (80, 48), (32, 32, 32), (40, 32, 24)])
def test_protected_core_untouched(spatial):
    """DC and every frequency with |k_i| < patch_size_i keep their exact coefficient."""
    x = make_image((2, 2, *spatial)).double()
    patch = 8
    out, keep = spectral_patch_mask(x, patch, (0.99, 1.0), generator=torch.Generator().manual_seed(1))
    core = np.ones(spatial, dtype=bool)
    for k in centred_frequencies(spatial):
        core &= np.abs(k) < patch
    for i in range(2):
        before, after = centred_fft(x[i].numpy()), centred_fft(out[i].numpy())
        np.testing.assert_allclose(after[:, core], before[:, core], rtol=1e-10, atol=1e-9)
        assert centred(keep[i])[core].all()
        # With r ~ 1 nearly all of the rest is gone: the core is what protects it.
        assert keep[i].float().mean() < 0.5
    torch.testing.assert_close(out.mean(dim=tuple(range(2, out.ndim))), x.mean(dim=tuple(range(2, x.ndim))))


def test_protected_core_matches_official_2d_layout():
    """Official 512^2 grid of 16^2 spectral patches: only patches (15|16, 15|16) are protected."""
    x = torch.zeros(1, 1, 512, 512)
    _, keep = spectral_patch_mask(x, 16, (1.0, 1.0), generator=torch.Generator().manual_seed(0))
    per_patch = torch.from_numpy(centred(keep[0])).reshape(32, 16, 32, 16).all(3).all(1)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[15:17, 15:17] = True
    torch.testing.assert_close(per_patch, expected)
    # The core holds k in [-16, 15]^2; its mirror closure adds [-15, 16]^2.
    assert keep[0].sum() == 2 * 32**2 - 31**2


@pytest.mark.parametrize("dims", [2, 3])
def test_spectral_masked_fraction_follows_drawn_ratio(dims):
    spatial = (128, 128) if dims == 2 else (32, 32, 32)
    x = torch.rand(4, 1, *spatial)
    low, high = 0.5, 0.75
    _, keep = spectral_patch_mask(x, 4, (low, high), protected_radius=0.5, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ratios = low + (high - low) * torch.rand(4, generator=g)
    masked_fraction = 1 - keep.flatten(1).float().mean(1)
    num_patches = (128 // 4) ** 2 if dims == 2 else 8**3
    tolerance = 4 * float(np.sqrt(0.25 / num_patches)) + 0.01  # 4 sigma of a binomial fraction + the core
    assert torch.all((masked_fraction - ratios).abs() < tolerance)
    assert torch.all((masked_fraction > low - tolerance) & (masked_fraction < high + tolerance))


def test_spectral_patch_mask_is_deterministic_under_a_seed():
    x = make_image(SHAPES[3])
    a = spectral_patch_mask(x, 4, generator=torch.Generator().manual_seed(11))
    b = spectral_patch_mask(x, 4, generator=torch.Generator().manual_seed(11))
    c = spectral_patch_mask(x, 4, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize("corruption", [spectral_patch_mask, frequency_corruption])
def test_without_keep_mask_the_image_is_the_same(corruption):
    x = make_image(SHAPES[3])
    image, keep = corruption(x, 4, generator=torch.Generator().manual_seed(11))
    image_only, none = corruption(x, 4, generator=torch.Generator().manual_seed(11), keep_mask=False)
    assert keep is not None and none is None
    torch.testing.assert_close(image_only, image, rtol=0, atol=0)


def test_spectral_patch_mask_rejects_patch_that_does_not_tile():
    with pytest.raises(ValueError, match="patch_size"):
        spectral_patch_mask(torch.rand(1, 1, 30, 32), 16)
    with pytest.raises(ValueError, match="spatial_dims"):
        spectral_patch_mask(torch.rand(1, 32, 32), 16, spatial_dims=3)


# ---------------------------------------------------------------- low-frequency perturbation
def hermitian_noise(half: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """Full fftn-layout noise from its rfftn-layout draw, one coefficient at a time.

    k in the drawn half: n(k) / sqrt(2), or the Hermitian part (n(k) + conj n(-k)) / 2 when -k is
    in the half too; k outside it: the conjugate of the value at -k.
    """
    full = np.zeros(half.shape[:-1] + (spatial[-1],), dtype=complex)
    drawn_length = spatial[-1] // 2 + 1
    for k in itertools.product(*[range(n) for n in spatial]):
        minus_k = tuple((n - i) % n for i, n in zip(k, spatial))
        if k[-1] < drawn_length and minus_k[-1] < drawn_length:
            value = (half[(..., *k)] + np.conj(half[(..., *minus_k)])) / 2
        elif k[-1] < drawn_length:
            value = half[(..., *k)] / np.sqrt(2)
        else:
            value = np.conj(half[(..., *minus_k)]) / np.sqrt(2)
        full[(..., *k)] = value
    return full


def draw_perturbation(g, shape, sigma_mean, sigma_std, radius_range):
    b, spatial = shape[0], tuple(shape[2:])
    scale = (sigma_mean + sigma_std * torch.randn(b, generator=g)).abs().numpy()
    low, high = radius_range
    radius = (low + (high - low) * torch.rand(b, generator=g)).numpy()
    half_shape = (*shape[:-1], shape[-1] // 2 + 1)
    parts = standard_normal((*half_shape, 2), generator=g).double().numpy()
    noise = hermitian_noise((parts[..., 0] + 1j * parts[..., 1]) / np.sqrt(2), spatial)
    return scale, radius, np.fft.fftshift(noise, axes=tuple(range(2, len(shape))))


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], (1, 1, 64, 64, 64)])  # the last: chunked noise
def test_low_frequency_perturbation_matches_reference(shape):
    x = make_image(shape)
    # A large sigma makes the perturbation visible well above float32 rounding.
    params = dict(sigma_mean=0.02, sigma_std=0.005, radius_range=(0.15, 0.25))
    out = low_frequency_perturbation(x, **params, generator=torch.Generator().manual_seed(7))
    scale, radius, noise = draw_perturbation(torch.Generator().manual_seed(7), x.shape, *params.values())
    for i in range(x.shape[0]):
        spectrum = centred_fft(x[i].double().numpy())
        expected = real_inverse(reference_perturbation(spectrum, scale[i], radius[i], noise[i]))
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-5)
    assert (out - x).abs().max() > 1e-2


@pytest.mark.parametrize("dims", [2, 3])
def test_low_frequency_perturbation_keeps_mean_and_stays_low(dims):
    x = make_image(SHAPES[dims]).double()
    out = low_frequency_perturbation(x, 0.01, 0.0, (0.1, 0.1), generator=torch.Generator().manual_seed(0))
    axes = tuple(range(2, x.ndim))
    torch.testing.assert_close(out.mean(axes), x.mean(axes), rtol=0, atol=1e-12)
    spatial = x.shape[2:]
    relative_radius = np.sqrt(sum((k / n) ** 2 for k, n in zip(centred_frequencies(spatial), spatial)))
    change = np.abs(centred_fft((out - x).flatten(0, 1).numpy())) ** 2
    # Window std is 0.1 * size: beyond 0.4 * size (4 std) the noise carries e^-8 of its amplitude.
    assert change[:, relative_radius > 0.4].sum() < 1e-6 * change.sum()


def test_low_frequency_perturbation_energy_matches_its_definition():
    """E|dF(k)|^2 = (s max|F| W(k))^2 / 2 after the real part; checked on the total energy."""
    x = make_image((2, 1, 128, 128)).double()
    s, d = 0.01, 0.2
    out = low_frequency_perturbation(x, s, 0.0, (d, d), generator=torch.Generator().manual_seed(2))
    spatial = x.shape[2:]
    window = np.exp(-sum(k**2 / (2 * (d * n) ** 2) for k, n in zip(centred_frequencies(spatial), spatial)))
    window[64, 64] = 0.0
    for i in range(2):
        peak = np.abs(centred_fft(x[i].numpy())).max()
        expected = (s * peak) ** 2 / 2 * (window**2).sum()
        measured = (np.abs(centred_fft((out[i] - x[i]).numpy())) ** 2).sum()
        assert measured == pytest.approx(expected, rel=0.1)


# ---------------------------------------------------------------- combined frequency corruption
def test_frequency_corruption_is_masking_then_perturbation_on_one_spectrum():
    x = make_image(SHAPES[3])
    patch, ratio_range, params = 4, (0.5, 0.75), (0.02, 0.005, (0.15, 0.25))
    out, keep = frequency_corruption(x, patch, ratio_range, 1.0, *params, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    b, spatial = x.shape[0], tuple(x.shape[2:])
    ratios = (0.5 + 0.25 * torch.rand(b, generator=g)).numpy()
    draws = torch.rand(b, *[n // patch for n in spatial], generator=g).numpy()
    scale, radius, noise = draw_perturbation(g, x.shape, *params)
    for i in range(b):
        expected_keep = reference_keep_mask(spatial, (patch,) * 3, 1.0, ratios[i], draws[i])
        np.testing.assert_array_equal(centred(keep[i]), expected_keep)
        masked = centred_fft(x[i].double().numpy()) * expected_keep
        expected = real_inverse(reference_perturbation(masked, scale[i], radius[i], noise[i]))
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------- histogram-equalised masking
@pytest.mark.parametrize(
    "shape, patch",
    [(SHAPES[2], (16, 8)), (SHAPES[3], (16, 8, 4)), ((2, 1, 64, 64, 64), (16, 16, 16))],  # the last: chunked noise
)
def test_histogram_equalised_mask_matches_reference(shape, patch):
    x = make_image(shape)
    b, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    low, high = 0.5, 0.75
    out, replaced = histogram_equalised_mask(x, patch, (low, high), generator=torch.Generator().manual_seed(4))

    g = torch.Generator().manual_seed(4)
    grid = [n // p for n, p in zip(spatial, patch)]
    ratios = (low + (high - low) * torch.rand(b, generator=g)).numpy()
    draws = torch.rand(b, *grid, generator=g).numpy()
    noise = standard_normal(x.shape, generator=g).numpy()
    expected = x.numpy().astype(np.float64)
    for i in range(b):
        for index in itertools.product(*[range(n) for n in grid]):
            region = tuple(slice(j * p, (j + 1) * p) for j, p in zip(index, patch))
            assert bool(replaced[(i, *index)]) == (draws[(i, *index)] < ratios[i])
            if draws[(i, *index)] < ratios[i]:
                for ch in range(c):
                    values = x[(i, ch, *region)].double().numpy()
                    expected[(i, ch, *region)] = values.mean() + values.std() * noise[(i, ch, *region)]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_histogram_equalised_mask_refills_keep_patch_statistics():
    """Each replaced 16^3 patch has its own mean and std again; kept patches are untouched."""
    g = torch.Generator().manual_seed(0)
    # Every patch has its own level and spread.
    levels = torch.rand(2, 1, 2, 1, 2, 1, 2, 1, generator=g)
    spreads = 0.05 + 0.2 * torch.rand(2, 1, 2, 1, 2, 1, 2, 1, generator=g)
    x = (levels + spreads * torch.rand(2, 1, 2, 16, 2, 16, 2, 16, generator=g) * 3.0).reshape(2, 1, 32, 32, 32)
    out, replaced = histogram_equalised_mask(x, 16, (0.5, 0.75), generator=torch.Generator().manual_seed(1))
    blocks_in = x.reshape(2, 2, 16, 2, 16, 2, 16).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 2, 2, 2, -1)
    blocks_out = out.reshape(2, 2, 16, 2, 16, 2, 16).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 2, 2, 2, -1)
    assert replaced.any() and (~replaced).any()
    for index in itertools.product(range(2), range(2), range(2), range(2)):
        before, after = blocks_in[index], blocks_out[index]
        if replaced[index]:
            assert not torch.equal(before, after)
            assert (after.mean() - before.mean()).abs() < 0.05 * before.std()
            assert (after.std() / before.std() - 1).abs() < 0.05
            assert (after != 0).all()  # noise, not a hole
        else:
            assert torch.equal(before, after)


@pytest.mark.parametrize("dims", [2, 3])
def test_histogram_masked_fraction_follows_drawn_ratio(dims):
    spatial = (128, 128) if dims == 2 else (32, 32, 32)
    x = torch.rand(4, 2, *spatial)
    _, replaced = histogram_equalised_mask(x, 4, (0.5, 0.75), generator=torch.Generator().manual_seed(8))
    ratios = 0.5 + 0.25 * torch.rand(4, generator=torch.Generator().manual_seed(8))
    fraction = replaced.flatten(1).float().mean(1)
    tolerance = 4 * float(np.sqrt(0.25 / replaced[0].numel()))
    assert torch.all((fraction - ratios).abs() < tolerance)


def test_histogram_equalised_mask_is_deterministic_under_a_seed():
    x = make_image(SHAPES[2])
    a = histogram_equalised_mask(x, 8, generator=torch.Generator().manual_seed(21))
    b = histogram_equalised_mask(x, 8, generator=torch.Generator().manual_seed(21))
    c = histogram_equalised_mask(x, 8, generator=torch.Generator().manual_seed(22))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- high-pass filters
@pytest.mark.parametrize("dims", [2, 3])
def test_highpass_filter_matches_centred_reference(dims):
    x = make_image(SHAPES[dims])
    cutoffs, spatial = (10.0, 30.0, 50.0), tuple(x.shape[2:])
    out = highpass_filter(x, cutoffs)
    assert out.shape == (3, *x.shape)
    # D scaled to the official 512 grid per axis.
    distance_sq = sum((k * 512 / n) ** 2 for k, n in zip(centred_frequencies(spatial), spatial))
    for k, d0 in enumerate(cutoffs):
        filt = 1 - np.exp(-distance_sq / d0**2)
        for i in range(x.shape[0]):
            expected = real_inverse(centred_fft(x[i].double().numpy()) * filt)
            np.testing.assert_allclose(out[k, i].numpy(), expected, atol=1e-5)
    torch.testing.assert_close(out.mean(dim=tuple(range(3, out.ndim))), torch.zeros(out.shape[:3]), atol=1e-6, rtol=0)


def test_highpass_bank_is_cached_and_has_official_values_at_512():
    bank = gaussian_highpass_bank((512, 512), (10, 50))
    assert gaussian_highpass_bank([512, 512], [10.0, 50.0]) is bank
    assert bank.shape == (2, 512, 257)
    # Official filter: 1 - exp(-((row - 256)^2 + (col - 256)^2) / d0^2) on the centred spectrum.
    rows, cols = np.meshgrid(np.arange(512) - 256, np.arange(512) - 256, indexing="ij")
    official = 1 - np.exp(-(rows**2 + cols**2) / 10.0**2)
    uncentred = np.fft.ifftshift(official)[:, :257]
    np.testing.assert_allclose(bank[0].numpy(), uncentred, atol=1e-6)
    # Halving the size keeps the filter's place relative to Nyquist.
    np.testing.assert_allclose(gaussian_highpass_bank((256, 256), 10)[0].numpy(), uncentred[::2, ::2], atol=1e-6)


def test_half_precision_input_is_transformed_in_float32_and_returned_in_its_dtype():
    x = make_image(SHAPES[3])
    expected, _ = frequency_corruption(x, 4, generator=torch.Generator().manual_seed(13))
    out, _ = frequency_corruption(x.bfloat16(), 4, generator=torch.Generator().manual_seed(13))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    assert highpass_filter(x.bfloat16(), 20.0).dtype == torch.bfloat16
    # the patch statistics of image masking are pooled in float32 (the CPU has no half-precision pooling)
    expected, _ = histogram_equalised_mask(x, 4, generator=torch.Generator().manual_seed(13))
    out, _ = histogram_equalised_mask(x.bfloat16(), 4, generator=torch.Generator().manual_seed(13))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=0)


def test_frequency_corruption_compiles_to_the_eager_values():
    """torch.compile runs the threaded noise eagerly (a graph break) and traces the rest: same output."""
    torch._dynamo.reset()
    x = make_image((1, 1, 64, 64, 64))  # the noise of its half spectrum is drawn in chunks
    eager = frequency_corruption(x, 8, generator=torch.Generator().manual_seed(3))[0]
    compiled = torch.compile(frequency_corruption)(x, 8, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
