"""Frepa: Frequency-advanced Representation Autoencoder (Chu et al., arXiv 2407.14651, TMI 2025).

Every sample is corrupted once, by histogram-equalised image masking (probability
``image_mask_probability``) or else by high-frequency spectral masking plus low-frequency
perturbation; a dense encoder-decoder restores the clean image under Frepa's loss (RMSE +
gradient L1 + multi-cut-off high-frequency L1). An embedding term ties together the encoder's
pooled embeddings of two frequency corruptions of the same scan, as a consistency loss or
adversarially against a small discriminator (:class:`AdversarialIteration`). Everything works for
2D and 3D images (``spatial_dims``); the encoder is any of ``medssl.encoders`` (ViT, Swin, CNN).

Also here, for the bundle's evaluation: :class:`MaskedImageModelling`, the plain masked-image-
modelling baseline with the same encoder, and :func:`restoration_fidelity`, which scores the
high-frequency fidelity of restorations.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Convolution
from monai.utils import CommonKeys, ensure_tuple_rep

from medssl.encoders import CNNEncoder, SwinEncoder, ViTEncoder, build_encoder
from medssl.frequency import (
    frequency_corruption,
    histogram_equalised_mask,
    low_frequency_perturbation,
    spectral_patch_mask,
)
from medssl.losses import FrepaLoss, masked_mse
from medssl.masking import block_masking, patchify, unpatchify
from medssl.metrics import high_band_energy_ratio, highpass_psnr, psnr

__all__ = [
    "FrepaCorruption",
    "ConvDecoder",
    "feature_geometry",
    "dense_features",
    "FrepaNetwork",
    "FrepaDiscriminator",
    "consistency_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "AdversarialIteration",
    "loss_terms",
    "MaskedImageModelling",
    "log_spectrum",
    "load_weights",
    "restoration_fidelity",
    "fidelity_table",
    "save_fidelity",
]

EMBEDDING_LOSSES = ("consistency", "adversarial", "none")


def _per_sample(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``like``."""
    return flags.reshape(-1, *[1] * (like.ndim - 1))


def _patch_size(spatial_shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """Patch edge per axis that cuts spatial_shape into grid patches (it must divide exactly)."""
    if any(n % g for n, g in zip(spatial_shape, grid)):
        raise ValueError(
            f"image size {tuple(spatial_shape)} cannot be cut into a {tuple(grid)} patch grid; "
            "crop the input to a multiple of the grid or change image_mask_grid / spectral_mask_grid"
        )
    return tuple(n // g for n, g in zip(spatial_shape, grid))


class FrepaCorruption(nn.Module):
    """Frepa's input corruptions, one per sample, drawn with batched ops on the image's device.

    Patch sizes follow from the image size and a fixed number of patches per axis, the official
    2D geometry at any size: image masking on a 16-per-axis grid (32 px patches on 512) and
    spectral masking on a 32-per-axis grid (16-coefficient patches on 512).

    Args:
        spatial_dims: 2 or 3.
        image_mask_probability: probability that a sample gets image masking instead of the
            frequency corruption.
        image_mask_grid: patches per axis of histogram-equalised image masking.
        image_mask_ratio: range of the per-sample image masking ratio.
        spectral_mask_grid: patches per axis of the centred spectrum.
        spectral_mask_ratio: range of the per-sample spectral masking ratio.
        protected_radius: low-frequency core never masked, in spectral patches (see
            ``medssl.frequency.spectral_patch_mask``).
        perturbation_sigma: mean and std of s in the low-frequency noise std s * max|F|.
        perturbation_radius: range of the relative radius d of the low-frequency noise window.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        image_mask_probability: float = 0.5,
        image_mask_grid: int | Sequence[int] = 16,
        image_mask_ratio: Sequence[float] = (0.5, 0.75),
        spectral_mask_grid: int | Sequence[int] = 32,
        spectral_mask_ratio: Sequence[float] = (0.5, 0.75),
        protected_radius: float = 1.0,
        perturbation_sigma: Sequence[float] = (5e-4, 1e-4),
        perturbation_radius: Sequence[float] = (0.15, 0.25),
    ) -> None:
        super().__init__()
        if not 0.0 <= image_mask_probability <= 1.0:
            raise ValueError(f"image_mask_probability must be in [0, 1], got {image_mask_probability}")
        self.spatial_dims = spatial_dims
        self.image_mask_probability = image_mask_probability
        self.image_mask_grid = ensure_tuple_rep(image_mask_grid, spatial_dims)
        self.image_mask_ratio = tuple(image_mask_ratio)
        self.spectral_mask_grid = ensure_tuple_rep(spectral_mask_grid, spatial_dims)
        self.spectral_mask_ratio = tuple(spectral_mask_ratio)
        self.protected_radius = protected_radius
        self.sigma_mean, self.sigma_std = perturbation_sigma
        self.perturbation_radius = tuple(perturbation_radius)

    def image_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Histogram-equalised image masking of every sample: (B, C, *spatial) -> same."""
        patch = _patch_size(x.shape[2:], self.image_mask_grid)
        return histogram_equalised_mask(x, patch, self.image_mask_ratio, self.spatial_dims, generator)[0]

    def _spectral_patch(self, x: torch.Tensor) -> tuple[int, ...]:
        return _patch_size(x.shape[2:], self.spectral_mask_grid)

    def frequency(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """High-frequency spectral masking then low-frequency perturbation of every sample."""
        return frequency_corruption(
            x,
            self._spectral_patch(x),
            self.spectral_mask_ratio,
            self.protected_radius,
            self.sigma_mean,
            self.sigma_std,
            self.perturbation_radius,
            self.spatial_dims,
            generator,
            keep_mask=False,
        )[0]

    def views(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two frequency corruptions whose embeddings the embedding term ties together.

        Returns (high-frequency masked, low-frequency perturbed), each (B, C, *spatial). In the
        first most of the fine detail is destroyed, the second keeps it under a smooth intensity
        shift, so matching their embeddings asks the encoder to infer the lost high frequencies.
        """
        masked = spectral_patch_mask(
            x, self._spectral_patch(x), self.spectral_mask_ratio, self.protected_radius, self.spatial_dims, generator,
            keep_mask=False,
        )[0]
        perturbed = low_frequency_perturbation(
            x, self.sigma_mean, self.sigma_std, self.perturbation_radius, self.spatial_dims, generator
        )
        return masked, perturbed

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt every sample of (B, C, *spatial) once.

        Each sample gets image masking with probability ``image_mask_probability`` (p), and each
        corruption runs only on the samples that get it: a random permutation of the batch gives
        its first floor(pB) samples image masking and the rest the frequency corruption, except
        the sample at position floor(pB), which, when pB is not whole, gets image masking with
        probability pB - floor(pB) (both corruptions are computed for it alone). So a batch holds
        floor(pB) or ceil(pB) image-masked samples, no count depends on the data, and nothing
        waits for the device.

        Random draws, in order: the permutation (B,), the leftover choice (1,) when pB is not
        whole, then the image masking's draws for its samples (in permutation order), then the
        frequency corruption's for its samples.

        Returns the corrupted images (B, C, *spatial) and (B,) bool, True where image masking was used.
        """
        batch_size, device = x.shape[0], x.device
        order = torch.randperm(batch_size, device=device, generator=generator)
        expected = self.image_mask_probability * batch_size
        image_count = math.floor(expected)
        undecided = expected > image_count
        if undecided:
            leftover = torch.rand(1, device=device, generator=generator) < expected - image_count
        image_rows, frequency_rows = order[: image_count + undecided], order[image_count:]

        corrupted = torch.empty_like(x)
        used_image_mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
        if len(image_rows):
            image_masked = self.image_mask(x.index_select(0, image_rows), generator)
            corrupted.index_copy_(0, image_rows, image_masked)
            used_image_mask.index_fill_(0, image_rows, True)
        if len(frequency_rows):
            frequency_corrupted = self.frequency(x.index_select(0, frequency_rows), generator)
            corrupted.index_copy_(0, frequency_rows, frequency_corrupted)
        if undecided:
            row = order[image_count : image_count + 1]
            chosen = torch.where(_per_sample(leftover, x[:1]), image_masked[-1:], frequency_corrupted[:1])
            corrupted.index_copy_(0, row, chosen)
            used_image_mask.index_copy_(0, row, leftover)
        return corrupted, used_image_mask


def feature_geometry(encoder: nn.Module, feature_index: int = -1) -> tuple[int, int]:
    """(channels, stride) of the dense feature map :func:`dense_features` takes from ``encoder``."""
    if isinstance(encoder, ViTEncoder):
        channels, strides = encoder.hidden_size, tuple(encoder.patch_size)
    elif isinstance(encoder, SwinEncoder):
        level = range(5)[feature_index]
        channels, strides = encoder.feature_size * 2**level, (2 ** (level + 1),)
    elif isinstance(encoder, CNNEncoder):
        level = range(4)[feature_index]
        channels, strides = encoder.feature_size * 2**level, (2**level,)
    else:
        raise TypeError(f"unsupported encoder {type(encoder).__name__}; build it with medssl.encoders.build_encoder")
    if len(set(strides)) != 1 or strides[0] & (strides[0] - 1):
        raise ValueError(f"the decoder needs one power-of-two stride for every axis, got {strides}")
    return channels, strides[0]


def dense_features(encoder: nn.Module, x: torch.Tensor, feature_index: int = -1) -> torch.Tensor:
    """One dense feature map of any ``medssl.encoders`` encoder: (B, C, *spatial) -> (B, channels, *spatial / stride).

    ViT: the normed tokens of all patches (no masking) laid back onto the patch grid; Swin and
    CNN: their feature map number ``feature_index`` (Swin: 0..4, strides 2..32; CNN: 0..3,
    strides 1..8).
    """
    if isinstance(encoder, ViTEncoder):
        tokens, _ = encoder(x)  # (B, N, D), raster order of the patch grid
        return tokens.transpose(1, 2).reshape(x.shape[0], encoder.hidden_size, *encoder.grid_shape)
    return encoder(x)[feature_index]


class ConvDecoder(nn.Sequential):
    """Convolutional decoder: ``num_blocks`` x (upsample x2, 2 x conv-norm-act, halve the channels), 1x1 conv out.

    (B, in_channels, *grid) -> (B, out_channels, *grid * 2**num_blocks). Channels never drop
    below ``min_channels``; the output layer starts at zero.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 1,
        num_blocks: int = 4,
        min_channels: int = 8,
        norm: str | tuple = "instance",
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
    ) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial_dims]
        for _ in range(num_blocks):
            halved = max(channels // 2, min_channels)
            layers += [
                nn.Upsample(scale_factor=2, mode=interp, align_corners=False),
                Convolution(spatial_dims, channels, halved, kernel_size=3, norm=norm, act=act),
                Convolution(spatial_dims, halved, halved, kernel_size=3, norm=norm, act=act),
            ]
            channels = halved
        head = Convolution(spatial_dims, channels, out_channels, kernel_size=1, conv_only=True)
        # A zero output layer starts from a flat image: with a random one the first hundreds of
        # steps go into removing a random intensity offset (Adam moves each weight ~lr per step).
        nn.init.zeros_(head.conv.weight)
        nn.init.zeros_(head.conv.bias)
        super().__init__(*layers, head)


def _pooled_embedding(features: torch.Tensor) -> torch.Tensor:
    """Global average pool, standardised per sample: (B, C, *grid) -> (B, C).

    Standardising keeps the embedding term from being lowered by merely shrinking the features.
    """
    pooled = features.flatten(2).mean(-1)
    return F.layer_norm(pooled, pooled.shape[-1:])


def consistency_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Symmetric stop-gradient MSE: (MSE(first, sg(second)) + MSE(sg(first), second)) / 2."""
    return 0.5 * (F.mse_loss(first, second.detach()) + F.mse_loss(first.detach(), second))


def log_spectrum(x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """log(1 + |centred spectrum|) of (B, C, *spatial), divided per sample by the reference's maximum.

    With the clean image as reference, spectra of its corruptions and restorations share one
    scale in [0, ~1] and can be drawn side by side.
    """
    axes = tuple(range(2, x.ndim))

    def magnitude(image: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.fft.fftshift(torch.fft.fftn(image.float(), dim=axes), dim=axes).abs())

    spectrum = magnitude(x)
    scale = magnitude(reference if reference is not None else x).flatten(1).amax(1)
    return spectrum / _per_sample(scale, spectrum)


class FrepaNetwork(nn.Module):
    """Frepa's pretraining network: corrupt, encode densely, decode, restore the clean image.

    Args:
        encoder_kind: "vit", "swin" or "cnn" (``medssl.encoders.build_encoder``).
        encoder_size: "tiny", "small", "base" (vit also "large").
        img_size: training crop size (fixes the ViT's position embedding).
        in_channels: image channels.
        spatial_dims: 2 or 3.
        encoder_args: overrides of the encoder size preset.
        feature_index: which Swin / CNN feature map feeds the decoder (default the deepest).
        decoder_channels: width after the 1x1 neck; each decoder block halves it.
        min_decoder_channels: narrowest decoder block.
        corruption: the input corruption (default: the official parameters).
        loss: the restoration loss (default: ``medssl.losses.FrepaLoss`` with official weights).
        embedding_loss: "consistency" (symmetric stop-gradient MSE inside the loss),
            "adversarial" (the network returns both embeddings; :class:`AdversarialIteration`
            adds the discriminator game) or "none".
        embedding_weight: weight of the consistency term (the adversarial weight is the
            iteration's).

    ``forward(image, generator=None)`` takes the clean (B, C, *img_size) image and returns a dict:
    "loss" (scalar to minimise), "reconstruction_loss", "restored" and "corrupted" (B, C,
    *img_size), "image_masked" (B,) bool, and "embedding_loss" (consistency) or
    "embedding_masked" / "embedding_perturbed" (B, embedding_channels) (adversarial).
    ``embedding_channels`` is the width of the pooled embedding (what a discriminator takes).
    """

    def __init__(
        self,
        encoder_kind: str = "vit",
        encoder_size: str = "base",
        img_size: Sequence[int] | int = 96,
        in_channels: int = 1,
        spatial_dims: int = 3,
        encoder_args: Mapping[str, Any] | None = None,
        feature_index: int = -1,
        decoder_channels: int = 256,
        min_decoder_channels: int = 8,
        corruption: FrepaCorruption | None = None,
        loss: nn.Module | None = None,
        embedding_loss: str = "consistency",
        embedding_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if embedding_loss not in EMBEDDING_LOSSES:
            raise ValueError(f"embedding_loss must be one of {EMBEDDING_LOSSES}, got {embedding_loss!r}")
        self.encoder = build_encoder(
            encoder_kind, encoder_size, img_size, in_channels, spatial_dims, **dict(encoder_args or {})
        )
        self.feature_index = feature_index
        channels, stride = feature_geometry(self.encoder, feature_index)
        self.embedding_channels = channels
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.neck = conv(channels, decoder_channels, kernel_size=1)
        self.decoder = ConvDecoder(
            spatial_dims, decoder_channels, in_channels, int(math.log2(stride)), min_decoder_channels
        )
        self.corruption = corruption if corruption is not None else FrepaCorruption(spatial_dims)
        self.loss = loss if loss is not None else FrepaLoss(spatial_dims=spatial_dims)
        self.embedding_loss = embedding_loss
        self.embedding_weight = embedding_weight

    def restore(self, corrupted: torch.Tensor) -> torch.Tensor:
        """(B, C, *img_size) corrupted image -> (B, C, *img_size) restoration."""
        return self.decoder(self.neck(dense_features(self.encoder, corrupted, self.feature_index)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised pooled encoder embedding: (B, C, *img_size) -> (B, channels)."""
        return _pooled_embedding(dense_features(self.encoder, x, self.feature_index))

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        corrupted, image_masked = self.corruption(image, generator)
        restored = self.restore(corrupted)
        reconstruction_loss = self.loss(restored.float(), image.float())
        output = {
            "loss": reconstruction_loss,
            "reconstruction_loss": reconstruction_loss.detach(),
            "restored": restored,
            "corrupted": corrupted,
            "image_masked": image_masked,
        }
        if self.embedding_loss == "none":
            return output
        # One encoder pass for both views: (2B, C, *img_size).
        embeddings = self.embed(torch.cat(self.corruption.views(image, generator))).float()
        masked, perturbed = embeddings.chunk(2)
        if self.embedding_loss == "consistency":
            term = consistency_loss(masked, perturbed)
            output["loss"] = reconstruction_loss + self.embedding_weight * term
            output["embedding_loss"] = term.detach()
        else:
            output["embedding_masked"], output["embedding_perturbed"] = masked, perturbed
        return output

    @torch.no_grad()
    def corrupt_and_restore(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each corruption applied to the whole batch and its restoration: kind -> (corrupted, restored)."""
        image_masked = self.corruption.image_mask(image, generator)
        frequency_corrupted = self.corruption.frequency(image, generator)
        return {
            "image masking": (image_masked, self.restore(image_masked)),
            "frequency corruption": (frequency_corrupted, self.restore(frequency_corrupted)),
        }

    @torch.no_grad()
    def figure_panels(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Clean, corrupted and restored images, then log-magnitude spectra of the frequency path."""
        results = self.corrupt_and_restore(image, generator)
        image_masked, image_restored = results["image masking"]
        frequency_corrupted, frequency_restored = results["frequency corruption"]
        return {
            "clean": image,
            "image-masked": image_masked,
            "restored (image)": image_restored,
            "freq-corrupted": frequency_corrupted,
            "restored (freq)": frequency_restored,
            "|F| clean": log_spectrum(image),
            "|F| freq-corrupted": log_spectrum(frequency_corrupted, image),
            "|F| restored (freq)": log_spectrum(frequency_restored, image),
        }


class FrepaDiscriminator(nn.Sequential):
    """Small MLP that scores a pooled embedding (B, in_features) -> logits (B,).

    High logits mean "embedding of a low-frequency-perturbed view" (detail present), low ones
    "of a high-frequency-masked view".
    """

    def __init__(self, in_features: int, hidden_features: int = 256, negative_slope: float = 0.2) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_features),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden_features, hidden_features),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden_features, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x).squeeze(-1)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Mean of BCE(D(real), 1) and BCE(D(fake), 0), on logits (one forward: DistributedDataParallel-safe)."""
    real_logits, fake_logits = discriminator(torch.cat([real, fake])).split([real.shape[0], fake.shape[0]])
    return 0.5 * (
        F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    )


def generator_adversarial_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss BCE(D(fake), 1): the encoder makes fakes look real."""
    logits = discriminator(fake)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


class AdversarialIteration:
    """Alternating discriminator / generator iteration for MONAI's SupervisedTrainer (``iteration_update``).

    Per batch, with the network's "adversarial" embedding form: one forward of the Frepa
    network; ``discriminator_steps`` updates of the discriminator on the detached embeddings
    (real: low-frequency-perturbed view, fake: high-frequency-masked view); then one update of
    the network on its restoration loss + ``weight`` x the non-saturating generator loss against
    the just-updated discriminator. The trainer's optimizer, AMP scaler, events
    (FORWARD/LOSS/BACKWARD/MODEL_COMPLETED, so gradient clipping and the non-finite-loss stop
    work unchanged) and handlers are used as in SupervisedTrainer. The output dict adds
    "discriminator_loss" and "adversarial_loss" (scalars, detached) for logging.

    Args:
        discriminator: e.g. :class:`FrepaDiscriminator`, on the trainer's device.
        optimizer: the discriminator's optimizer.
        weight: weight of the generator's adversarial loss.
        discriminator_steps: discriminator updates per batch.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        weight: float = 0.1,
        discriminator_steps: int = 1,
    ) -> None:
        self.discriminator = discriminator
        self.optimizer = optimizer
        self.weight = weight
        self.discriminator_steps = discriminator_steps

    def __call__(self, engine, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("AdversarialIteration got no batch: check the training data loader")
        inputs = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[0]
        engine.state.output = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: None}
        network = engine.network
        network.train()
        self.discriminator.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(inputs.device.type, enabled=bool(engine.amp), **engine.amp_kwargs):
            prediction = engine.inferer(inputs, network)
        if "embedding_masked" not in prediction:
            raise ValueError(
                "AdversarialIteration needs the network's embeddings: set network_def#embedding_loss to 'adversarial'"
            )
        engine.state.output[CommonKeys.PRED] = prediction
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        fake, real = prediction["embedding_masked"], prediction["embedding_perturbed"]

        for _ in range(self.discriminator_steps):
            self.optimizer.zero_grad(set_to_none=True)
            d_loss = discriminator_loss(self.discriminator, real.detach(), fake.detach())
            d_loss.backward()
            self.optimizer.step()

        # The generator's gradient flows through the discriminator without touching its weights;
        # the bare module (not a DistributedDataParallel wrapper) since no weight gradient is reduced.
        critic = getattr(self.discriminator, "module", self.discriminator)
        critic.requires_grad_(False)
        g_loss = generator_adversarial_loss(critic, fake)
        critic.requires_grad_(True)
        loss = prediction["loss"] + self.weight * g_loss
        engine.state.output.update(
            {CommonKeys.LOSS: loss, "discriminator_loss": d_loss.detach(), "adversarial_loss": g_loss.detach()}
        )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def loss_terms(output: dict) -> dict[str, torch.Tensor]:
    """The scalar losses of a trainer iteration's output, for StatsHandler / TensorBoardStatsHandler.

    "loss" (what was minimised), the network's "reconstruction_loss" and "embedding_loss" where
    present, and the adversarial iteration's "discriminator_loss" and "adversarial_loss".
    """
    terms = {"loss": output[CommonKeys.LOSS]}
    prediction = output.get(CommonKeys.PRED) or {}
    for key in ("reconstruction_loss", "embedding_loss"):
        if key in prediction:
            terms[key] = prediction[key]
    for key in ("discriminator_loss", "adversarial_loss"):
        if key in output:
            terms[key] = output[key]
    return terms


class MaskedImageModelling(nn.Module):
    """The plain masked-image-modelling baseline of Frepa's evaluation, with the same encoder.

    Random blocks of ``mask_patch_size`` voxels are zeroed in the input (ratio ``mask_ratio``),
    the encoder runs densely on the whole image, and a linear patch decoder (a 1x1 convolution
    from every feature-map cell to its stride^dims voxels) predicts the image; the loss is the
    MSE over masked voxels (SimMIM's form of MAE, which works with a linear decoder for ViT,
    Swin and CNN alike).

    ``forward(image, generator=None)`` returns {"loss", "reconstruction_loss" (the same, detached),
    "restored" (B, C, *img_size), "corrupted"}.
    """

    def __init__(
        self,
        encoder_kind: str = "vit",
        encoder_size: str = "base",
        img_size: Sequence[int] | int = 96,
        in_channels: int = 1,
        spatial_dims: int = 3,
        encoder_args: Mapping[str, Any] | None = None,
        feature_index: int = -1,
        mask_ratio: float = 0.75,
        mask_patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(
            encoder_kind, encoder_size, img_size, in_channels, spatial_dims, **dict(encoder_args or {})
        )
        self.feature_index = feature_index
        channels, self.stride = feature_geometry(self.encoder, feature_index)
        self.embedding_channels = channels
        self.mask_patch_size = mask_patch_size or self.stride
        if self.mask_patch_size % self.stride:
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be a multiple of the encoder stride {self.stride}"
            )
        self.mask_ratio = mask_ratio
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.head = conv(channels, self.stride**spatial_dims * in_channels, kernel_size=1)
        nn.init.zeros_(self.head.weight)  # a flat start, as Frepa's decoder output layer
        nn.init.zeros_(self.head.bias)

    def mask(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, N) float token mask on the stride grid, 1 = masked, in blocks of mask_patch_size."""
        grid = [n // self.stride for n in image.shape[2:]]
        block = self.mask_patch_size // self.stride
        return block_masking(image.shape[0], grid, self.mask_ratio, block, image.device, generator).mask

    def predict(self, corrupted: torch.Tensor) -> torch.Tensor:
        """(B, C, *img_size) -> predicted patches (B, N, stride^dims * C) in raster order."""
        return self.head(dense_features(self.encoder, corrupted, self.feature_index)).flatten(2).transpose(1, 2)

    def _apply_mask(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        patches = patchify(image, self.stride) * (1.0 - mask).unsqueeze(-1).to(image.dtype)
        return unpatchify(patches, self.stride, image.shape[2:], self.in_channels)

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        mask = self.mask(image, generator)
        corrupted = self._apply_mask(image, mask)
        prediction = self.predict(corrupted)
        loss = masked_mse(prediction.float(), patchify(image, self.stride).float(), mask)
        restored = unpatchify(prediction, self.stride, image.shape[2:], self.in_channels)
        return {"loss": loss, "reconstruction_loss": loss.detach(), "restored": restored, "corrupted": corrupted}

    @torch.no_grad()
    def corrupt_and_restore(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (corrupted, restored): the raw prediction, and with the visible patches pasted back."""
        mask = self.mask(image, generator)
        corrupted = self._apply_mask(image, mask)
        prediction = self.predict(corrupted)
        keep = (1.0 - mask).unsqueeze(-1)
        pasted = prediction * (1.0 - keep) + patchify(image, self.stride) * keep
        shape = image.shape[2:]
        return {
            "patch masking": (corrupted, unpatchify(prediction, self.stride, shape, self.in_channels)),
            "patch masking, visible pasted": (corrupted, unpatchify(pasted, self.stride, shape, self.in_channels)),
        }

    @torch.no_grad()
    def figure_panels(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        corrupted, restored = self.corrupt_and_restore(image, generator)["patch masking"]
        return {"clean": image, "masked": corrupted, "restored": restored}


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a flat state dict (a bundle's models/model.pt) into network, every key required; returns network."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no weights at {path}: train that network first (configs/train.json, or configs/train_baseline.json "
            "for the masked-image-modelling baseline) or point the evaluation at its checkpoint"
        )
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network


@torch.no_grad()
def restoration_fidelity(
    networks: Mapping[str, nn.Module],
    data: Iterable,
    cutoffs: Sequence[float] = (64.0, 128.0),
    device: torch.device | str = "cpu",
    seed: int = 0,
    image_key: str = "image",
) -> list[dict[str, Any]]:
    """High-frequency fidelity of each network's restorations of held-out scans.

    Every network's ``corrupt_and_restore`` is run on every batch of ``data`` (dicts with
    ``image_key``) with the same seeded generator per network. Per (network, corruption) row,
    means over crops of: the high-band energy ratio restored / clean above each cut-off (1 =
    detail kept, < 1 = smoother; frequency units at 512, see ``medssl.frequency``), the same for
    the corrupted input, the PSNR of the Gaussian high-passed restoration at each cut-off and
    the plain PSNR (intensities in [0, 1]).
    """
    rows: list[dict[str, Any]] = []
    device = torch.device(device)
    for name, network in networks.items():
        network.eval().to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        sums: dict[str, dict[str, torch.Tensor]] = {}
        count = 0
        for batch in data:
            image = torch.as_tensor(batch[image_key]).float().to(device)
            for kind, (corrupted, restored) in network.corrupt_and_restore(image, generator).items():
                restored = restored.float()
                values = {"psnr": psnr(restored, image)}
                for cutoff in cutoffs:
                    values[f"energy_ratio@{cutoff:g}"] = high_band_energy_ratio(restored, image, cutoff)
                    values[f"input_energy_ratio@{cutoff:g}"] = high_band_energy_ratio(corrupted.float(), image, cutoff)
                    values[f"highpass_psnr@{cutoff:g}"] = highpass_psnr(restored, image, cutoff)
                row = sums.setdefault(kind, {})
                for key, value in values.items():
                    row[key] = row.get(key, 0.0) + value.sum()
            count += image.shape[0]
        if count == 0:
            raise ValueError("restoration_fidelity got no images: check the evaluation datalist")
        for kind, row in sums.items():
            rows.append(
                {"network": name, "corruption": kind, "crops": count} | {k: float(v) / count for k, v in row.items()}
            )
    return rows


def fidelity_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`restoration_fidelity` rows."""
    columns = [key for key in rows[0] if key not in ("network", "corruption", "crops")]
    lines = [
        "| network | corruption | crops | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [f"{row[key]:.3f}" if "ratio" in key else f"{row[key]:.2f}" for key in columns]
        lines.append(f"| {row['network']} | {row['corruption']} | {row['crops']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_fidelity(rows: Sequence[Mapping[str, Any]], folder: str | os.PathLike, command: str = "") -> Path:
    """Write rows to ``folder/fidelity.json`` and a Markdown table (with the command) to ``fidelity.md``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fidelity.json").write_text(json.dumps(list(rows), indent=2))
    text = fidelity_table(rows) + "\n"
    if command:
        text = f"`{command}`\n\n" + text
    (folder / "fidelity.md").write_text(text)
    return folder / "fidelity.md"
