"""Hi-End-MAE: hierarchical encoder-driven masked autoencoder (Tang et al., MedIA 2025).

The encoder is the shared ViT run on the visible tokens only. The decoder first lets
[visible ; mask] tokens attend to each other (2 self-attention blocks), then cross-attends, deep
to shallow, to the visible-token features tapped after encoder blocks 10, 7 and 4 (0-indexed
hidden states 9, 6, 3), so that every encoder depth gets a direct reconstruction signal. The
loss is the MSE on masked patches of the per-patch normalised input; the prediction head and the
last decoder block's queries, cross-attention and MLP run on the masked tokens only, since the
loss reads nothing else (MAE runs its head on all tokens).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

from medssl.encoders import (
    build_encoder,
    freeze_unused_cross_attention_norms,
    init_transformer_weights,
    transformer_block_rows,
)
from medssl.losses import patch_normalise
from medssl.masking import (
    TokenMask,
    gather_tokens,
    masked_token_ids,
    patchify,
    random_masking,
    scatter_tokens,
    unpatchify,
)

__all__ = ["HiEndMAE"]


class HiEndMAE(nn.Module):
    """Hi-End-MAE pretraining network.

    Args:
        in_channels: image channels.
        img_size: crop size the network is built for (96 in the paper).
        encoder_size: shared ViT preset ("tiny", "small", "base", "large").
        patch_size: overrides the preset's patch size when given.
        mask_ratio: fraction of tokens hidden from the encoder.
        decoder_hidden_size: decoder width (384 for base, 528 for large).
        decoder_num_heads: decoder attention heads.
        num_self_attention_blocks: decoder self-attention blocks before the cross-attention ones.
        tap_blocks: 0-indexed encoder hidden states the cross-attention blocks read, shallow to
            deep; they are used deep to shallow.
        norm_pix_loss: normalise each target patch by its own mean and variance.
        spatial_dims: 2 or 3.

    ``forward(image)`` takes (B, C, *img_size) and returns {"loss": scalar, "pred": (B, N, P),
    "mask": (B, N)}, P = prod(patch) * C, mask 1 where a token was hidden; "pred" holds the
    predictions of the masked tokens and 0 at visible ones (the head never sees those).
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        encoder_size: str = "base",
        patch_size: int | None = None,
        mask_ratio: float = 0.75,
        decoder_hidden_size: int = 384,
        decoder_num_heads: int = 12,
        num_self_attention_blocks: int = 2,
        tap_blocks: Sequence[int] = (3, 6, 9),
        norm_pix_loss: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        overrides = {} if patch_size is None else {"patch_size": patch_size}
        self.encoder = build_encoder("vit", encoder_size, img_size, in_channels, spatial_dims, **overrides)
        if max(tap_blocks) >= len(self.encoder.blocks):
            raise ValueError(f"tap_blocks {tuple(tap_blocks)} need more than {len(self.encoder.blocks)} encoder blocks")
        width = self.encoder.hidden_size
        self.in_channels = in_channels
        self.patch_size = self.encoder.patch_size
        self.img_size = tuple(g * p for g, p in zip(self.encoder.grid_shape, self.patch_size))
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # Deep to shallow: cross-attention block i reads hidden state tap_order[i].
        self.tap_order = tuple(sorted(tap_blocks, reverse=True))

        self.decoder_embed = nn.Linear(width, decoder_hidden_size)
        self.tap_projections = nn.ModuleList(nn.Linear(width, decoder_hidden_size) for _ in self.tap_order)
        self.mask_token = nn.Parameter(torch.zeros(decoder_hidden_size))
        self.decoder_pos_embed = build_sincos_position_embedding(
            self.encoder.grid_shape, decoder_hidden_size, spatial_dims
        )  # fixed (1, N, decoder_hidden_size)
        self.decoder_self_blocks = nn.ModuleList(
            TransformerBlock(decoder_hidden_size, 4 * decoder_hidden_size, decoder_num_heads, qkv_bias=True,
                             use_flash_attention=True)
            for _ in range(num_self_attention_blocks)
        )
        self.decoder_cross_blocks = nn.ModuleList(
            TransformerBlock(decoder_hidden_size, 4 * decoder_hidden_size, decoder_num_heads, qkv_bias=True,
                             with_cross_attention=True, use_flash_attention=True)
            for _ in self.tap_order
        )
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size)
        self.decoder_pred = nn.Linear(decoder_hidden_size, math.prod(self.patch_size) * in_channels)

        init_transformer_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)
        freeze_unused_cross_attention_norms(self)

    def draw_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> TokenMask:
        """A random token mask at ``mask_ratio`` for each sample of a batch."""
        return random_masking(batch_size, self.encoder.num_tokens, self.mask_ratio, device, generator)

    def decode(
        self, latent: torch.Tensor, hidden_states: list[torch.Tensor], mask: TokenMask, ids_masked: torch.Tensor
    ) -> torch.Tensor:
        """Visible-token features -> predictions (B, M, P) of the M masked tokens ``ids_masked`` (B, M)."""
        x = scatter_tokens(self.decoder_embed(latent), mask.ids_restore, self.mask_token)
        x = x + self.decoder_pos_embed
        for block in self.decoder_self_blocks:
            x = block(x)
        *inner, (last, last_projection, last_tap) = zip(self.decoder_cross_blocks, self.tap_projections,
                                                         self.tap_order)
        for block, projection, tap in inner:
            x = block(x, context=projection(hidden_states[tap]))  # keys/values: visible tokens of that tap
        x = transformer_block_rows(last, x, ids_masked, context=last_projection(hidden_states[last_tap]))  # (B, M, D)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        mask = self.draw_mask(image.shape[0], image.device, generator)
        latent, hidden_states = self.encoder(image, mask.ids_keep)
        ids_masked = masked_token_ids(mask)
        pred = self.decode(latent, hidden_states, mask, ids_masked)  # (B, M, P)
        target = gather_tokens(patchify(image, self.patch_size), ids_masked)
        if self.norm_pix_loss:
            target = patch_normalise(target)
        # Every masked token has P voxels, so the mean over all of them is MAE's mean of per-token errors.
        loss = F.mse_loss(pred, target)
        pred_all = pred.new_zeros(*mask.mask.shape, pred.shape[-1])
        pred_all = pred_all.scatter(1, ids_masked.unsqueeze(-1).expand_as(pred), pred)
        return {"loss": loss, "pred": pred_all, "mask": mask.mask}

    def reconstruction_errors(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample masked-patch MSE of this network and of predicting each patch's own mean.

        Both are measured in the loss's target space (per-patch normalised with norm_pix_loss,
        where the patch-mean predictor is zero). Returns {"masked_loss": (B,), "patch_mean_loss": (B,)}.
        """
        output = self(image, generator)
        target = patchify(image, self.patch_size)
        if self.norm_pix_loss:
            target = patch_normalise(target)
        mask = output["mask"]

        def masked_mean_error(prediction: torch.Tensor) -> torch.Tensor:
            return (((prediction - target) ** 2).mean(dim=-1) * mask).sum(dim=1) / mask.sum(dim=1)

        return {
            "masked_loss": masked_mean_error(output["pred"]),
            "patch_mean_loss": masked_mean_error(target.mean(dim=-1, keepdim=True)),
        }

    def figure_panels(self, image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Input, masked input and reconstruction (B, C, *img_size) for figures.

        Predictions are de-normalised with each patch's own mean and std from the input, and
        visible patches show the input, as in the MAE paper's figures.
        """
        output = self(image, generator)
        target = patchify(image, self.patch_size)
        pred = output["pred"]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
            pred = pred * std + mean
        hidden = output["mask"].unsqueeze(-1)
        spatial = image.shape[2:]
        return {
            "input": image,
            "masked input": unpatchify(target * (1 - hidden), self.patch_size, spatial, self.in_channels),
            "reconstruction": unpatchify(target * (1 - hidden) + pred * hidden, self.patch_size, spatial,
                                         self.in_channels),
        }
