"""MAESIL: a 3D masked autoencoder on CT superpatches with a dual (plane + depth) mask.

Kim et al., "MAESIL: Masked Autoencoder for Enhanced Self-supervised Medical Image Learning",
arXiv 2604.00514. A superpatch (128^3 voxels by default) is tokenised densely into 8^3 patches
(16^3 = 4096 tokens); the dual mask removes whole tubes along the depth axis and then random
depth positions inside the kept tubes (0.75 of the tokens at the default 0.5 / 0.5); a ViT
encodes the visible tokens only and a light transformer decoder predicts the voxels of every
token; the loss is the MSE on the masked tokens.

The encoder is the shared :class:`medssl.encoders.ViTEncoder` (attribute ``encoder``), so its
weights travel as ``encoder.*`` in ``models/model.pt``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.utils import ensure_tuple_rep

from medssl.encoders import build_encoder, freeze_unused_cross_attention_norms
from medssl.losses import masked_mse
from medssl.masking import TokenMask, dual_masking, patchify, scatter_tokens, unpatchify

__all__ = ["MAESILDecoder", "MAESIL"]


class MAESILDecoder(nn.Module):
    """MAE decoder: mask tokens, fixed sin-cos position embedding, pre-norm blocks, voxel head.

    Args:
        encoder_hidden_size: width of the encoder tokens it receives.
        grid_shape: token grid of a superpatch, e.g. (16, 16, 16).
        patch_voxels: voxels per token times channels (the head's output width).
        hidden_size: decoder width (divisible by 6 for the 3D sin-cos embedding).
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP width as a multiple of hidden_size.
    """

    def __init__(
        self,
        encoder_hidden_size: int,
        grid_shape: Sequence[int],
        patch_voxels: int,
        hidden_size: int = 384,
        num_layers: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_hidden_size, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(hidden_size))
        nn.init.normal_(self.mask_token, std=0.02)
        self.position_embedding = build_sincos_position_embedding(list(grid_shape), hidden_size, len(grid_shape))
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, int(hidden_size * mlp_ratio), num_heads, qkv_bias=True, use_flash_attention=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, patch_voxels)
        freeze_unused_cross_attention_norms(self)  # else DistributedDataParallel reports unused parameters

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """latent (B, K, encoder width) visible tokens; ids_restore (B, N) from the mask, or None
        when every token is visible. Returns the voxels of all N tokens, (B, N, patch_voxels)."""
        tokens = self.embed(latent)
        if ids_restore is not None:
            tokens = scatter_tokens(tokens, ids_restore, self.mask_token)  # (B, N, hidden)
        tokens = tokens + self.position_embedding.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens))


class MAESIL(nn.Module):
    """MAESIL pretraining network on superpatches.

    ``forward(image, valid=None, generator=None)`` takes (B, C, *superpatch_size) superpatches
    (and optionally their (B, 1, *superpatch_size) valid mask, 0 on padding, which the loss then
    leaves out) and returns ``{"loss": scalar, "pred": (B, N, p^3 * C) predicted voxels of every
    token, "mask": (B, N) 1 on masked tokens}``. Masking is drawn from ``generator`` when given.

    Args:
        in_channels: image channels.
        superpatch_size: superpatch edge lengths (divisible by patch_size).
        patch_size: token edge length in voxels (8 in the paper).
        encoder_size: preset of :func:`medssl.encoders.build_encoder` ("tiny", "small", "base", "large").
        encoder_layers: encoder depth; None keeps the preset's.
        encoder_heads: encoder attention heads; None keeps the preset's.
        decoder_hidden_size: decoder width (divisible by 6 for the 3D sin-cos embedding).
        decoder_layers: decoder blocks.
        decoder_heads: decoder attention heads.
        plane_mask_ratio: fraction of in-plane positions masked as whole depth tubes.
        depth_mask_ratio: fraction of the kept positions masked inside each depth slab.
        norm_pix_loss: regress each token's voxels normalised by their own mean and variance.
    """

    def __init__(
        self,
        in_channels: int = 1,
        superpatch_size: Sequence[int] | int = 128,
        patch_size: int = 8,
        encoder_size: str = "base",
        encoder_layers: int | None = 6,
        encoder_heads: int | None = 8,
        decoder_hidden_size: int = 384,
        decoder_layers: int = 3,
        decoder_heads: int = 8,
        plane_mask_ratio: float = 0.5,
        depth_mask_ratio: float = 0.5,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        self.superpatch_size = ensure_tuple_rep(superpatch_size, 3)
        if any(s % patch_size for s in self.superpatch_size):
            raise ValueError(f"superpatch_size {self.superpatch_size} must be divisible by patch_size {patch_size}")
        overrides = {"patch_size": patch_size}
        if encoder_layers is not None:
            overrides["num_layers"] = encoder_layers
        if encoder_heads is not None:
            overrides["num_heads"] = encoder_heads
        self.encoder = build_encoder("vit", encoder_size, img_size=self.superpatch_size, in_channels=in_channels, **overrides)
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid_shape = self.encoder.grid_shape
        self.decoder = MAESILDecoder(
            self.encoder.hidden_size,
            self.grid_shape,
            patch_size**3 * in_channels,
            hidden_size=decoder_hidden_size,
            num_layers=decoder_layers,
            num_heads=decoder_heads,
        )
        self.plane_mask_ratio = plane_mask_ratio
        self.depth_mask_ratio = depth_mask_ratio
        self.norm_pix_loss = norm_pix_loss

    def _check(self, image: torch.Tensor) -> None:
        if tuple(image.shape[1:]) != (self.in_channels, *self.superpatch_size):
            raise ValueError(
                f"MAESIL takes (B, {self.in_channels}, *{self.superpatch_size}) superpatches, got {tuple(image.shape)}: "
                "crop with medssl.superpatch.RandSuperpatchCropd or cut volumes with medssl.superpatch.partition"
            )

    def draw_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> TokenMask:
        """The dual mask for a batch (depth = last spatial axis)."""
        return dual_masking(
            batch_size, self.grid_shape, self.plane_mask_ratio, self.depth_mask_ratio, device=device, generator=generator
        )

    def forward(
        self, image: torch.Tensor, valid: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        self._check(image)
        mask = self.draw_mask(image.shape[0], image.device, generator)
        latent, _ = self.encoder(image, mask.ids_keep)  # (B, K, width)
        pred = self.decoder(latent, mask.ids_restore)  # (B, N, p^3 * C)
        target = patchify(image, self.patch_size)
        valid_patches = None if valid is None else patchify(valid.expand_as(image), self.patch_size) > 0
        # float32: under float16 autocast the sum over ~10^6 squared errors would overflow
        loss = masked_mse(pred.float(), target.float(), mask.mask, norm_pix=self.norm_pix_loss, valid=valid_patches)
        return {"loss": loss, "pred": pred, "mask": mask.mask}

    def _to_voxels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Undo the norm-pixel target with the statistics of the input patches (identity otherwise)."""
        if not self.norm_pix_loss:
            return pred
        mean = target.mean(-1, keepdim=True)
        std = torch.sqrt(target.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return pred * std + mean

    def _masked_reconstruction(
        self, image: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, p^3 * C) with the masked ones predicted and the visible ones copied from
        the input, and the mask (B, N, 1)."""
        out = self.forward(image, generator=generator)
        target = patchify(image, self.patch_size)
        mask = out["mask"].unsqueeze(-1)
        return self._to_voxels(out["pred"], target) * mask + target * (1 - mask), mask

    def reconstruct(
        self, image: torch.Tensor, masked: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruct superpatches for evaluation: (B, C, *S) -> (B, C, *S).

        Unmasked (default): every token visible, pure autoencoding. ``masked``: the dual mask is
        drawn (from ``generator``), the masked tokens are predicted and the visible ones copied
        from the input, as in MAE's reconstruction figures. With ``norm_pix_loss`` each token's
        mean and variance come from the input.
        """
        self._check(image)
        if masked:
            tokens, _ = self._masked_reconstruction(image, generator)
        else:
            latent, _ = self.encoder(image)
            tokens = self._to_voxels(self.decoder(latent), patchify(image, self.patch_size))
        return unpatchify(tokens, self.patch_size, self.superpatch_size, self.in_channels)

    def figure_panels(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Input, dual-masked input (masked tokens zeroed) and its reconstruction (visible tokens
        copied from the input), each (B, C, *S)."""
        self._check(image)
        tokens, mask = self._masked_reconstruction(image, generator)
        masked_input = patchify(image, self.patch_size) * (1 - mask)
        return {
            "input": image,
            "masked input": unpatchify(masked_input, self.patch_size, self.superpatch_size, self.in_channels),
            "reconstruction": unpatchify(tokens, self.patch_size, self.superpatch_size, self.in_channels),
        }
