"""Frequency-domain corruptions and filters of Frepa, for 2D and 3D images.

Every function takes images shaped (B, C, *spatial); ``spatial_dims`` defaults to ``x.ndim - 2``
and, when given, is checked against the input. The corruptions draw one set of parameters per
sample and every random number from the optional ``generator`` (which must live on the input's
device), run as batched tensor ops on that device and never synchronise with the host.

Conventions shared by all functions:

- Spectra are kept in the layout ``torch.fft.fftn`` returns (DC at index 0; along an axis of
  size n, index i holds frequency i for i < (n + 1) // 2, else i - n), so no full-size shift is
  ever made. Patches of the spectrum, the protected core and windows are defined on the
  *centred* spectrum ``fftshift(fftn(x))``, where index j holds ``k = j - n // 2``; only these
  small masks are moved between the layouts. The work itself is done on the half spectrum of
  ``torch.fft.rfftn`` (last axis n // 2 + 1 long), the other half being the mirror image of a
  real image's spectrum: half the FFT, noise and memory of full complex spectra.
- Frequency distances are in *frequency-index units at a reference size* (512, the official 2D
  image size): along an axis of size n, frequency k counts as ``k * reference_size / n``. The
  official cut-offs (d0 = 10..50 on 512 images) therefore keep the same place in the spectrum,
  relative to Nyquist, at any size; at 96 voxels d0 = 10 is 1.875 index units. Pass
  ``reference_size=None`` to measure in the array's own index units.
- The corruptions end with the real part of the inverse FFT, as the official code does. The
  output's spectrum is therefore the Hermitian-symmetric part of the modified spectrum: a
  coefficient zeroed at k whose mirror -k was kept keeps half of its amplitude. That part is
  computed directly on the half spectrum and inverted with ``irfftn``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep

from medssl.noise import standard_normal, standard_normal_

__all__ = [
    "frequency_radius",
    "gaussian_highpass_bank",
    "highpass_filter",
    "spectral_patch_mask",
    "low_frequency_perturbation",
    "frequency_corruption",
    "histogram_equalised_mask",
]

# Official Frepa cut-offs of the high-frequency loss, at the reference size 512.
DEFAULT_CUTOFFS: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0)
REFERENCE_SIZE = 512


def _check_spatial_dims(x: torch.Tensor, spatial_dims: int | None) -> int:
    """Number of spatial axes of a (B, C, *spatial) tensor."""
    inferred = x.ndim - 2
    if inferred < 1 or (spatial_dims is not None and spatial_dims != inferred):
        raise ValueError(
            f"expected an image shaped (B, C, *spatial) with spatial_dims={spatial_dims or '2 or 3'}, "
            f"got shape {tuple(x.shape)}; add the missing batch/channel axes or fix spatial_dims"
        )
    return inferred


def _spatial_axes(spatial_dims: int) -> tuple[int, ...]:
    return tuple(range(-spatial_dims, 0))


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    # FFTs need float32/float64 (half-precision FFTs only exist for power-of-two sizes on GPU), and
    # the CPU's average pooling has no half-precision kernels.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _uniform(
    value_range: Sequence[float], batch_size: int, device: torch.device, generator: torch.Generator | None, name: str
) -> torch.Tensor:
    """One U(low, high) draw per sample: (B,)."""
    low, high = value_range
    if not low <= high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value_range)}")
    return low + (high - low) * torch.rand(batch_size, device=device, generator=generator)


def _patch_grid(
    spatial_shape: Sequence[int], patch_size: int | Sequence[int], name: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(patch, grid) per axis; the patch must tile the image exactly."""
    patch = ensure_tuple_rep(patch_size, len(spatial_shape))
    if any(p < 1 or n % p for n, p in zip(spatial_shape, patch)):
        raise ValueError(
            f"{name} {patch} does not tile the spatial shape {tuple(spatial_shape)}; "
            f"crop or pad the input to a multiple of {name}, or choose another {name}"
        )
    return patch, tuple(n // p for n, p in zip(spatial_shape, patch))


def _interleave(grid: Sequence[int], patch: Sequence[int]) -> list[int]:
    """[g0, p0, g1, p1, ...]: the shape that views an image as its blocks without copying."""
    return [v for g, p in zip(grid, patch) for v in (g, p)]


def _spectral_patch_index(n: int, p: int, device: torch.device) -> torch.Tensor:
    """Spectral patch of every fftn-layout index along an axis of size n (patches on the centred axis)."""
    centred = (torch.arange(n, device=device) + n // 2) % n  # fftshift moves index i to (i + n//2) mod n
    return centred // p


def _mirror(values: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Value at -k for every frequency k along ``axes``, in fftn layout (index i <-> (n - i) mod n)."""
    axes = tuple(axes)
    return torch.roll(torch.flip(values, axes), (1,) * len(axes), axes) if axes else values


def _half_spectrum(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """rfftn of a real image: the k with a non-negative last frequency; the rest is their mirror."""
    return torch.fft.rfftn(x, dim=_spatial_axes(spatial_dims))


def _real_image(half_spectrum: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """The real image of a Hermitian spectrum given by its rfftn half."""
    return torch.fft.irfftn(half_spectrum, s=tuple(spatial_shape), dim=_spatial_axes(len(spatial_shape)))


def _half(values: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """The rfftn-layout part (last axis n // 2 + 1 long) of an fftn-layout array."""
    return values[..., : spatial_shape[-1] // 2 + 1]


def _self_mirrored_planes(n: int) -> list[int]:
    """Indices of the last rfftn axis that are their own mirror: frequency 0, and Nyquist when n is even."""
    return [0] if n % 2 else [0, n // 2]


def _axis_frequencies(spatial_shape: Sequence[int], device: torch.device | str | None, onesided: bool) -> list[torch.Tensor]:
    """k / n_i along every axis in fftn layout (rfftn's for the last axis when ``onesided``): 1-D, float32."""
    last = len(spatial_shape) - 1
    return [torch.fft.rfftfreq(n, device=device) if onesided and axis == last else torch.fft.fftfreq(n, device=device)
            for axis, n in enumerate(spatial_shape)]


def frequency_radius(
    spatial_shape: Sequence[int],
    device: torch.device | str | None = None,
    reference_size: int | None = REFERENCE_SIZE,
    onesided: bool = False,
) -> torch.Tensor:
    """Distance of every FFT coefficient from DC, in frequency-index units at ``reference_size``.

    Laid out as ``torch.fft.fftn`` returns its coefficients (DC first, not centred), or as
    ``torch.fft.rfftn`` does when ``onesided`` (last axis n // 2 + 1 long). Float32.
    """
    squared = 0.0
    for axis, (n, freq) in enumerate(zip(spatial_shape, _axis_frequencies(spatial_shape, device, onesided))):
        freq = freq * (reference_size if reference_size is not None else n)
        shape = [1] * len(spatial_shape)
        shape[axis] = -1
        squared = squared + freq.reshape(shape) ** 2
    return torch.sqrt(squared)


@functools.lru_cache(maxsize=32)
def _cached_highpass_bank(
    spatial_shape: tuple[int, ...], cutoffs: tuple[float, ...], device: torch.device, reference_size: int | None
) -> torch.Tensor:
    radius_sq = frequency_radius(spatial_shape, device, reference_size, onesided=True) ** 2
    d0_sq = torch.tensor(cutoffs, device=device).reshape(-1, *[1] * len(spatial_shape)) ** 2
    return 1.0 - torch.exp(-radius_sq / d0_sq)


def gaussian_highpass_bank(
    spatial_shape: Sequence[int],
    cutoffs: float | Sequence[float] = DEFAULT_CUTOFFS,
    device: torch.device | str | None = None,
    reference_size: int | None = REFERENCE_SIZE,
) -> torch.Tensor:
    """Gaussian high-pass filters H = 1 - exp(-D^2 / d0^2), one per cut-off d0.

    D is the distance from DC (see :func:`frequency_radius`). Because every H is real and
    symmetric in k, it is returned in the layout of ``torch.fft.rfftn``: (K, *spatial_shape[:-1],
    spatial_shape[-1] // 2 + 1), float32. Cached per (shape, cut-offs, device, reference size):
    treat the result as read-only.
    """
    cutoffs = (cutoffs,) if isinstance(cutoffs, (int, float)) else cutoffs
    if not cutoffs or min(cutoffs) <= 0:
        raise ValueError(f"cutoffs must be one or more positive frequencies, got {cutoffs}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _cached_highpass_bank(
        tuple(int(n) for n in spatial_shape), tuple(float(c) for c in cutoffs), device, reference_size
    )


def highpass_filter(
    x: torch.Tensor,
    cutoffs: float | Sequence[float] = DEFAULT_CUTOFFS,
    reference_size: int | None = REFERENCE_SIZE,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Gaussian high-pass filtered copies of x, one per cut-off: (B, C, *spatial) -> (K, B, C, *spatial).

    Differentiable; the mean (DC) is removed by every filter.
    """
    spatial_dims = _check_spatial_dims(x, spatial_dims)
    axes = _spatial_axes(spatial_dims)
    spatial_shape = x.shape[-spatial_dims:]
    bank = gaussian_highpass_bank(spatial_shape, cutoffs, x.device, reference_size)
    spectrum = torch.fft.rfftn(_full_precision(x), dim=axes)
    filtered = spectrum.unsqueeze(0) * bank.reshape(bank.shape[0], *[1] * (x.ndim - spatial_dims), *bank.shape[1:])
    return torch.fft.irfftn(filtered, s=spatial_shape, dim=axes).to(x.dtype)


@functools.lru_cache(maxsize=32)
def _protected_core(
    spatial_shape: tuple[int, ...], patch: tuple[int, ...], protected_radius: float, device: torch.device
) -> torch.Tensor:
    """Boolean (*spatial) mask, fftn layout, of the coefficients that are never masked."""
    core = torch.ones(spatial_shape, dtype=torch.bool, device=device)
    for axis, (n, p) in enumerate(zip(spatial_shape, patch)):
        # Centred patch j holds k in [j*p - n//2, (j+1)*p - 1 - n//2]; it is protected when it
        # reaches into the open band |k| < radius * p around DC.
        first = torch.arange(0, n, p, device=device) - n // 2
        in_band = (first < protected_radius * p) & (first + p - 1 > -protected_radius * p)
        shape = [1] * len(spatial_shape)
        shape[axis] = n
        core = core & in_band[_spectral_patch_index(n, p, device)].reshape(shape)
    # Close the set under k -> -k so the real part of the inverse leaves it exactly unchanged.
    return core | _mirror(core, _spatial_axes(len(spatial_shape)))


@functools.lru_cache(maxsize=32)
def _spectral_patch_lookup(
    spatial_shape: tuple[int, ...], patch: tuple[int, ...], device: torch.device
) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Per axis, the spectral patch of every fftn-layout index k, of every rfftn-layout index k,
    and of the mirror -k of every rfftn-layout index k."""
    full = [_spectral_patch_index(n, p, device) for n, p in zip(spatial_shape, patch)]
    mirrored = [of_index[(-torch.arange(n, device=device)) % n] for of_index, n in zip(full, spatial_shape)]
    half = [*full[:-1], _half(full[-1], spatial_shape)]
    mirrored[-1] = _half(mirrored[-1], spatial_shape)
    return tuple(full), tuple(half), tuple(mirrored)


def _patch_values(per_patch: torch.Tensor, patch_of_index: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, *grid) -> (B, *coefficients): one axis at a time, so only the last gather is full size."""
    for axis, lookup in enumerate(patch_of_index):
        per_patch = per_patch.index_select(axis + 1, lookup)
    return per_patch


def _per_coefficient(values: torch.Tensor, spectrum: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(B, *spatial) -> (B, 1, ..., *spatial), broadcastable over the channels of a (B, C, *spatial) spectrum."""
    return values.reshape(values.shape[0], *[1] * (spectrum.ndim - spatial_dims - 1), *values.shape[1:])


def _scale_spectrum_(spectrum: torch.Tensor, factor: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """spectrum (B, C, *spatial) complex times a real factor (B, *spatial), in place and without promoting the
    factor to complex; returns ``spectrum``."""
    torch.view_as_real(spectrum).mul_(_per_coefficient(factor, spectrum, spatial_dims).unsqueeze(-1))
    return spectrum


def _mask_spectral_patches(
    half_spectrum: torch.Tensor,
    spatial_shape: tuple[int, ...],
    patch_size: int | Sequence[int],
    ratio_range: Sequence[float],
    protected_radius: float,
    generator: torch.Generator | None,
    keep_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights that zero random spectral patches of an rfftn half spectrum (B, C, *half).

    Returns the weight (B, *half) that turns the half spectrum into that of the real image left
    after masking (1 where k and its mirror -k were kept, 1/2 where one of them was, else 0),
    and, when ``keep_mask``, the keep mask (B, *spatial) in fftn layout, else None.
    """
    spatial_dims = len(spatial_shape)
    patch, grid = _patch_grid(spatial_shape, patch_size, "patch_size")
    batch_size, device = half_spectrum.shape[0], half_spectrum.device
    ratio = _uniform(ratio_range, batch_size, device, generator, "ratio_range")
    draws = torch.rand(batch_size, *grid, device=device, generator=generator)
    kept_patch = draws >= ratio.reshape(-1, *[1] * spatial_dims)  # (B, *grid)
    core = _protected_core(spatial_shape, patch, protected_radius, device)
    core_half = _half(core, spatial_shape)  # the core is its own mirror
    full, half, mirrored = _spectral_patch_lookup(spatial_shape, patch, device)
    keep_half = _patch_values(kept_patch, half).logical_or_(core_half)
    keep_mirrored = _patch_values(kept_patch, mirrored).logical_or_(core_half)
    # The real part of the inverse keeps the Hermitian part of the masked spectrum:
    # F(k) * (keep(k) + keep(-k)) / 2.
    weight = keep_half.to(half_spectrum.real.dtype).add_(keep_mirrored).mul_(0.5)
    keep = _patch_values(kept_patch, full).logical_or_(core) if keep_mask else None
    return weight, keep


def _peak_magnitude(half_spectrum: torch.Tensor, spatial_dims: int, support: torch.Tensor | None = None) -> torch.Tensor:
    """max |F| per sample over its channels and the whole spectrum (B,); only where ``support`` when given.

    Taken as the root of the largest |F|^2 = re^2 + im^2: the CPU's complex abs is about four
    times slower than those two products.
    """
    power = torch.addcmul(half_spectrum.real.square(), half_spectrum.imag, half_spectrum.imag)
    if support is not None:
        power.mul_(_per_coefficient(support, half_spectrum, spatial_dims))
    return power.amax(dim=tuple(range(1, half_spectrum.ndim))).sqrt_()


def _gaussian_window(
    spatial_shape: tuple[int, ...], std: torch.Tensor, scale: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """scale * exp(-sum_i (k_i / n_i)^2 / (2 std^2)), zero at DC: (B, *half) in rfftn layout from (B,) std and scale.

    A window of relative std d has std d * n_i along axis i. The exponent is a sum over axes, so
    the window is the product of one small factor per axis and only the last product is full size.
    """
    spatial_dims = len(spatial_shape)
    window = scale.reshape(-1, *[1] * spatial_dims)
    for axis, frequency in enumerate(_axis_frequencies(spatial_shape, device, onesided=True)):
        factor = torch.exp(frequency.square() * (-0.5 / std.reshape(-1, 1) ** 2))  # (B, n_i)
        shape = [-1] + [1] * spatial_dims
        shape[axis + 1] = frequency.numel()
        window = window * factor.reshape(shape)
    window[(slice(None), *[0] * spatial_dims)] = 0.0
    return window


def _hermitian_noise(
    shape: Sequence[int], spatial_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Twice the rfftn half (B, C, *half) of a Hermitian complex Gaussian field with E|n(k)|^2 = 1/2.

    That is the distribution of the Hermitian part (n(k) + conj n(-k)) / 2 of circular noise of
    unit variance, which is all of it the real part of an inverse FFT keeps. On the planes of
    the last axis that are their own mirror (frequency 0, and Nyquist for an even size) the
    Hermitian part is taken explicitly, so every FFT backend reads the same field. The factor 2
    is left to the caller, who scales the noise anyway: one pass over it less.

    ``dtype`` is the complex dtype; its real and imaginary parts are drawn as one
    :func:`medssl.noise.standard_normal_` tensor (*shape, 2).
    """
    noise = torch.empty(tuple(shape), dtype=dtype, device=device)
    standard_normal_(torch.view_as_real(noise), generator)  # E|z|^2 = 2
    planes = _self_mirrored_planes(spatial_shape[-1])
    in_planes = noise[..., planes]
    mirrored = _mirror(in_planes, _spatial_axes(len(spatial_shape))[:-1])  # -k stays in its plane
    noise[..., planes] = (in_planes + mirrored.conj()) * 0.5**0.5
    return noise


def _perturb_low_frequencies(
    half_spectrum: torch.Tensor,
    spatial_shape: tuple[int, ...],
    peak: torch.Tensor,
    sigma_mean: float,
    sigma_std: float,
    radius_range: Sequence[float],
    generator: torch.Generator | None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add Gaussian-windowed noise to an rfftn half spectrum (B, C, *half), DC excluded; peak: (B,) max|F|.

    With ``weight`` (B, *half), the spectrum is scaled by it first (the masking's weights), in
    the same pass as the addition.
    """
    spatial_dims = len(spatial_shape)
    batch_size, device = half_spectrum.shape[0], half_spectrum.device
    scale = (sigma_mean + sigma_std * torch.randn(batch_size, device=device, generator=generator)).abs()
    radius = _uniform(radius_range, batch_size, device, generator, "radius_range")
    noise = _hermitian_noise(half_spectrum.shape, spatial_shape, half_spectrum.dtype, device, generator)
    amplitude = _gaussian_window(spatial_shape, radius, 0.5 * scale * peak, device)  # 0.5: the noise is doubled
    perturbed = _scale_spectrum_(noise, amplitude, spatial_dims)
    if weight is None:
        return perturbed.add_(half_spectrum)
    per_pair = _per_coefficient(weight, half_spectrum, spatial_dims).unsqueeze(-1)
    torch.view_as_real(perturbed).addcmul_(torch.view_as_real(half_spectrum), per_pair)
    return perturbed


def spectral_patch_mask(
    x: torch.Tensor,
    patch_size: int | Sequence[int] = 16,
    ratio_range: Sequence[float] = (0.5, 0.75),
    protected_radius: float = 1.0,
    spatial_dims: int | None = None,
    generator: torch.Generator | None = None,
    keep_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frepa's high-frequency masking: zero random patches of the centred spectrum.

    The centred spectrum is cut into patches of ``patch_size`` coefficients (it must tile the
    image); per sample a ratio r ~ U(ratio_range) is drawn and every patch outside the protected
    core is zeroed with probability r. The protected core is every patch that reaches into the
    box |k_i| < protected_radius * patch_size_i around DC, plus the mirror image of those
    coefficients. With the default radius 1 and an even number of patches per axis that is the
    2 (2D: 2x2, 3D: 2x2x2) patches meeting at DC, as in the official code's 32x32 grid; with an
    odd number it is the patch holding DC and its two neighbours per axis. The mirror closure
    adds at most one coefficient row per axis and makes the core exactly untouched in the output.

    Random draws, in order: r (B,), then one uniform per patch (B, *grid).

    Returns:
        the corrupted image (B, C, *spatial), real part of the inverse FFT, in x's dtype;
        the keep mask (B, *spatial), bool, True where the coefficient was kept, in fftn layout
        (``torch.fft.fftshift(keep, dim=spatial axes)`` shows it centred); None when
        ``keep_mask`` is False, which saves building it (a full-size gather) where only the
        image is used.
    """
    spatial_dims = _check_spatial_dims(x, spatial_dims)
    spatial_shape = tuple(x.shape[-spatial_dims:])
    spectrum = _half_spectrum(_full_precision(x), spatial_dims)
    weight, keep = _mask_spectral_patches(
        spectrum, spatial_shape, patch_size, ratio_range, protected_radius, generator, keep_mask
    )
    return _real_image(_scale_spectrum_(spectrum, weight, spatial_dims), spatial_shape).to(x.dtype), keep


def low_frequency_perturbation(
    x: torch.Tensor,
    sigma_mean: float = 5e-4,
    sigma_std: float = 1e-4,
    radius_range: Sequence[float] = (0.15, 0.25),
    spatial_dims: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Frepa's low-frequency perturbation: windowed complex noise on the centred spectrum.

    Per sample s = |N(sigma_mean, sigma_std)| and d ~ U(radius_range); the noise at frequency k
    is s * max|F| * exp(-sum_i k_i^2 / (2 (d * n_i)^2)) * n(k), n a circular complex Gaussian of
    unit variance and max|F| taken over the sample's channels. DC gets no noise, so the mean
    is kept. Only the Hermitian part of the noise reaches the real image, so it is drawn as
    that (see ``_hermitian_noise``), on the rfftn half of the spectrum. The official code adds
    real noise; after the real part both give the same expected perturbation energy.

    Random draws, in order: s (B,), d (B,), the real and imaginary parts of the complex noise,
    one :func:`medssl.noise.standard_normal_` tensor (B, C, *spatial[:-1], spatial[-1] // 2 + 1, 2)
    in rfftn layout.

    Returns the perturbed image (B, C, *spatial) in x's dtype.
    """
    spatial_dims = _check_spatial_dims(x, spatial_dims)
    spatial_shape = tuple(x.shape[-spatial_dims:])
    spectrum = _half_spectrum(_full_precision(x), spatial_dims)
    peak = _peak_magnitude(spectrum, spatial_dims)
    spectrum = _perturb_low_frequencies(spectrum, spatial_shape, peak, sigma_mean, sigma_std, radius_range, generator)
    return _real_image(spectrum, spatial_shape).to(x.dtype)


def frequency_corruption(
    x: torch.Tensor,
    patch_size: int | Sequence[int] = 16,
    ratio_range: Sequence[float] = (0.5, 0.75),
    protected_radius: float = 1.0,
    sigma_mean: float = 5e-4,
    sigma_std: float = 1e-4,
    radius_range: Sequence[float] = (0.15, 0.25),
    spatial_dims: int | None = None,
    generator: torch.Generator | None = None,
    keep_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frepa's frequency corruption: spectral patch masking, then low-frequency perturbation.

    Both act on one spectrum with a single FFT pair, as in the official code, so max|F| of the
    perturbation is that of the masked spectrum (before its Hermitian part is taken). Same
    arguments, draws (masking's first) and outputs as :func:`spectral_patch_mask` followed by
    :func:`low_frequency_perturbation`.
    """
    spatial_dims = _check_spatial_dims(x, spatial_dims)
    spatial_shape = tuple(x.shape[-spatial_dims:])
    spectrum = _half_spectrum(_full_precision(x), spatial_dims)
    weight, keep = _mask_spectral_patches(
        spectrum, spatial_shape, patch_size, ratio_range, protected_radius, generator, keep_mask
    )
    peak = _peak_magnitude(spectrum, spatial_dims, support=weight > 0)  # k or -k kept; |F(-k)| = |F(k)|
    corrupted = _perturb_low_frequencies(
        spectrum, spatial_shape, peak, sigma_mean, sigma_std, radius_range, generator, weight=weight
    )
    return _real_image(corrupted, spatial_shape).to(x.dtype), keep


def histogram_equalised_mask(
    x: torch.Tensor,
    patch_size: int | Sequence[int],
    ratio_range: Sequence[float] = (0.5, 0.75),
    spatial_dims: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frepa's image masking: replace random patches by noise with the patch's own statistics.

    The image is cut into patches of ``patch_size`` voxels (it must tile the image; official
    2D: 32 on 512). Per sample r ~ U(ratio_range); each patch is replaced with probability r,
    per channel, by Gaussian noise with that patch's mean and (population) std.

    Random draws, in order: r (B,), one uniform per patch (B, *grid), the noise (B, C, *spatial)
    (:func:`medssl.noise.standard_normal`).

    Returns:
        the corrupted image (B, C, *spatial), in x's dtype;
        the patch mask (B, *grid), bool, True where the patch was replaced.
    """
    spatial_dims = _check_spatial_dims(x, spatial_dims)
    spatial_shape = x.shape[-spatial_dims:]
    patch, grid = _patch_grid(spatial_shape, patch_size, "patch_size")
    batch_size, channels = x.shape[:2]
    ratio = _uniform(ratio_range, batch_size, x.device, generator, "ratio_range")
    draws = torch.rand(batch_size, *grid, device=x.device, generator=generator)
    replaced = draws < ratio.reshape(-1, *[1] * spatial_dims)  # (B, *grid)
    noise = standard_normal(x.shape, x.dtype, x.device, generator)

    # (B, C, g0, p0, g1, p1, ...): statistics per patch, broadcast over the p axes.
    blocks = x.reshape(batch_size, channels, *_interleave(grid, patch))
    per_patch = (batch_size, channels, *_interleave(grid, [1] * spatial_dims))
    # Mean, then the mean squared deviation from it, by average pooling with the patch as kernel
    # and stride: the same two-pass statistics as var_mean, a few times faster than var_mean over
    # the strided patch axes of ``blocks`` (bench/bench_ops.py).
    mean = _average_pool(_full_precision(x), patch).reshape(per_patch)
    deviation = blocks - mean
    var = _average_pool(deviation.reshape(x.shape).square_(), patch).reshape(per_patch)
    # The fill reuses the deviation's memory and the output the noise's: no new full-size tensor.
    fill = torch.addcmul(mean, var.sqrt_(), noise.reshape(blocks.shape), out=deviation)
    decision = replaced.reshape(batch_size, 1, *_interleave(grid, [1] * spatial_dims))
    return torch.where(decision, fill.to(x.dtype), blocks, out=noise.reshape(blocks.shape)).reshape(x.shape), replaced


def _average_pool(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Mean of every patch: (B, C, *spatial) -> (B, C, *grid), for 1 to 3 spatial axes."""
    pools = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
    if not 1 <= len(patch) <= len(pools):
        raise ValueError(f"patch statistics support 1 to 3 spatial axes, got {len(patch)}")
    return pools[len(patch) - 1](x, kernel_size=tuple(patch), stride=tuple(patch))

