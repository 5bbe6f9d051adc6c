"""3D (and 2D) encoders whose weights load into MONAI's segmentation networks.

- :class:`ViTEncoder`: MONAI's ViT layout (conv patch embedding, fixed sin-cos position
  embedding, pre-norm blocks) with attention through ``scaled_dot_product_attention``; it can
  run on the visible tokens of a mask only. Its state dict is MONAI ``ViT``'s, so it loads into
  ``UNETR(...).vit`` after the prefix change ``encoder.`` -> ``vit.``.
- :class:`SwinEncoder`: MONAI's ``SwinTransformer`` built as ``SwinUNETR`` builds it
  (``encoder.`` -> ``swinViT.``).
- :class:`CNNEncoder`: the residual encoder of MONAI's ``SegResNet`` (``encoder.`` -> ``""``).

:func:`build_encoder` makes any of them from a kind and a size; :func:`build_segmentation_network`
makes the matching MONAI segmentation network for fine-tuning.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.nets import SegResNet, SwinUNETR, UNETR
from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
from monai.utils import ensure_tuple_rep

from medssl.masking import gather_tokens, patchify

__all__ = [
    "ViTEncoder",
    "SwinEncoder",
    "CNNEncoder",
    "ENCODER_SIZES",
    "SEGMENTATION_PREFIX",
    "build_encoder",
    "build_segmentation_network",
    "init_transformer_weights",
    "freeze_unused_cross_attention_norms",
]

# Widths and depths per kind and size. ViT "large" is Hi-End-MAE's large (patch 12, width 1536);
# every other ViT keeps patch 16 and depth 12, which is what MONAI's UNETR takes.
ENCODER_SIZES: dict[str, dict[str, dict]] = {
    "vit": {
        "tiny": {"patch_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_layers": 12, "num_heads": 3},
        "small": {"patch_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6},
        "base": {"patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
        "large": {"patch_size": 12, "hidden_size": 1536, "mlp_dim": 6144, "num_layers": 12, "num_heads": 16},
    },
    "swin": {
        "tiny": {"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
        "small": {"feature_size": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
        "base": {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    },
    "cnn": {
        "tiny": {"init_filters": 8, "blocks_down": (1, 2, 2, 4)},
        "small": {"init_filters": 16, "blocks_down": (1, 2, 2, 4)},
        "base": {"init_filters": 32, "blocks_down": (1, 2, 2, 4)},
    },
}

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

    @property
    def num_tokens(self) -> int:
        return self.patch_embedding.n_patches

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


def _size_args(kind: str, size: str) -> dict:
    if kind not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder kind {kind!r}; choose one of {sorted(ENCODER_SIZES)}")
    if size not in ENCODER_SIZES[kind]:
        raise ValueError(f"unknown {kind} size {size!r}; choose one of {sorted(ENCODER_SIZES[kind])}")
    return dict(ENCODER_SIZES[kind][size])


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
) -> nn.Module:
    """The MONAI segmentation network that takes the ``kind``/``size`` encoder's weights.

    vit -> UNETR (skips from blocks 3/6/9 and the output), swin -> SwinUNETR, cnn -> SegResNet.
    ``feature_size`` is UNETR's decoder width; Swin and CNN take theirs from the encoder size.
    Their encoder sits under :data:`SEGMENTATION_PREFIX` ``[kind]``.
    """
    args = _size_args(kind, size)
    if kind == "vit":
        if args["patch_size"] != 16 or args["num_layers"] != 12:
            raise ValueError(f"UNETR needs patch 16 and 12 layers; ViT size {size!r} has {args}")
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
