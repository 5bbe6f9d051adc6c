"""Chunked, threaded normal noise: reproducible from the generator, independent of the thread count."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.noise import CHUNK_NUMEL, standard_normal

LARGE = (3, 1, 64, 64, 41)  # 503808 elements: two chunks, the last one partial


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_large_tensor_is_chunks_seeded_from_the_generator():
    noise = standard_normal(LARGE, generator=torch.Generator().manual_seed(3))
    chunk_count = math.ceil(math.prod(LARGE) / CHUNK_NUMEL)
    seeds = torch.randint(0, 2**32, (chunk_count,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = torch.cat([
        torch.randn(min(CHUNK_NUMEL, math.prod(LARGE) - i * CHUNK_NUMEL), generator=torch.Generator().manual_seed(seed))
        for i, seed in enumerate(seeds)
    ])
    assert chunk_count == 2
    assert torch.equal(noise.flatten(), expected)


def test_small_tensor_is_torch_randn_with_the_generator():
    noise = standard_normal((4, 5), torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noise, torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))


@pytest.mark.usefixtures("restore_threads")
def test_values_do_not_depend_on_the_thread_count():
    draws = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        draws.append(standard_normal(LARGE, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_chunks_are_independent_standard_normals():
    noise = standard_normal((4 * CHUNK_NUMEL,), generator=torch.Generator().manual_seed(0)).double()
    chunks = noise.reshape(4, CHUNK_NUMEL)
    assert chunks.mean(1).abs().max() < 5 / CHUNK_NUMEL**0.5
    assert (chunks.std(1) - 1).abs().max() < 0.01
    correlation = torch.corrcoef(chunks)
    assert (correlation - torch.eye(4)).abs().max() < 5 / CHUNK_NUMEL**0.5
    assert not torch.equal(noise, standard_normal((4 * CHUNK_NUMEL,), generator=torch.Generator().manual_seed(1)))
