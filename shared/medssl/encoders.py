"""3D (and 2D) encoders whose weights load into MONAI's segmentation networks.

- :class:`ViTEncoder`: MONAI's ViT layout (conv patch embedding, fixed sin-cos position
  embedding, pre-norm blocks) with attention through ``scaled_dot_product_attention``; it can
  run on the visible tokens of a mask only. Its state dict is MONAI ``ViT``'s, so it loads into
  ``UNETR(...).vit`` after the prefix change ``encoder.`` -> ``vit.``.
- :class:`SwinEncoder`: MONAI's ``SwinTransformer`` built as ``SwinUNETR`` builds it
  (``encoder.`` -> ``swinViT.``).
- :class:`CNNEncoder`: the residual encoder of MONAI's ``SegResNet`` (``encoder.`` -> ``""``).

:func:`build_encoder` makes any of them from a kind and a size; :func:`build_segmentation_network`
makes the matching segmentation network for fine-tuning: MONAI's UNETR (patch 16, 12 blocks),
:class:`GeneralizedUNETR` (the same network for other ViT patch sizes and depths), SwinUNETR or
SegResNet.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import (
    PatchEmbeddingBlock,
    TransformerBlock,
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
)
from monai.networks.layers import Conv, Norm
from monai.networks.nets import SegResNet, SwinUNETR, UNETR, ViT
from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
from monai.utils import ensure_tuple_rep

from medssl.masking import gather_tokens, patchify

__all__ = [
    "ViTEncoder",
    "SwinEncoder",
    "CNNEncoder",
    "GeneralizedUNETR",
    "ViTLinearSegmenter",
    "ENCODER_SIZES",
    "SEGMENTATION_PREFIX",
    "SEGMENTATION_DECODERS",
    "build_encoder",
    "build_segmentation_network",
    "unetr_skip_blocks",
    "unetr_upsampling",
    "init_transformer_weights",
    "freeze_unused_cross_attention_norms",
    "transformer_block_rows",
]

# Widths and depths per kind and size. ViT "large" is Hi-End-MAE's large (patch 12, width 1536);
# the other ViTs have patch 16 and depth 12, what MONAI's UNETR takes. Other patch sizes and
# depths (MAESIL: patch 8, 6 blocks) go through GeneralizedUNETR downstream.
ENCODER_SIZES: dict[str, dict[str, dict]] = {
    "vit": {
        "tiny": {"patch_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_layers": 12, "num_heads": 3},
        "small": {"patch_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6},
        "base": {"patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
        "large": {"patch_size": 12, "hidden_size": 1536, "mlp_dim": 6144, "num_layers": 12, "num_heads": 16},
    },
    # SwinUNETR's heads (3, 6, 12, 24) are 16 channels wide at its width 48; at the tiny width 12
    # they would be 4 wide, and a step would mostly move 343 x 343 attention matrices of 4-wide
    # heads through memory (docs/study_findings.md). The tiny Swin's heads are 12 wide: a SwinUNETR
    # training step on 2 x 64³ takes 2.1 s instead of 3.9 s on the 2-core CPU.
    "swin": {
        "tiny": {"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)},
        "small": {"feature_size": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
        "base": {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    },
    "cnn": {
        "tiny": {"init_filters": 8, "blocks_down": (1, 2, 2, 4)},
        "small": {"init_filters": 16, "blocks_down": (1, 2, 2, 4)},
        "base": {"init_filters": 32, "blocks_down": (1, 2, 2, 4)},
    },
}

# Decoders of build_segmentation_network: the kind's own network, or a linear head on ViT tokens.
SEGMENTATION_DECODERS: tuple[str, ...] = ("default", "linear")

# Where each encoder's weights sit inside its MONAI segmentation network.
SEGMENTATION_PREFIX: dict[str, str] = {"vit": "vit.", "swin": "swinViT.", "cnn": ""}


class ViTEncoder(nn.Module):
    """Vision Transformer encoder with MONAI ``ViT``'s parameter names.

    Args:
        in_channels: image channels.
        img_size: input spatial size (fixes the position embedding).
        patch_size: patch edge length in voxels.
        hidden_size: token width.
        mlp_dim: hidden width of each block's MLP.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        qkv_bias: bias on the query/key/value projection.
        dropout_rate: dropout in attention and MLP.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="sincos",
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, use_flash_attention=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        freeze_unused_cross_attention_norms(self)
        self.hidden_size = hidden_size
        self.patch_size = self.patch_embedding.patch_embeddings.kernel_size
        self.grid_shape = tuple(s // p for s, p in zip(ensure_tuple_rep(img_size, spatial_dims), self.patch_size))
        # A Python int (MONAI's n_patches is a numpy integer, which torch.compile traces as a tensor).
        self.num_tokens = math.prod(self.grid_shape)


    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with position embedding: (B, N, D), or (B, K, D) for the ids_keep tokens.

        With ids_keep only the visible patches are projected (the convolution written as a
        matrix product over gathered patches), which saves the masked ones' share of the work.
        """
        if ids_keep is None:
            return self.patch_embedding(x)
        projection = self.patch_embedding.patch_embeddings
        patches = gather_tokens(patchify(x, self.patch_size), ids_keep)  # (B, K, prod(patch) * C)
        weight = projection.weight.movedim(1, -1).reshape(projection.out_channels, -1)  # patchify's (patch, C) order
        tokens = F.linear(patches, weight, projection.bias)
        position = self.patch_embedding.position_embeddings.expand(x.shape[0], -1, -1)
        return self.patch_embedding.dropout(tokens + gather_tokens(position, ids_keep))

    def forward(
        self, x: torch.Tensor, ids_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode an image, optionally only the tokens listed in ids_keep.

        Args:
            x: (B, C, *img_size) image.
            ids_keep: optional (B, K) indices of the tokens to encode (raster order of the grid).

        Returns:
            the normed output (B, K or N, hidden_size) and the raw output of every block (a list
            of num_layers tensors of the same shape), as MONAI's ViT returns them.
        """
        tokens = self.embed(x, ids_keep)
        hidden_states = []
        for block in self.blocks:
            tokens = block(tokens)
            hidden_states.append(tokens)
        return self.norm(tokens), hidden_states


class SwinEncoder(SwinTransformer):
    """MONAI's SwinTransformer exactly as SwinUNETR builds it (so SwinUNETR loads its weights).

    ``forward(x)`` returns the five normalised feature maps, from the patch embedding (stride 2)
    down to stride 32, each (B, feature_size * 2**i, *spatial / 2**(i+1)).
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        spatial_dims: int = 3,
        use_checkpoint: bool = False,
    ) -> None:
        # The arguments SwinUNETR gives its SwinTransformer, so SwinUNETR loads these weights.
        super().__init__(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ensure_tuple_rep(window_size, spatial_dims),
            patch_size=ensure_tuple_rep(2, spatial_dims),
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=nn.LayerNorm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=MERGING_MODE["merging"],
        )
        self.feature_size = feature_size

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:  # type: ignore[override]
        return super().forward(x, normalize)


class CNNEncoder(nn.Module):
    """The residual encoder of MONAI's SegResNet (``convInit`` + ``down_layers``).

    ``forward(x)`` returns one feature map per stage, (B, init_filters * 2**i, *spatial / 2**i).
    """

    def __init__(
        self,
        in_channels: int = 1,
        init_filters: int = 32,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        reference = SegResNet(
            spatial_dims=spatial_dims, init_filters=init_filters, in_channels=in_channels, blocks_down=tuple(blocks_down)
        )
        self.convInit = reference.convInit
        self.down_layers = reference.down_layers
        self.feature_size = init_filters

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.convInit(x)
        for stage in self.down_layers:
            x = stage(x)
            features.append(x)
        return features


def unetr_skip_blocks(num_layers: int) -> tuple[int, int, int]:
    """The three ViT blocks (0-indexed hidden states, shallow to deep) whose output feeds UNETR's skips.

    MONAI's UNETR taps ``hidden_states[3]``, ``[6]``, ``[9]`` of 12 blocks (the outputs of blocks
    4, 7 and 10, as Hi-End-MAE's decoder does), i.e. ``k * depth // 4`` for k = 1, 2, 3. Other depths
    follow the same rule, moved earlier only where needed so that the three taps and the normed
    output come from four different blocks: 12 -> (3, 6, 9), 8 -> (2, 4, 6), 6 -> (1, 3, 4),
    4 -> (0, 1, 2). Fewer than 4 blocks cannot give four different ones; the earliest taps repeat
    (3 -> (0, 0, 1)).
    """
    if num_layers < 1:
        raise ValueError(f"a ViT needs at least one block, got num_layers {num_layers}")
    return tuple(max(0, min(k * num_layers // 4, num_layers - 5 + k)) for k in (1, 2, 3))  # type: ignore[return-value]


def unetr_upsampling(patch_size: int) -> tuple[int, int, int, int]:
    """Upsampling factor of each of UNETR's four decoder stages, deepest first; their product is patch_size.

    The skips of the three taps are the token grid brought up by the factors of the stages above
    them (a chain of equal transposed convolutions, MONAI's ``UnetrPrUpBlock``), so the factors
    other than the last stage's are 1 or 2:

    - a power of two up to 16: the twos go to the finest stages and the skips keep UNETR's
      strides 2 / 4 / 8 (capped at the patch): 16 -> (2, 2, 2, 2), MONAI's UNETR; 8 -> (1, 2, 2, 2),
      the deepest stage fuses at the token grid without upsampling;
    - patch = odd * 2**k with odd > 1 and k <= 3: the odd factor is the last stage's (from the
      finest skip to the full-resolution convolution of the image): 12 -> (1, 2, 2, 3), skips at
      strides 12 / 6 / 3.
    """
    if patch_size >= 1:
        twos = (patch_size & -patch_size).bit_length() - 1  # how many times 2 divides patch_size
        odd = patch_size >> twos
        if odd == 1 and twos <= 4:
            return (1,) * (4 - twos) + (2,) * twos  # type: ignore[return-value]
        if twos <= 3:
            return (1,) * (3 - twos) + (2,) * twos + (odd,)  # type: ignore[return-value]
    raise ValueError(
        f"ViT patch size {patch_size} does not fit UNETR's four decoder stages (1, 2, 4, 8, 16, or an odd "
        "number times 1, 2, 4 or 8, such as 12); pretrain with one of those patch sizes"
    )


def _skip_projection(
    spatial_dims: int, in_channels: int, out_channels: int, factors: Sequence[int], norm_name: tuple | str
) -> UnetrPrUpBlock:
    """UNETR's skip path: token features up by the product of ``factors`` (all >1 ones equal)."""
    steps = [factor for factor in factors if factor > 1]
    return UnetrPrUpBlock(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layer=max(len(steps) - 1, 0),
        kernel_size=3,
        stride=1,
        # No upsampling at all: a 1x1 transposed convolution projects the tokens to out_channels.
        upsample_kernel_size=steps[0] if steps else 1,
        norm_name=norm_name,
        conv_block=True,
        res_block=True,
    )


class GeneralizedUNETR(nn.Module):
    """UNETR for a ViT of any depth and of patch size 8, 12, 16 (any size :func:`unetr_upsampling` takes).

    MONAI's UNETR fixes patch 16 and 12 blocks. This network keeps its parts (MONAI's ``ViT`` as
    ``vit``, with MONAI ViT's parameter names, so a pretrained ``encoder.`` state loads with the
    prefix changed to ``vit.``; ``UnetrBasicBlock`` / ``UnetrPrUpBlock`` / ``UnetrUpBlock`` under
    UNETR's names) and adapts two things: the skips come from the blocks
    :func:`unetr_skip_blocks` picks for the depth, and the decoder's upsampling factors are
    :func:`unetr_upsampling` of the patch size. At patch 16 and depth 12 it is MONAI's UNETR
    (same state-dict keys and output). Attention goes through ``scaled_dot_product_attention``
    when there is no attention dropout.

    ``forward(x)``: (B, in_channels, *img_size) -> logits (B, out_channels, *img_size).

    Args:
        in_channels: image channels.
        out_channels: classes.
        img_size: input spatial size, divisible by patch_size (fixes the position embedding).
        patch_size: ViT patch edge length in voxels.
        feature_size: decoder width at full resolution (x2, x4, x8 at the coarser skips).
        hidden_size: ViT token width.
        mlp_dim: hidden width of each block's MLP.
        num_layers: ViT blocks.
        num_heads: attention heads per block.
        skip_blocks: the three blocks (0-indexed, shallow to deep) whose raw output feeds the
            skips; None: :func:`unetr_skip_blocks` of num_layers.
        norm_name: feature normalisation of the convolutional blocks.
        dropout_rate: dropout in attention and MLP.
        spatial_dims: 2 or 3.
        qkv_bias: bias on the query/key/value projection (the medssl encoders have it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        patch_size: int = 8,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        skip_blocks: Sequence[int] | None = None,
        norm_name: tuple | str = "instance",
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        img_size = ensure_tuple_rep(img_size, spatial_dims)
        _check_patch_grid(img_size, patch_size)
        skip_blocks = unetr_skip_blocks(num_layers) if skip_blocks is None else tuple(skip_blocks)
        if len(skip_blocks) != 3 or not all(0 <= block < num_layers for block in skip_blocks):
            raise ValueError(f"skip_blocks must be three block indices in [0, {num_layers - 1}], got {skip_blocks}")
        factors = unetr_upsampling(patch_size)
        self.skip_blocks: tuple[int, int, int] = skip_blocks  # type: ignore[assignment]
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        self.feat_size = tuple(size // patch_size for size in img_size)
        self.hidden_size = hidden_size
        self.vit = _monai_vit(in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads,
                              dropout_rate, spatial_dims, qkv_bias)
        self.encoder1 = UnetrBasicBlock(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=feature_size,
            kernel_size=3,
            stride=1,
            norm_name=norm_name,
            res_block=True,
        )
        # Skips of the shallow, middle and deep tap: up by the factors of the stages above them.
        self.encoder2 = _skip_projection(spatial_dims, hidden_size, feature_size * 2, factors[:3], norm_name)
        self.encoder3 = _skip_projection(spatial_dims, hidden_size, feature_size * 4, factors[:2], norm_name)
        self.encoder4 = _skip_projection(spatial_dims, hidden_size, feature_size * 8, factors[:1], norm_name)
        stage_channels = (hidden_size, feature_size * 8, feature_size * 4, feature_size * 2, feature_size)
        self.decoder5, self.decoder4, self.decoder3, self.decoder2 = (
            UnetrUpBlock(
                spatial_dims=spatial_dims,
                in_channels=stage_channels[stage],
                out_channels=stage_channels[stage + 1],
                kernel_size=3,
                upsample_kernel_size=factors[stage],
                norm_name=norm_name,
                res_block=True,
            )
            for stage in range(4)
        )
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size, out_channels=out_channels)
        self.proj_axes = (0, spatial_dims + 1) + tuple(d + 1 for d in range(spatial_dims))
        self.proj_view_shape = list(self.feat_size) + [hidden_size]
        freeze_unused_cross_attention_norms(self)

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, hidden) -> feature map (B, hidden, *grid)."""
        return x.view([x.size(0)] + self.proj_view_shape).permute(self.proj_axes).contiguous()

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden_states_out = self.vit(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden_states_out[self.skip_blocks[0]]))
        enc3 = self.encoder3(self.proj_feat(hidden_states_out[self.skip_blocks[1]]))
        enc4 = self.encoder4(self.proj_feat(hidden_states_out[self.skip_blocks[2]]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


class ViTLinearSegmenter(nn.Module):
    """A ViT with a linear head on its tokens: segmentation by linear probing of the encoder.

    Per token, BatchNorm then one linear map (a 1×1 convolution) of the concatenated raw outputs
    of three blocks (:func:`unetr_skip_blocks`, UNETR's skips) and the normed last output give the
    class logits of its patch; trilinear upsampling takes them to voxels. UNETR also has a
    convolutional branch on the raw image, which can learn organs on its own whatever the ViT
    holds; here every logit comes from the encoder's tokens, so with the encoder frozen the Dice
    measures what the encoder learnt. MONAI's ``ViT`` sits under ``vit``, as in UNETR.

    ``forward(x)``: (B, in_channels, *img_size) -> logits (B, out_channels, *img_size).

    Args: as :class:`GeneralizedUNETR` (no decoder width: the head is linear).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        patch_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        skip_blocks: Sequence[int] | None = None,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        _check_patch_grid(self.img_size, patch_size)
        self.skip_blocks = unetr_skip_blocks(num_layers) if skip_blocks is None else tuple(skip_blocks)
        self.grid_shape = tuple(size // patch_size for size in self.img_size)
        self.vit = _monai_vit(in_channels, self.img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads,
                              dropout_rate, spatial_dims, qkv_bias)
        features = hidden_size * (len(self.skip_blocks) + 1)
        self.norm = Norm[Norm.BATCH, spatial_dims](features)
        self.head = Conv[Conv.CONV, spatial_dims](features, out_channels, kernel_size=1)
        freeze_unused_cross_attention_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, hidden_states = self.vit(x)
        tokens = torch.cat([hidden_states[block] for block in self.skip_blocks] + [output], dim=-1)  # (B, N, F)
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid_shape)  # (B, F, *grid)
        mode = "trilinear" if len(self.grid_shape) == 3 else "bilinear"
        return F.interpolate(self.head(self.norm(grid)), size=self.img_size, mode=mode, align_corners=False)


def _monai_vit(
    in_channels: int,
    img_size: Sequence[int],
    patch_size: int,
    hidden_size: int,
    mlp_dim: int,
    num_layers: int,
    num_heads: int,
    dropout_rate: float,
    spatial_dims: int,
    qkv_bias: bool,
) -> ViT:
    """MONAI's ViT with the conv patch embedding, attention through SDPA when there is no dropout."""
    vit = ViT(
        in_channels=in_channels,
        img_size=img_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        proj_type="conv",
        dropout_rate=dropout_rate,
        spatial_dims=spatial_dims,
        qkv_bias=qkv_bias,
    )
    if dropout_rate == 0.0:
        # MONAI's ViT has no switch for it; its attention blocks read this flag at every call.
        # MONAI passes the dropout rate to the fused kernel in eval mode too, hence only without dropout.
        for block in vit.blocks:
            block.attn.use_flash_attention = True
    return vit


def _check_patch_grid(img_size: Sequence[int], patch_size: int) -> None:
    if any(size % patch_size for size in img_size):
        raise ValueError(
            f"img_size {tuple(img_size)} (roi_size) is not divisible by the ViT patch size {patch_size}: "
            f"use a multiple of {patch_size} on every axis, the size the encoder was pretrained at"
        )


def _size_args(kind: str, size: str, overrides: Mapping[str, Any] | None = None) -> dict:
    if kind not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder kind {kind!r}; choose one of {sorted(ENCODER_SIZES)}")
    if size not in ENCODER_SIZES[kind]:
        raise ValueError(f"unknown {kind} size {size!r}; choose one of {sorted(ENCODER_SIZES[kind])}")
    preset = dict(ENCODER_SIZES[kind][size])
    unknown = sorted(set(overrides or {}) - set(preset))
    if unknown:
        raise ValueError(f"encoder_args {unknown} are not {kind} encoder settings; choose from {sorted(preset)}")
    return preset | dict(overrides or {})


def build_encoder(
    kind: str = "vit",
    size: str = "base",
    img_size: Sequence[int] | int = 96,
    in_channels: int = 1,
    spatial_dims: int = 3,
    **overrides,
) -> nn.Module:
    """Build an encoder by kind ("vit", "swin", "cnn") and size ("tiny", "small", "base", "large").

    ``overrides`` replace single entries of the size preset (e.g. ``patch_size=8`` for MAESIL).
    """
    args = _size_args(kind, size) | overrides
    if kind == "vit":
        return ViTEncoder(in_channels=in_channels, img_size=img_size, spatial_dims=spatial_dims, **args)
    if kind == "swin":
        return SwinEncoder(in_channels=in_channels, spatial_dims=spatial_dims, **args)
    return CNNEncoder(in_channels=in_channels, spatial_dims=spatial_dims, **args)


def build_segmentation_network(
    kind: str = "vit",
    size: str = "base",
    out_channels: int = 2,
    img_size: Sequence[int] | int = 96,
    in_channels: int = 1,
    spatial_dims: int = 3,
    feature_size: int = 16,
    qkv_bias: bool = True,
    dropout_rate: float = 0.0,
    encoder_args: Mapping[str, Any] | None = None,
    decoder: str = "default",
) -> nn.Module:
    """The segmentation network that takes the ``kind``/``size`` encoder's weights.

    vit -> UNETR (skips from blocks 3/6/9 and the output): MONAI's own at patch 16 and 12 blocks,
    :class:`GeneralizedUNETR` for any other patch size or depth; swin -> SwinUNETR; cnn -> SegResNet.
    ``decoder="linear"`` (vit only) gives :class:`ViTLinearSegmenter` instead: a linear head on
    the tokens, for linear probing. ``feature_size`` is UNETR's decoder width; Swin and CNN take
    theirs from the encoder size. ``encoder_args`` replace entries of the size preset, as the
    pretraining bundle did (MAESIL: ``{"patch_size": 8, "num_layers": 6, "num_heads": 8}``); keys
    outside the preset are refused. The encoder sits under :data:`SEGMENTATION_PREFIX` ``[kind]``.
    """
    args = _size_args(kind, size, encoder_args)
    if decoder not in SEGMENTATION_DECODERS or (decoder == "linear" and kind != "vit"):
        raise ValueError(
            f"decoder {decoder!r} with network_kind {kind!r}: choose 'default' (the kind's segmentation "
            f"network), or 'linear' (a linear head on the tokens) with network_kind 'vit'"
        )
    if decoder == "linear":
        return ViTLinearSegmenter(
            in_channels, out_channels, img_size, dropout_rate=dropout_rate, spatial_dims=spatial_dims,
            qkv_bias=qkv_bias, **args,
        )
    if kind == "vit":
        if args["patch_size"] != 16 or args["num_layers"] != 12:
            return GeneralizedUNETR(
                in_channels,
                out_channels,
                img_size,
                feature_size=feature_size,
                dropout_rate=dropout_rate,
                spatial_dims=spatial_dims,
                qkv_bias=qkv_bias,
                **args,
            )
        _check_patch_grid(ensure_tuple_rep(img_size, spatial_dims), 16)
        unetr = UNETR(
            in_channels,
            out_channels,
            img_size,
            feature_size=feature_size,
            hidden_size=args["hidden_size"],
            mlp_dim=args["mlp_dim"],
            num_heads=args["num_heads"],
            proj_type="conv",
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        )
        freeze_unused_cross_attention_norms(unetr)
        return unetr
    if kind == "swin":
        return SwinUNETR(
            in_channels,
            out_channels,
            depths=args["depths"],
            num_heads=args["num_heads"],
            feature_size=args["feature_size"],
            spatial_dims=spatial_dims,
        )
    return SegResNet(
        spatial_dims=spatial_dims,
        init_filters=args["init_filters"],
        in_channels=in_channels,
        out_channels=out_channels,
        blocks_down=tuple(args["blocks_down"]),
    )


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear layers and patch projection, unit LayerNorms.

    Fixed (non-trainable) position embeddings are left as they are.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, PatchEmbeddingBlock) and isinstance(sub.patch_embeddings, (nn.Conv2d, nn.Conv3d)):
            # Initialise the projection like a linear layer over the flattened patch (MAE).
            weight = sub.patch_embeddings.weight
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


def freeze_unused_cross_attention_norms(module: nn.Module) -> None:
    """Stop training the cross-attention LayerNorm that MONAI's TransformerBlock always creates.

    Blocks without cross-attention never use it; it stays in the state dict (MONAI's ViT has it
    too) but must not ask for gradients, or DistributedDataParallel reports unused parameters.
    """
    for block in module.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)


def transformer_block_rows(
    block: TransformerBlock, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor | None = None
) -> torch.Tensor:
    """``block(x, context)`` at the tokens ``rows`` only, without computing the others.

    Every token of x (B, N, D) is still a key and value of the self-attention, but only the rows
    (B, R) are queries, and the output projection, cross-attention and MLP run on them alone:
    the last block of a decoder whose loss reads R of N tokens then costs about R / N of a block.
    Returns (B, R, D), equal to ``gather_tokens(block(x, context), rows)`` for MONAI's
    TransformerBlock with its fused qkv projection and scaled_dot_product_attention.
    """
    attention = block.attn
    q, k, v = attention.input_rearrange(attention.qkv(block.norm1(x)))  # each (B, heads, N, head_dim)
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, heads, R, head_dim)
    dropout = attention.dropout_rate if attention.training else 0.0
    attended = F.scaled_dot_product_attention(q, k, v, scale=attention.scale, dropout_p=dropout)
    attended = attention.drop_output(attention.out_proj(attention.out_rearrange(attended)))
    y = gather_tokens(x, rows) + attended
    if block.with_cross_attention:
        y = y + block.cross_attn(block.norm_cross_attn(y), context=context)
    return y + block.mlp(block.norm2(y))
