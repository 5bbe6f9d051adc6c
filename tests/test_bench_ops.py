"""bench/bench_ops.py: its per-sample references compute what the batched token ops compute."""

import argparse

import pytest
import torch
from bench_script import load_bench_script


load_bench_script("bench_pretrain_step")  # bench_ops imports it as a sibling script
bench_ops = load_bench_script("bench_ops")


@pytest.fixture
def config() -> argparse.Namespace:
    return bench_ops.parse_args(["--token-patch", "4", "--maesil-patch", "4", "--decoder-width", "12"])


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(3, 2, 16, 16, 32, generator=torch.Generator().manual_seed(0))


def run(name: str, x: torch.Tensor, config: argparse.Namespace, seed: int = 0) -> tuple:
    """(batched, loop) outputs of a benchmark, each from a generator seeded alike."""
    bench = bench_ops.BENCHMARKS[name]
    inputs = bench.inputs(x, config)
    return tuple(fn(inputs, torch.Generator().manual_seed(seed), config) for fn in (bench.batched, bench.loop))


@pytest.mark.parametrize("name", ["patchify", "unpatchify", "gather_tokens", "scatter_tokens"])
def test_loop_reference_matches_the_batched_op(name, batch, config):
    batched, loop = run(name, batch, config)
    torch.testing.assert_close(loop, batched, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["random_masking", "block_masking", "dual_masking"])
def test_loop_masks_have_the_batched_masks_structure(name, batch, config):
    """The same visible count per sample, and a TokenMask whose three parts agree."""
    batched, loop = run(name, batch, config)
    ids_keep, ids_restore, mask = loop
    assert ids_keep.shape == batched.ids_keep.shape and mask.shape == batched.mask.shape
    assert torch.equal(mask.sum(1), batched.mask.sum(1))
    assert not mask.gather(1, ids_keep).any()
    assert torch.equal(torch.sort(ids_keep, dim=1).values, ids_keep)
    masked = torch.nonzero(mask)[:, 1].reshape(mask.shape[0], -1)
    assert torch.equal(torch.cat([ids_keep, masked], 1).gather(1, ids_restore),
                       torch.arange(mask.shape[1]).expand_as(mask))


def test_loop_dual_mask_keeps_tubes_and_a_fixed_count_per_slab(batch, config):
    """MAESIL's grid here is (4, 4, 8): 16 in-plane positions, 8 kept, 4 of those in each of 8 slabs."""
    batched, loop = run("dual_masking", batch, config)
    for mask in (loop[2], batched.mask):
        kept = (1 - mask).reshape(mask.shape[0], 16, 8)  # (B, H*W, D): depth is the last grid axis
        assert torch.equal(kept.sum(1), torch.full((mask.shape[0], 8), 4.0))
        assert ((kept.sum(2) > 0).sum(1) <= 8).all()
