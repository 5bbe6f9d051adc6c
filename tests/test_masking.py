"""Masking ops: exact counts, determinism, structure, and agreement with per-sample references."""

import pytest
import torch

from medssl.masking import (
    block_masking,
    dual_masking,
    gather_tokens,
    masked_token_ids,
    patchify,
    random_masking,
    scatter_tokens,
    unpatchify,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape,patch", [((2, 1, 32, 48, 16), 16), ((3, 2, 12, 8), (4, 2))])
def test_patchify_round_trip_and_layout(shape, patch):
    x = torch.randn(*shape)
    patches = patchify(x, patch)
    torch.testing.assert_close(unpatchify(patches, patch, shape[2:], shape[1]), x, rtol=0, atol=0)
    # Reference: the first patch holds the first block of voxels, channel last.
    p = patch if isinstance(patch, tuple) else (patch,) * (len(shape) - 2)
    corner = x[(slice(None), slice(None)) + tuple(slice(0, q) for q in p)]
    reference = corner.movedim(1, -1).reshape(shape[0], -1)
    torch.testing.assert_close(patches[:, 0], reference)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        patchify(torch.zeros(1, 1, 30, 32, 32), 16)


def test_patch_order_matches_conv_embedding():
    # A conv with kernel = stride = patch flattens its grid in the same raster order as patchify.
    x = torch.randn(2, 1, 32, 16, 48)
    conv = torch.nn.Conv3d(1, 4, 16, 16, bias=False)
    by_conv = conv(x).flatten(2).transpose(1, 2)
    by_patches = patchify(x, 16) @ conv.weight.reshape(4, -1).T
    torch.testing.assert_close(by_conv, by_patches, atol=1e-4, rtol=1e-4)


def test_random_masking_counts_and_reference():
    mask = random_masking(4, 216, 0.75, generator=seeded())
    assert mask.ids_keep.shape == (4, 54)
    assert mask.mask.sum(1).tolist() == [162.0] * 4
    # Per-sample reference: argsort of the same uniform noise, lowest noise kept.
    noise = torch.rand(4, 216, generator=seeded())
    for b in range(4):
        expected = torch.sort(torch.argsort(noise[b])[:54]).values
        assert torch.equal(mask.ids_keep[b], expected)
        assert mask.mask[b, expected].sum() == 0
    torch.testing.assert_close(random_masking(4, 216, 0.75, generator=seeded()).mask, mask.mask)
    assert not torch.equal(random_masking(4, 216, 0.75, generator=seeded(1)).mask, mask.mask)


def test_random_masking_rejects_empty_visible_set():
    with pytest.raises(ValueError, match="leaves 0 of 8 tokens visible"):
        random_masking(1, 8, 0.99)


def test_gather_and_scatter_against_loop():
    tokens = torch.randn(3, 10, 5)
    mask = random_masking(3, 10, 0.6, generator=seeded(2))
    visible = gather_tokens(tokens, mask.ids_keep)
    mask_token = torch.full((5,), -7.0)
    full = scatter_tokens(visible, mask.ids_restore, mask_token)
    for b in range(3):
        for n in range(10):
            expected = mask_token if mask.mask[b, n] else tokens[b, n]
            torch.testing.assert_close(full[b, n], expected)
        torch.testing.assert_close(visible[b], tokens[b, mask.ids_keep[b]])


def test_block_masking_masks_whole_blocks_with_exact_ratio():
    mask = block_masking(3, (6, 6, 4), 0.5, block_size=2, generator=seeded())
    assert mask.mask.sum(1).tolist() == [72.0] * 3
    grid = mask.mask.reshape(3, 3, 2, 3, 2, 2, 2)  # coarse cells of 2x2x2 tokens
    per_block = grid.permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 18, 8)
    assert torch.all((per_block.sum(-1) == 0) | (per_block.sum(-1) == 8))


def test_dual_mask_counts_and_tube_structure():
    h = w = d = 16
    mask = dual_masking(4, (h, w, d), 0.5, 0.5, generator=seeded())
    assert mask.ids_keep.shape == (4, 1024)
    kept = (1 - mask.mask).reshape(4, h, w, d)
    in_plane = kept.sum(-1) > 0  # positions with at least one visible token along z
    assert in_plane.sum((1, 2)).tolist() == [128] * 4
    # Each slab keeps exactly half of the kept in-plane positions, and nothing outside them.
    assert torch.all(kept.sum((1, 2)) == 64)
    assert torch.all(kept <= in_plane.unsqueeze(-1))
    # Slabs draw independently: two slabs keep different subsets.
    assert not torch.equal(kept[0, :, :, 0], kept[0, :, :, 1])
    torch.testing.assert_close(dual_masking(4, (h, w, d), generator=seeded()).mask, mask.mask)


def test_dual_mask_against_per_sample_reference():
    grid, plane_keep, slab_keep = (4, 4, 3), 8, 4
    mask = dual_masking(2, grid, 0.5, 0.5, generator=seeded(5))
    generator = seeded(5)
    plane_noise = torch.rand(2, 16, generator=generator)
    depth_noise = torch.rand(2, 3, plane_keep, generator=generator)
    for b in range(2):
        expected = torch.zeros(4, 4, 3)
        positions = torch.argsort(plane_noise[b])[:plane_keep]
        for z in range(3):
            chosen = positions[torch.argsort(depth_noise[b, z])[:slab_keep]]
            for p in chosen.tolist():
                expected[p // 4, p % 4, z] = 1
        torch.testing.assert_close(1 - mask.mask[b], expected.flatten())


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_masks_stay_on_the_device(device):
    generator = torch.Generator(device=device).manual_seed(0)
    for mask in (random_masking(2, 64, 0.75, device, generator), dual_masking(2, (4, 4, 4), device=device,
                                                                              generator=generator)):
        assert mask.ids_keep.device.type == device and mask.mask.device.type == device


def test_masked_token_ids_are_the_masked_tokens_in_raster_order():
    mask = random_masking(3, 27, 0.6, torch.device("cpu"), torch.Generator().manual_seed(5))
    ids = masked_token_ids(mask)
    assert ids.shape == (3, 27 - mask.ids_keep.shape[1])
    for sample_ids, sample_mask in zip(ids, mask.mask):
        assert sample_ids.tolist() == torch.nonzero(sample_mask).flatten().tolist()
