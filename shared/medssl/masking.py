"""Token masking for masked image modelling, 2D and 3D.

Tokens are the patches of a (B, C, *spatial) image in raster order of the patch grid, the order
in which a strided convolution's output is flattened (the last spatial axis varies fastest).
Every mask here keeps the same number of tokens in every sample, so the visible tokens of a
batch form one dense (B, K, D) tensor. All functions are batched tensor ops on the requested
device, draw their randomness from an optional ``torch.Generator`` and never synchronise with
the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = [
    "TokenMask",
    "patchify",
    "unpatchify",
    "random_masking",
    "block_masking",
    "dual_masking",
    "gather_tokens",
    "masked_token_ids",
    "scatter_tokens",
]


class TokenMask(NamedTuple):
    """Which tokens of each sample an encoder sees.

    ids_keep: (B, K) indices of the visible tokens, ascending.
    ids_restore: (B, N) permutation that puts [visible ; masked] tokens back in raster order.
    mask: (B, N) float, 1 for a masked token, 0 for a visible one.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def _as_tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def patchify(x: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Cut (B, C, *spatial) into non-overlapping patches.

    Returns (B, N, prod(patch_size) * C): N patches in raster order of the patch grid, each
    flattened as (*patch, C) so that per-patch statistics are over all its voxels and channels.
    """
    spatial = x.shape[2:]
    dims = len(spatial)
    patch = _as_tuple(patch_size, dims)
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"image size {tuple(spatial)} is not divisible by patch size {patch}")
    grid = [s // p for s, p in zip(spatial, patch)]
    b, c = x.shape[:2]
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    x = x.reshape(b, c, *[v for g, p in zip(grid, patch) for v in (g, p)])
    order = [0] + [2 + 2 * i for i in range(dims)] + [3 + 2 * i for i in range(dims)] + [1]
    return x.permute(order).reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int | Sequence[int], spatial_shape: Sequence[int], channels: int = 1
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, prod(patch_size) * C) -> (B, C, *spatial_shape)."""
    dims = len(spatial_shape)
    patch = _as_tuple(patch_size, dims)
    grid = [s // p for s, p in zip(spatial_shape, patch)]
    b = patches.shape[0]
    x = patches.reshape(b, *grid, *patch, channels)
    # (B, g0.., p0.., C) -> (B, C, g0, p0, g1, p1, ...)
    order = [0, 1 + 2 * dims] + [v for i in range(dims) for v in (1 + i, 1 + dims + i)]
    return x.permute(order).reshape(b, channels, *spatial_shape)


def _token_mask_from_keep(keep: torch.Tensor, num_keep: int) -> TokenMask:
    """Build a TokenMask from a (B, N) boolean keep matrix with exactly num_keep True per row."""
    masked = (~keep).to(torch.uint8)
    # A stable sort puts every row's visible tokens first, each group in ascending raster order.
    ids_shuffle = torch.argsort(masked, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return TokenMask(ids_shuffle[:, :num_keep], ids_restore, masked.float())


def _keep_lowest(noise: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Boolean matrix marking the num_keep smallest entries of each row of noise."""
    ranks = torch.argsort(torch.argsort(noise, dim=-1), dim=-1)
    return ranks < num_keep


def random_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> TokenMask:
    """Per-sample uniform random masking (MAE): exactly round(N * (1 - ratio)) visible tokens."""
    num_keep = round(num_tokens * (1.0 - mask_ratio))
    if not 0 < num_keep <= num_tokens:
        raise ValueError(f"mask_ratio {mask_ratio} leaves {num_keep} of {num_tokens} tokens visible")
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    return _token_mask_from_keep(_keep_lowest(noise, num_keep), num_keep)


def block_masking(
    batch_size: int,
    grid_shape: Sequence[int],
    mask_ratio: float,
    block_size: int | Sequence[int] = 2,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> TokenMask:
    """Mask whole blocks of block_size tokens per axis (random masking on the coarse grid).

    grid_shape must be divisible by block_size; the ratio is then exact.
    """
    dims = len(grid_shape)
    block = _as_tuple(block_size, dims)
    if any(g % b for g, b in zip(grid_shape, block)):
        raise ValueError(f"token grid {tuple(grid_shape)} is not divisible by block size {block}")
    coarse = [g // b for g, b in zip(grid_shape, block)]
    num_blocks = math.prod(coarse)
    keep_blocks = round(num_blocks * (1.0 - mask_ratio))
    noise = torch.rand(batch_size, num_blocks, device=device, generator=generator)
    keep = _keep_lowest(noise, keep_blocks).reshape(batch_size, *coarse)
    for axis, b in enumerate(block):
        keep = keep.repeat_interleave(b, dim=1 + axis)
    return _token_mask_from_keep(keep.reshape(batch_size, -1), keep_blocks * math.prod(block))


def dual_masking(
    batch_size: int,
    grid_shape: Sequence[int],
    plane_ratio: float = 0.5,
    depth_ratio: float = 0.5,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> TokenMask:
    """MAESIL's dual mask on a 3D token grid (H, W, D); D, the last axis, is the depth (z) axis.

    1. plane mask: keep S = round(H*W*(1 - plane_ratio)) in-plane positions; every other
       position is masked in all depth slabs (a tube along z);
    2. depth mask: inside each depth slab independently, keep round(S*(1 - depth_ratio)) of S.
    Visible tokens per sample: D * round(S * (1 - depth_ratio)).
    """
    h, w, d = grid_shape
    num_plane = h * w
    plane_keep = round(num_plane * (1.0 - plane_ratio))
    slab_keep = round(plane_keep * (1.0 - depth_ratio))
    if not 0 < slab_keep <= plane_keep:
        raise ValueError(f"plane_ratio {plane_ratio}, depth_ratio {depth_ratio} leave no visible token")
    plane_noise = torch.rand(batch_size, num_plane, device=device, generator=generator)
    kept_positions = torch.argsort(plane_noise, dim=1)[:, :plane_keep]  # (B, S)
    depth_noise = torch.rand(batch_size, d, plane_keep, device=device, generator=generator)
    kept_in_slab = _keep_lowest(depth_noise, slab_keep)  # (B, D, S)
    keep = torch.zeros(batch_size, d, num_plane, dtype=torch.bool, device=device)
    keep.scatter_(2, kept_positions.unsqueeze(1).expand(-1, d, -1), kept_in_slab)
    # (B, D, H*W) -> raster order (B, H*W*D) with depth fastest
    keep = keep.transpose(1, 2).reshape(batch_size, num_plane * d)
    return _token_mask_from_keep(keep, d * slab_keep)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample: x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def masked_token_ids(mask: TokenMask) -> torch.Tensor:
    """Indices (B, N - K) of each sample's masked tokens, ascending (raster order)."""
    num_masked = mask.mask.shape[1] - mask.ids_keep.shape[1]
    # A stable sort keeps equal entries in index order, so the masked ones (1) come first, ascending.
    return torch.sort(mask.mask, dim=1, descending=True, stable=True).indices[:, :num_masked]


def scatter_tokens(visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Put visible tokens (B, K, D) back in raster order, mask_token (D,) everywhere else: (B, N, D)."""
    b, k, dim = visible.shape
    fill = mask_token.reshape(1, 1, dim).to(visible.dtype).expand(b, ids_restore.shape[1] - k, dim)
    return gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)
