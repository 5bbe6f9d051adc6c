"""Superpatch partition / stitching / crops (medssl.superpatch)."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.metrics import psnr, ssim3d
from medssl.superpatch import RandSuperpatchCropd, partition, reconstruct_volume, stitch, superpatch_layout


@pytest.mark.parametrize(
    "shape, size",
    [((2, 3, 50, 33, 17), 16), ((1, 1, 32, 32, 32), 16), ((1, 2, 20, 9, 40), (8, 12, 16)), ((3, 1, 7, 5, 3), 8)],
)
def test_partition_stitch_round_trip_is_bit_exact(shape, size):
    volume = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    superpatches, valid, layout = partition(volume, size)
    sizes = layout.superpatch_size
    assert layout.grid == tuple(math.ceil(n / s) for n, s in zip(shape[2:], sizes))
    assert superpatches.shape == (shape[0] * layout.num_superpatches, shape[1], *sizes)
    assert valid.shape == (shape[0] * layout.num_superpatches, 1, *sizes)
    assert torch.equal(stitch(superpatches, layout), volume)
    # every real voxel is covered exactly once, padding is marked 0
    assert int(valid.sum()) == shape[0] * math.prod(shape[2:])


def test_superpatches_are_the_blocks_of_the_padded_volume_in_raster_order():
    volume = torch.arange(2 * 20 * 12 * 9, dtype=torch.float32).reshape(2, 1, 20, 12, 9)
    superpatches, valid, layout = partition(volume, 8, pad_value=-1.0)
    assert layout.grid == (3, 2, 2)
    # volume 1, superpatch (i, j, k) = (2, 0, 1): raster index 2 * 4 + 0 * 2 + 1
    block = superpatches[1 * 12 + 9, 0]
    assert torch.equal(block[:4, :, :1], volume[1, 0, 16:20, 0:8, 8:9])
    assert torch.all(block[4:] == -1.0) and torch.all(block[:, :, 1:] == -1.0)
    assert torch.equal(valid[1 * 12 + 9, 0] > 0, block >= 0)


def test_stitched_reconstruction_never_contains_padding():
    volume = torch.rand(1, 1, 21, 19, 30, generator=torch.Generator().manual_seed(1))

    def corrupt_padding(superpatch: torch.Tensor) -> torch.Tensor:
        # padding arrives as the sentinel -5; turn it into a huge error if it ever leaked out
        return torch.where(superpatch == -5.0, torch.full_like(superpatch, 1e6), superpatch)

    out = reconstruct_volume(corrupt_padding, volume, 16, batch_size=3, pad_value=-5.0)
    assert torch.equal(out, volume)
    assert torch.isinf(psnr(out, volume)).all()
    assert torch.allclose(ssim3d(out, volume), torch.ones(1))


def test_reconstruct_volume_batches_superpatches():
    volume = torch.rand(2, 1, 24, 24, 24, generator=torch.Generator().manual_seed(2))
    calls = []

    def record(superpatch: torch.Tensor) -> torch.Tensor:
        calls.append(superpatch.shape[0])
        return superpatch * 2

    out = reconstruct_volume(record, volume, 16, batch_size=5)
    assert calls == [5, 5, 5, 1]  # 2 volumes x 8 superpatches, 5 at a time
    assert torch.equal(out, volume * 2)


def test_layout_of_exact_multiple_has_no_padding():
    layout = superpatch_layout((128, 256, 128), 128)
    assert layout.grid == (1, 2, 1) and layout.padded_shape == (128, 256, 128)


def test_crop_pads_small_volume_and_marks_padding():
    image = torch.rand(1, 20, 40, 10) + 0.5
    crop = RandSuperpatchCropd(["image", "label"], superpatch_size=16)
    crop.set_random_state(0)
    out = crop({"image": image, "label": torch.ones(1, 20, 40, 10)})[0]
    assert out["image"].shape == (1, 16, 16, 16) and out["valid"].shape == (1, 16, 16, 16)
    # the depth axis has 10 real slices; the rest is padding with value 0 and valid 0
    assert torch.all(out["valid"][..., :10] == 1) and torch.all(out["valid"][..., 10:] == 0)
    assert torch.all(out["image"][..., 10:] == 0) and torch.all(out["image"][..., :10] >= 0.5)
    assert torch.equal(torch.as_tensor(out["label"]), torch.as_tensor(out["valid"]))


def test_crop_rejects_near_empty_crops():
    image = torch.zeros(1, 64, 64, 64)
    image[:, 40:56, 40:56, 40:56] = 1.0  # one bright cube in air
    crop = RandSuperpatchCropd("image", superpatch_size=16, num_samples=10, min_mean=0.05, max_tries=200)
    crop.set_random_state(3)
    means = [float(sample["image"].mean()) for sample in crop({"image": image})]
    assert min(means) >= 0.05
    # without rejection most random crops would be empty air
    plain = RandSuperpatchCropd("image", superpatch_size=16, num_samples=10, min_mean=0.0)
    plain.set_random_state(3)
    assert sum(float(sample["image"].mean()) < 0.05 for sample in plain({"image": image})) >= 5


def test_crop_keeps_best_try_when_all_fail():
    image = torch.zeros(1, 32, 32, 32)
    image[:, :8, :8, :8] = 1.0  # at most 1/8 of any crop is bright: every try fails min_mean 0.5
    crop = RandSuperpatchCropd("image", superpatch_size=16, min_mean=0.5, max_tries=64)
    crop.set_random_state(0)
    tries = []
    original = crop.randomize
    crop.randomize = lambda shape: (original(shape), tries.append(crop._start))
    out = crop({"image": image})[0]
    assert len(tries) == 64
    best = max(float(image[:, a : a + 16, b : b + 16, c : c + 16].mean()) for a, b, c in tries)
    assert 0 < float(out["image"].mean()) == best < 0.5


def test_crop_rejects_bad_tries():
    with pytest.raises(ValueError, match="max_tries"):
        RandSuperpatchCropd("image", max_tries=0)
    with pytest.raises(ValueError, match="num_samples"):
        RandSuperpatchCropd("image", num_samples=0)
